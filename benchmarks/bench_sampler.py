"""The sampler (`entroprl.rollout.sampler`, what `HFBackend` runs) against `model.generate` on the
prompts repeated n times (what `HFBackend` ran before), with a dynamic and with a static KV cache.

    python benchmarks/bench_sampler.py [--sizes 128x4 256x4] [--prompts 16] [--n 8]
        [--compact-at 0 0.25 1]

Random-init Qwen2 models (head_dim 32) on the char vocabulary, the built-in Countdown prompts,
temperature 1, 2 torch threads; the i-th call of each is seeded with i (the sampler and
`model.generate` then draw the same tokens). Times are the median of `--repeats` calls after one
warm-up; "ms/step" is the call's time over the decode steps it ran (the longest response), "tok/s"
counts the response tokens. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from _common import char_model_config
from transformers import GenerationConfig

from entroprl.config import Config
from entroprl.demo.models import build_model
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.rollout import sampler
from entroprl.rollout.batch import response_mask_from_ids
from entroprl.rollout.hf import HFBackend
from entroprl.tasks.registry import build_task


def generate(model, tok, prompts, n, new_tokens, cache_implementation):
    """`model.generate` on the prompts repeated n times: (responses, response mask)."""
    tok.padding_side = "left"
    enc = tok([p for p in prompts for _ in range(n)], return_tensors="pt", padding=True)
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        cache_implementation=cache_implementation,
    )
    out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
    return out, response_mask_from_ids(out, tok.eos_token_id)


def sample(backend, prompts, n, new_tokens):
    """`HFBackend.generate`: (responses, response mask)."""
    batch = backend.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens)
    return batch.response_ids, batch.response_mask


def compacting_at(share, backend, prompts, n, new_tokens):
    """The sampler with finished rows dropped once they are more than `share` of the batch."""
    default, sampler.COMPACT_AT = sampler.COMPACT_AT, share
    try:
        return sample(backend, prompts, n, new_tokens)
    finally:
        sampler.COMPACT_AT = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x4", "256x4"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compact-at",
        nargs="*",
        type=float,
        default=[],
        help="also run the sampler with these sampler.COMPACT_AT values (0: drop finished rows "
        "at once, 1: never)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    prompts = [e.prompt for e in build_task(Config().data).train[: args.prompts]]
    print(f"{args.prompts} prompts x {args.n}, up to {args.new_tokens} new tokens\n")
    print("| hidden x layers | sampler | s/call | ms/step | tok/s | vs generate |")
    print("|---|---|---:|---:|---:|---:|")
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        config = char_model_config(tok, hidden, layers)
        model = build_model(config, seed=0).eval()
        backend = HFBackend(model, tok, batch_size=args.prompts * args.n)
        common = (model, tok, prompts, args.n, args.new_tokens)
        runs = {
            "model.generate": partial(generate, *common, None),
            "model.generate, static cache": partial(generate, *common, "static"),
            "entroprl.rollout.sampler": partial(sample, backend, *common[2:]),
        }
        for share in args.compact_at:
            runs[f"entroprl.rollout.sampler, COMPACT_AT={share:g}"] = partial(
                compacting_at, share, backend, *common[2:]
            )
        base = None
        for name, run in runs.items():
            times, tokens, steps = [], [], []
            for i in range(args.repeats + 1):
                torch.manual_seed(i)
                start = time.perf_counter()
                response, mask = run()
                if i:
                    times.append(time.perf_counter() - start)
                    tokens.append(float(mask.sum()))
                    steps.append(response.shape[1])
            t = statistics.median(times)
            base = base or t
            rate = statistics.mean(tokens) / t
            per_step = 1000 * t / statistics.mean(steps)
            print(f"| {size} | {name} | {t:.3f} | {per_step:.1f} | {rate:.0f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
