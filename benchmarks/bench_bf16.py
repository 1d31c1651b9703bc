"""bfloat16 on the CPU against float32: speed of the training forward + backward and of the
no-grad log-prob pass, and how far the log-probs and entropies move.

    python benchmarks/bench_bf16.py [--sizes 128x4 256x4] [--vocabs 32 32768] [--rows 128]

Random-init Qwen2 models (head_dim 32, float32 weights), one batch of `rows` random sequences of
`--length` tokens whose second half is the response, a quarter of the rows left-padded by 3.
Three ways to compute: float32; `torch.autocast("cpu", torch.bfloat16)` over the float32 model
(what TRL's and accelerate's `bf16=True` do); and entroprl's `model.compute_dtype=bfloat16` without
FSDP: a bfloat16 copy of the model with the attention in float32 (`precision.ComputeCopy`,
`precision.float32_attention`), its gradients added to the float32 weights. Times are the median
of `--repeats` calls after one warm-up call, 2 torch threads. "dlogp" and "dH" compare the
response tokens' log-probs and entropies of the compute copy with float32's. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from functools import partial

import torch
from _common import timed

from entroprl.demo.models import build_model, tiny_config
from entroprl.train.forward import forward_log_probs
from entroprl.train.precision import ComputeCopy, float32_attention


def one_pass(model, ids, mask, response_len: int, grad: bool, autocast: bool = False):
    """One forward (and backward with `grad`); its log-probs and entropies."""
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.set_grad_enabled(grad), cast:
        logp, entropy = forward_log_probs(model, ids, mask, response_len)
        if grad:
            logp.sum().backward()
    return logp.detach().float(), entropy.detach().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4", "256x4"])
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
        "| hidden x layers | vocab | fwd+bwd fp32 s | autocast s | bf16 copy s | speedup "
        "| no-grad fp32 s | autocast s | bf16 copy s | speedup "
        "| max abs dlogp | mean abs dlogp | mean abs dH |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
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
            mask[: args.rows // 4, :3] = 0
            mixed = copy.deepcopy(model)
            float32_attention(mixed)
            mixed = ComputeCopy(mixed, torch.bfloat16)
            row = [size, str(vocab)]
            for grad in (True, False):
                runs = [(model, False), (model, True), (mixed, False)]
                times = [
                    timed(partial(one_pass, m, ids, mask, R, grad, cast), args.repeats)
                    for m, cast in runs
                ]
                row += [f"{t:.3f}" for t in times] + [f"{times[0] / times[2]:.2f}x"]
            full, low = one_pass(model, ids, mask, R, False), one_pass(mixed, ids, mask, R, False)
            dlogp, dH = (low[0] - full[0]).abs(), (low[1] - full[1]).abs()
            row += [f"{dlogp.max():.3f}", f"{dlogp.mean():.4f}", f"{dH.mean():.4f}"]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
