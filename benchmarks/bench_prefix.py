"""Shared prompts computed once (`optim.shared_prefix`) against the full forward, on the training
forward + backward and on the no-grad log-prob pass.

    python benchmarks/bench_prefix.py [--hidden 128] [--layers 4] [--rows 128] [--response 24]

One batch of `rows` sequences: rows / G prompts of P random tokens (left part), each with G random
responses of `--response` tokens; G in 8, 16 and P = the response length ("long") or 1/8 of it
("short"). The model is a random-init Qwen2 (head_dim 32) on the char vocabulary, 2 torch threads.
Times are the median of `--repeats` calls after one warm-up call; prints a markdown table.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from _common import timed

from entroprl.demo.models import build_model, tiny_config
from entroprl.train.forward import forward_log_probs


def one_pass(model, ids, mask, response_len: int, shared: bool, grad: bool) -> None:
    with torch.set_grad_enabled(grad):
        logp, entropy = forward_log_probs(model, ids, mask, response_len, shared_prefix=shared)
        if grad:
            (logp.sum() + entropy.sum()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--response", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab, R = 32, args.response
    model = build_model(
        tiny_config(
            vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.hidden // 32,
            max_position=4 * R,
        ),
        seed=0,
    )
    g = torch.Generator().manual_seed(0)
    print(f"hidden {args.hidden}, {args.layers} layers, {args.rows} rows, responses of {R} tokens")
    print(f"{args.threads} threads, median of {args.repeats}\n")
    print(
        "| G | prompt | P | fwd+bwd full s | shared s | speedup "
        "| no-grad full s | shared s | speedup |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for G in (8, 16):
        for name, P in (("long", R), ("short", max(R // 8, 1))):
            prompts = torch.randint(3, vocab, (args.rows // G, P), generator=g)
            ids = torch.cat(
                [
                    prompts.repeat_interleave(G, 0),
                    torch.randint(3, vocab, (args.rows, R), generator=g),
                ],
                dim=1,
            )
            mask = torch.ones_like(ids)
            row = [str(G), name, str(P)]
            for grad in (True, False):
                speeds = [
                    timed(partial(one_pass, model, ids, mask, R, shared, grad), args.repeats)
                    for shared in (False, True)
                ]
                row += [f"{speeds[0]:.3f}", f"{speeds[1]:.3f}", f"{speeds[0] / speeds[1]:.2f}x"]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
