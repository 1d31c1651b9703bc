"""The first-GPU check: a few GRPO steps of a Qwen2.5-0.5B-shaped policy in bf16 compute, with the
vLLM engine colocated (FSDP) or Hugging Face sampling (one process), nothing downloaded. Run through
scripts/gpu_check.sh.

With the HF backend on one GPU the policy is not sharded (`trainer.strategy=ddp`, a process of
one: the bfloat16 compute copy of `entroprl.train.precision`), so the sampler decodes with its
static cache replayed as a CUDA graph, all rows in one call, and the update runs micro-batches of
128 responses. `--legacy` runs the settings of the first GPU run instead (FSDP over a group of one,
the eager sampler in chunks of 256 rows, micro-batches of 32): the "before" of docs/benchmarks.md.

The model has Qwen2.5-0.5B's architecture and vocabulary size (24 layers, hidden 896, 14 query
and 2 key/value heads, 151,936 tokens, tied embeddings) with random weights; the prompts are the
built-in Countdown task's, written with the project's character tokenizer (the model's other
token ids decode to nothing). A random policy solves nothing, so every advantage is 0: the steps
measure the cost of the work (sampling, log-probs, forward and backward, optimizer), not learning.

Prints per step, then the median over the steps after the first (the warm-up): the step time
split, rollout and update tokens/s, the update's model FLOPs utilisation (6 x parameters x tokens
through the update / update time / the GPU's dense bf16 peak; and verl's count of it, the
trainer's `perf/mfu/actor`, which adds attention and counts the tied embedding twice), the
rollout/training log-prob mismatch, and the peak memory. ``--tiny`` shrinks the model (2 layers,
hidden 128, the same vocabulary and head layout) and the batch so that the whole path runs on a
CPU in a minute or two: the CPU test of this script.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config

from entroprl.config import config_from_dict
from entroprl.demo.models import QWEN25_05B, QWEN25_05B_TINY, build_model, save_model
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.train import distributed, perf
from entroprl.train.precision import native_bfloat16
from entroprl.train.trainer import Trainer


def build(shape: dict, path: Path) -> int:
    """Save the random-weight model and the character tokenizer; return the parameter count."""
    tok = build_char_tokenizer()
    config = Qwen2Config(
        **shape,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = build_model(config, seed=0)
    save_model(model, tok, path)
    return sum(p.numel() for p in model.parameters())


def run_config(args: argparse.Namespace, model_dir: Path, out_dir: Path) -> dict:
    cpu = args.device == "cpu"
    # bfloat16 where it is fast: the trainer refuses it on a CPU without native bfloat16
    compute = "bfloat16" if not cpu or native_bfloat16() else None
    return {
        "model": {
            "path": str(model_dir),
            "dtype": "float32",
            "compute_dtype": compute,
            "fused_head": args.fused_head,
            "compile": args.compile,
        },
        "data": {"train_size": 2048, "test_size": 8},
        "rollout": {
            "backend": args.backend,
            "prompts_per_step": args.prompts,
            "n": args.n,
            "max_new_tokens": args.new_tokens,
            "generation_batch_size": args.generation_batch,
            "static_cache": False if args.legacy else None,
            "gpu_memory_utilization": 0.05 if cpu else 0.3,
            "enforce_eager": cpu,  # torch.compile's start-up is minutes on a CPU
        },
        "optim": {
            "lr": 1e-6,
            "mini_batch_size": args.prompts * args.n,
            "micro_batch_size": args.micro_batch,
            "log_prob_micro_batch_size": 2 * args.micro_batch,
        },
        "trainer": {
            "steps": args.steps,
            "out_dir": str(out_dir),
            "device": args.device,
            "strategy": args.strategy,
            "eval_every": 0,
            "rollout_samples": 0,
            "progress": False,
            "report_to": [],
            "peak_tflops": args.peak_tflops,
        },
    }


def peak_memory_gb(device: str) -> str:
    if device == "cpu":
        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB (process RSS)"
    allocated = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    free, total = torch.cuda.mem_get_info()
    used = (total - free) / 2**30
    return (
        f"{allocated:.1f} GiB allocated, {reserved:.1f} GiB reserved by torch (vLLM's weights and "
        f"KV cache included); {used:.1f} of {total / 2**30:.0f} GiB in use on the device"
    )


def parse_args() -> argparse.Namespace:
    """The options, with the defaults that depend on one another filled in."""
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--tiny", action="store_true", help="the CPU-sized model and batch")
    add("--backend", choices=("vllm", "hf"), default="vllm")
    add("--steps", type=int, default=None, help="default: 4 (tiny: 2)")
    add("--device", default=None, help="default: cuda if there is one, else cpu")
    add("--peak-tflops", type=float, default=None, help="for the MFU")
    add(
        "--legacy",
        action="store_true",
        help="the first GPU run's settings: FSDP, eager sampling in chunks of 256, micro-batch 32",
    )
    add(
        "--strategy",
        choices=("ddp", "fsdp"),
        default=None,
        help="default: fsdp with vLLM and with --legacy, else ddp (one process: not sharded)",
    )
    add("--micro-batch", type=int, default=None, help="responses per backward")
    add(
        "--fused-head",
        action="store_true",
        help="model.fused_head: log-probs from the hidden states, no (B, R, V) logits",
    )
    add("--compile", action="store_true", help="model.compile: torch.compile the decoder layers")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.steps = args.steps or (2 if args.tiny else 4)
    args.prompts, args.n = (4, 2) if args.tiny else (64, 8)
    args.new_tokens = 8 if args.tiny else 256
    args.strategy = args.strategy or ("fsdp" if args.backend == "vllm" or args.legacy else "ddp")
    if args.micro_batch is None:
        args.micro_batch = 4 if args.tiny else 32 if args.legacy else 128
    args.generation_batch = 256 if args.legacy else args.prompts * args.n
    if args.peak_tflops is None:
        args.peak_tflops = perf.device_peak_tflops(torch.device(args.device))
    return args


def step_figures(m: dict, *, params: int, tokens: float, peak_tflops: float | None) -> dict:
    """One step's figures from its logged metrics `m`; `tokens`: those through the update."""
    update_s = m["timing_s/update_actor"]
    mfu = 6 * params * tokens / update_s / (peak_tflops * 1e12) if peak_tflops else float("nan")
    keys = ("gen", "reward", "old_log_prob", "update_actor", "step")
    return {k: m[f"timing_s/{k}"] for k in keys} | {
        "rollout tok/s": m["perf/rollout_tokens_per_s"],
        "update tok/s": m["perf/update_tokens_per_s"],
        "MFU": mfu,
        "MFU (verl's count)": m.get("perf/mfu/actor", float("nan")),
        "|dlogp| mean": m.get("rollout_corr/log_prob_abs_diff_mean", float("nan")),
        "|dlogp| max": m.get("rollout_corr/log_prob_abs_diff_max", float("nan")),
        "ratio outside [1/2, 2]": m.get("rollout_corr/ratio_fraction_low", float("nan"))
        + m.get("rollout_corr/ratio_fraction_high", float("nan")),
        "response length": m["response_length/mean"],
    }


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="entroprl-gpu-check-"))
    start = time.perf_counter()
    params = build(QWEN25_05B_TINY if args.tiny else QWEN25_05B, work / "model")
    print(f"model: {params / 1e6:.1f}M parameters, built in {time.perf_counter() - start:.1f} s")
    config = config_from_dict(run_config(args, work / "model", work / "run"))
    distributed.init(args.strategy)  # FSDP: a process group of one
    settings = ("strategy", "micro_batch", "generation_batch", "legacy", "fused_head", "compile")
    print("settings: " + ", ".join(f"{k} {getattr(args, k)}" for k in settings))
    start = time.perf_counter()
    trainer = Trainer(config)
    print(f"trainer and {args.backend} engine ready in {time.perf_counter() - start:.1f} s")
    prompt_tokens = statistics.mean(
        len(trainer.tokenizer(e.prompt, add_special_tokens=False)["input_ids"])
        for e in trainer.task.train[:256]
    )
    results = []
    for step in range(1, args.steps + 1):
        m = trainer.train_step(step)
        tokens = args.prompts * args.n * (prompt_tokens + m["response_length/mean"])
        r = step_figures(m, params=params, tokens=tokens, peak_tflops=args.peak_tflops)
        results.append(r)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
    measured = results[1:] or results
    print(f"\nmedian over steps 2-{args.steps} (step 1 warms up):")
    for key in results[0]:
        print(f"  {key}: {statistics.median(r[key] for r in measured):.4g}")
    print(f"  peak memory: {peak_memory_gb(args.device)}")
    if not args.peak_tflops:
        print("  (MFU: no dense bf16 peak known for this device; pass --peak-tflops)")
    print(f"total {time.perf_counter() - start:.0f} s after the model was built")


if __name__ == "__main__":
    main()
