"""The fused head (`model.fused_head`) against the logits path: one micro-batch's training forward
and backward, and one no-grad log-prob pass, through a model with Qwen2.5's 151,936-token
vocabulary.

    python benchmarks/bench_fused_head.py [--vocab 151936] [--hidden 256] [--layers 2]
        [--shapes 4x512 8x512] [--prompt 64] [--dtypes float32 bfloat16] [--repeats 3]
        [--device cpu]

The model is a random-init Qwen2 with tied embeddings (as Qwen2.5-0.5B's), `hidden` wide: small
enough for a CPU, with the output layer the 0.5B's size when `--hidden 896`. "grad" runs
`forward.forward_log_probs` with the entropy's gradient and backward of `logp * A + 0.01 * H`
(the policy loss with an entropy bonus); "no_grad" the pass the old and reference log-probs take.
Every case runs in a fresh subprocess so that its peak memory is its own: on CPU the peak resident
set (`ru_maxrss`) minus the one measured once the model and inputs exist, on CUDA
`max_memory_allocated` minus the memory allocated then. The time is the median over the repeats,
after one warm-up call. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from _common import in_fresh_process, parse_shape, time_and_peak
from transformers import Qwen2Config, Qwen2ForCausalLM

from entroprl.train import forward
from entroprl.train.precision import native_bfloat16


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device, dtype)
    if args.impl == "fused":
        forward.fuse_head(model)
    return model


def worker(args: argparse.Namespace) -> None:
    """One case in this (fresh) process; prints a JSON line."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(args, device, dtype)
    b, R = args.shape
    ids = torch.randint(0, args.vocab, (b, args.prompt + R), device=device)
    mask = torch.ones_like(ids)
    advantages = torch.randn(b, R, device=device)
    grad = args.mode == "grad"

    def run() -> None:
        with torch.set_grad_enabled(grad):
            logp, entropy = forward.forward_log_probs(
                model, ids, mask, R, entropy_grad=grad, fused_head=args.impl == "fused"
            )
            if grad:
                (logp * advantages + 0.01 * entropy).sum().backward()

    print(json.dumps(time_and_peak(run, args.repeats, device)))


def run_case(args: argparse.Namespace, shape, dtype: str, mode: str, impl: str) -> dict:
    options = {
        "--impl": impl,
        "--mode": mode,
        "--shapes": f"{shape[0]}x{shape[1]}",
        "--dtypes": dtype,
        "--vocab": args.vocab,
        "--hidden": args.hidden,
        "--layers": args.layers,
        "--prompt": args.prompt,
        "--repeats": args.repeats,
        "--device": args.device,
    }
    return in_fresh_process(__file__, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=["4x512", "8x512"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["grad", "no_grad"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["logits", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["no_grad", "grad"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shapes = [parse_shape(s) if isinstance(s, str) else s for s in args.shapes]
    if args.worker:
        args.shape, args.dtype = args.shapes[0], args.dtypes[0]
        worker(args)
        return
    if args.device == "cpu" and "bfloat16" in args.dtypes and not native_bfloat16():
        print("this CPU has no native bfloat16: bfloat16 cases left out\n")
        args.dtypes = [d for d in args.dtypes if d != "bfloat16"]
    mb = 2**20
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, prompt {args.prompt}, "
        f"device {args.device}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()} ({capability}), "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print()
    print(
        "| mode | B x R | dtype | logits MiB | logits s | fused s | logits peak MiB "
        "| fused peak MiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        for shape in args.shapes:
            for dtype in args.dtypes:
                size = shape[0] * (shape[1] + 1) * args.vocab * getattr(torch, dtype).itemsize
                plain = run_case(args, shape, dtype, mode, "logits")
                fused = run_case(args, shape, dtype, mode, "fused")
                print(
                    f"| {mode} | {shape[0]} x {shape[1]} | {dtype} | {size / mb:.0f} "
                    f"| {plain['seconds']:.2f} | {fused['seconds']:.2f} "
                    f"| {plain['peak_bytes'] / mb:.0f} | {fused['peak_bytes'] / mb:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
