"""Where a GPU step's time goes, on the GPU check's policy (Qwen2.5-0.5B's shape, random weights,
bfloat16): the sampler's decode per step with the static cache replayed as a CUDA graph against
the eager sampler, then the CUDA kernels that take the time of sampler steps and of one update
micro-batch (torch.profiler). Needs a CUDA GPU.

    python benchmarks/bench_gpu_step.py [--rows 512] [--prompt 60] [--new-tokens 256]
        [--micro-batch 128]

Every row decodes `--new-tokens` tokens (the EOS id is one the model never draws), so both
samplers run the same number of steps; "ms/step" is a call's time over its steps (prefill and,
for the graph, its warm-up and capture included), the median of 3 calls after a warm-up.
"""

from __future__ import annotations

import argparse

import torch
from _common import timed
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2Config, Qwen2ForCausalLM

from entroprl.demo.models import QWEN25_05B
from entroprl.rollout.sampler import sample
from entroprl.train.forward import forward_log_probs
from entroprl.train.precision import cast_parameters


def top_kernels(prof, n: int) -> str:
    """A markdown table of the `n` CUDA kernels with the most device time."""
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    lines = ["| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
    for e in events[:n]:
        name = e.key if len(e.key) < 70 else e.key[:67] + "..."
        lines.append(
            f"| {name} | {e.count} | {e.device_time_total / 1e3:.1f} | "
            f"{e.device_time_total / total:.0%} |"
        )
    return "\n".join(lines) + f"\n\nall kernels: {total / 1e3:.1f} ms of device time"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cast_parameters(Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)), torch.bfloat16)
    model.eval()
    vocab = QWEN25_05B["vocab_size"]
    ids = torch.randint(3, vocab, (args.rows, args.prompt), device="cuda")
    mask = torch.ones_like(ids)
    mask[::2, : args.prompt // 3] = 0  # left padding on every other row
    never = vocab + 1  # an EOS id no draw can give: every row runs to the end

    def decode(static: bool, tokens: int):
        return sample(
            model,
            ids,
            mask,
            torch.ones(args.rows, dtype=torch.long, device="cuda"),
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=tokens,
            eos_token_id=never,
            pad_token_id=0,
            static_cache=static,
        )

    print(f"## sampler: {args.rows} rows, prompt {args.prompt}, {args.new_tokens} new tokens\n")
    print("| sampler | ms/step | tok/s |\n|---|---:|---:|")
    for name, static in (("static cache, CUDA graph", True), ("eager (dynamic cache)", False)):
        seconds = timed(lambda s=static: (decode(s, args.new_tokens), torch.cuda.synchronize()), 3)
        print(
            f"| {name} | {seconds / args.new_tokens * 1e3:.2f} | "
            f"{args.rows * args.new_tokens / seconds:,.0f} |"
        )
    for name, static in (("CUDA graph", True), ("eager", False)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode(static, 32)
            torch.cuda.synchronize()
        print(f"\n## 32 decode steps, {name}: the kernels with the most device time\n")
        print(top_kernels(prof, 10))

    model.train()
    rows, length = args.micro_batch, args.prompt + args.new_tokens
    batch = torch.randint(3, vocab, (rows, length), device="cuda")
    attention = torch.ones_like(batch)

    def micro_batch():
        log_prob, _ = forward_log_probs(model, batch, attention, args.new_tokens)
        log_prob.mean().backward()
        torch.cuda.synchronize()

    seconds = timed(micro_batch, 2)
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * rows * length
    print(f"\n## one update micro-batch: {rows} x {length} tokens, forward and backward\n")
    print(f"{seconds * 1e3:.0f} ms, {flops / seconds / 1e12:.0f} TFLOP/s model FLOPs (6 N T)")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        micro_batch()
    print()
    print(top_kernels(prof, 15))


if __name__ == "__main__":
    main()
