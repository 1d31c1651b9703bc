"""Rollout throughput: Hugging Face `generate` (`HFBackend`) against vLLM (`VLLMBackend`) on the
demo's workload (Countdown prompts, 32 prompts x 8 samples, temperature 1), at three model sizes.

    python benchmarks/bench_rollout.py [--sizes demo 10M 50M] [--new-tokens 16 128] [--repeats 3]

Run it in .venv-vllm (bash scripts/vllm_env.sh), where both backends are installed. Each
measurement runs in a fresh process (vLLM's CPU worker pins the process's OpenMP threads, which
would slow a Hugging Face run made after it in the same process); it times `repeats` calls after
one warm-up call and reports the median. "tok/s" counts the response tokens sampled (the
response masks' sum) per second of `generate`. Prints a markdown table.

The models are Qwen2 decoders with tied embeddings, random weights, the demo's character
vocabulary (25 tokens) and head_dim 64 (vLLM's CPU attention rejects the demo's head_dim 16, so
the demo-sized model has one head of 64 instead of four of 16: the same parameters and FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {
    # name: (hidden, layers); heads = hidden // 64
    "demo": (64, 2),
    "10M": (320, 6),
    "50M": (512, 12),
}
BACKENDS = ("hf", "vllm")


def build(size: str, path: str, max_position: int) -> int:
    """Save the model of `size` and the demo tokenizer to `path`; return its parameter count."""
    from _common import char_model_config

    from entroprl.demo.models import build_model, save_model
    from entroprl.demo.tokenizer import build_char_tokenizer

    hidden, layers = SIZES[size]
    tok = build_char_tokenizer()
    config = char_model_config(tok, hidden, layers, head_dim=64, max_position=max_position)
    model = build_model(config, seed=0)
    save_model(model, tok, path)
    return sum(p.numel() for p in model.parameters())


def measure(args: argparse.Namespace) -> dict:
    """One backend, one size, one length, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entroprl.config import DataConfig
    from entroprl.tasks.registry import build_task

    torch.set_num_threads(args.threads)
    path = args.model_dir
    tok = AutoTokenizer.from_pretrained(path)
    task = build_task(DataConfig(train_size=args.prompts, test_size=1), tok)
    prompts = [e.prompt for e in task.train[: args.prompts]]
    if args.backend == "hf":
        from entroprl.rollout.hf import HFBackend

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        backend = HFBackend(model, tok, batch_size=args.prompts * args.n)
    else:
        from entroprl.rollout.vllm import VLLMBackend

        backend = VLLMBackend(
            path,
            tok,
            dtype="float32",
            seed=0,
            # the share of the NUMA node's memory for weights and KV cache: 0.05 is too little
            # for the 50M model's KV cache once its working memory is counted
            gpu_memory_utilization=0.1,
            enforce_eager=args.eager,
            device="cpu",
        )
    times, tokens = [], []
    for i in range(args.repeats + 1):
        torch.manual_seed(i)
        start = time.perf_counter()
        batch = backend.generate(
            prompts, n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.new_tokens
        )
        elapsed = time.perf_counter() - start
        if i > 0:  # the first call warms up
            times.append(elapsed)
            tokens.append(int(batch.response_mask.sum()))
    t = statistics.median(times)
    return {"s": t, "tokens": statistics.median(tokens), "tok_s": statistics.median(tokens) / t}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--new-tokens", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the HF runs")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (rollout.enforce_eager)")  # fmt: skip
    # one measurement in this process (what the driver below runs in subprocesses)
    parser.add_argument("--backend", choices=BACKENDS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend is not None:
        args.new_tokens = args.new_tokens[0]
        print(json.dumps(measure(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = os.path.join(tmp, size)
            params = build(size, path, max_position=64 + max(args.new_tokens))
            for new_tokens in args.new_tokens:
                result = {}
                for backend in BACKENDS:
                    cmd = [
                        sys.executable, __file__, "--backend", backend, "--model-dir", path,
                        "--new-tokens", str(new_tokens), "--prompts", str(args.prompts),
                        "--n", str(args.n), "--repeats", str(args.repeats),
                        "--threads", str(args.threads), "--eager" if args.eager else "--no-eager",
                    ]  # fmt: skip
                    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        sys.exit(f"{backend} {size} failed:\n{out.stderr[-3000:]}")
                    result[backend] = json.loads(out.stdout.strip().splitlines()[-1])
                hf, vllm = result["hf"], result["vllm"]
                rows.append(
                    f"| {size} | {params / 1e6:.2f}M | {new_tokens} | {hf['tokens']:.0f} | "
                    f"{hf['s']:.2f} | {vllm['s']:.2f} | {hf['tok_s']:.0f} | {vllm['tok_s']:.0f} | "
                    f"{vllm['tok_s'] / hf['tok_s']:.2f} |"
                )
                print(rows[-1], flush=True)
    print(
        "\n| model | params | max new tokens | tokens (HF) | HF s | vLLM s | HF tok/s | vLLM tok/s "
        "| vLLM / HF |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
