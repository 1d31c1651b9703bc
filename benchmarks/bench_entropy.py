"""Chunked log-prob + entropy (`entroprl.algos.entropy.logprobs_and_entropy`) against the naive
version.

    python benchmarks/bench_entropy.py [--vocab 151936] [--shapes 1x256 4x256 8x512]
        [--grad-shapes 1x256 4x256] [--dtypes bfloat16 float32] [--repeats 3] [--device cpu]

Every case runs in a fresh subprocess so that its peak memory is its own: on CPU the peak resident
set (`ru_maxrss`) minus the one measured once the inputs exist, on CUDA `max_memory_allocated` minus
the memory allocated by the inputs. The time is the median over the repeats, after one warm-up
call. "no_grad" measures the monitoring path; "grad" runs forward and backward of
`logp.sum() + H.sum()` (the loss and entropy bonus path). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from _common import in_fresh_process, parse_shape, time_and_peak

from entroprl.algos.entropy import logprobs_and_entropy


def naive(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.float(), -1)
    logp = lp.gather(-1, tokens[..., None]).squeeze(-1)
    return logp, -(lp.exp() * lp).sum(-1)


def chunked(
    logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return logprobs_and_entropy(logits, tokens, chunk_rows=chunk_rows, entropy_grad=True)


def worker(args: argparse.Namespace) -> None:
    """One case in this (fresh) process; prints a JSON line."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    b, t = args.shape
    # In-place sampling so that creating the inputs leaves no temporary behind the baseline.
    logits = torch.empty(b, t, args.vocab, dtype=dtype, device=device).normal_()
    tokens = torch.randint(0, args.vocab, (b, t), device=device)
    grad = args.mode == "grad"
    logits.requires_grad_(grad)

    def run() -> None:
        with torch.set_grad_enabled(grad):
            if args.impl == "naive":
                logp, entropy = naive(logits, tokens)
            else:
                logp, entropy = chunked(logits, tokens, args.chunk_rows)
            if grad:
                (logp.sum() + entropy.sum()).backward()
                logits.grad = None

    print(json.dumps(time_and_peak(run, args.repeats, device)))


def run_case(args: argparse.Namespace, shape, dtype: str, mode: str, impl: str) -> dict:
    options = {
        "--impl": impl,
        "--mode": mode,
        "--shapes": f"{shape[0]}x{shape[1]}",
        "--dtypes": dtype,
        "--vocab": args.vocab,
        "--repeats": args.repeats,
        "--chunk-rows": args.chunk_rows,
        "--device": args.device,
    }
    return in_fresh_process(__file__, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=["1x256", "4x256", "8x512"]
    )
    parser.add_argument("--grad-shapes", type=parse_shape, nargs="*", default=["1x256", "4x256"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["no_grad", "grad"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shapes = [parse_shape(s) if isinstance(s, str) else s for s in args.shapes]
    args.grad_shapes = [parse_shape(s) if isinstance(s, str) else s for s in args.grad_shapes]
    if args.worker:
        args.shape, args.dtype = args.shapes[0], args.dtypes[0]
        worker(args)
        return

    cases = [("no_grad", s) for s in args.shapes] + [("grad", s) for s in args.grad_shapes]
    mb = 2**20
    print(
        f"vocab {args.vocab}, chunk_rows {args.chunk_rows}, device {args.device}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print()
    print(
        "| mode | B x T | dtype | logits MiB | naive s | chunked s | naive peak MiB "
        "| chunked peak MiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for mode, shape in cases:
        for dtype in args.dtypes:
            size = shape[0] * shape[1] * args.vocab * getattr(torch, dtype).itemsize / mb
            naive_r = run_case(args, shape, dtype, mode, "naive")
            chunked_r = run_case(args, shape, dtype, mode, "chunked")
            print(
                f"| {mode} | {shape[0]} x {shape[1]} | {dtype} | {size:.0f} "
                f"| {naive_r['seconds']:.3f} | {chunked_r['seconds']:.3f} "
                f"| {naive_r['peak_bytes'] / mb:.0f} | {chunked_r['peak_bytes'] / mb:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
