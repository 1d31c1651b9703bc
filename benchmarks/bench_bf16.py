"""bf16 autocast on the CPU against float32: speed of the training forward + backward and of the
no-grad log-prob pass, and how far the log-probs and entropies move.

    python benchmarks/bench_bf16.py [--sizes 128x4 256x4 512x8] [--rows 128] [--length 48]

Random-init Qwen2 models (head_dim 32, float32 weights, the char vocabulary and a 32k one), one
batch of `rows` random sequences of `--length` tokens whose second half is the response; bf16 runs
the same model under `torch.autocast("cpu", torch.bfloat16)`. Times are the median of `--repeats`
calls after one warm-up call, 2 torch threads. "max |dlogp|" and "mean |dH|" compare the response
tokens' log-probs and entropies with float32's. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
from functools import partial

import torch
from _common import timed

from entroprl.forward import forward_log_probs
from entroprl.models import build_model, tiny_config


def one_pass(model, ids, mask, response_len: int, bf16: bool, grad: bool, results: dict) -> None:
    """One forward (and backward with `grad`); its log-probs and entropies in `results[bf16]`."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.set_grad_enabled(grad), autocast:
        logp, entropy = forward_log_probs(model, ids, mask, response_len)
        if grad:
            logp.sum().backward()
    results[bf16] = (logp.detach().float(), entropy.detach().float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4", "256x4", "512x8"])
    parser.add_argument("--vocabs", nargs="+", type=int, default=[32, 32768])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    R = args.length // 2
    print(f"{args.rows} rows x {args.length} tokens ({R} response), {args.threads} threads\n")
    print(
        "| hidden x layers | vocab | fwd+bwd fp32 s | bf16 s | speedup | no-grad fp32 s | bf16 s "
        "| speedup | max abs dlogp | mean abs dlogp | mean abs dH |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        for vocab in args.vocabs:
            config = tiny_config(
                vocab,
                hidden_size=hidden,
                num_layers=layers,
                num_heads=hidden // 32,
                max_position=args.length,
            )
            model = build_model(config, seed=0)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(3, vocab, (args.rows, args.length), generator=g)
            mask = torch.ones_like(ids)
            results, row = {}, [size, str(vocab)]
            for grad in (True, False):
                times = [
                    timed(partial(one_pass, model, ids, mask, R, bf16, grad, results), args.repeats)
                    for bf16 in (False, True)
                ]
                row += [f"{times[0]:.3f}", f"{times[1]:.3f}", f"{times[0] / times[1]:.2f}x"]
            dlogp = (results[True][0] - results[False][0]).abs()
            dH = (results[True][1] - results[False][1]).abs()
            row += [f"{dlogp.max():.3f}", f"{dlogp.mean():.4f}", f"{dH.mean():.4f}"]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
