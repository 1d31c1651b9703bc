"""Where a GPU step's time goes, on the GPU check's policy (Qwen2.5-0.5B's shape, random weights,
bfloat16): the sampler's decode per step with the static cache replayed as a CUDA graph against
the eager sampler, the CUDA kernels that take the time of sampler steps, then one update
micro-batch (forward and backward) through the logits path and the fused head
(`model.fused_head`), each with eager and compiled decoder layers (`model.compile`), and the
kernels of the fastest (torch.profiler).

    python benchmarks/bench_gpu_step.py [--rows 512] [--prompt 60] [--new-tokens 256]
        [--micro-batch 128] [--update-only] [--peak-tflops 989]

Every row decodes `--new-tokens` tokens (the EOS id is one the model never draws), so both
samplers run the same number of steps; "ms/step" is a call's time over its steps (prefill and,
for the graph, its warm-up and capture included), the median of 3 calls after a warm-up. A
micro-batch's time is the median of 2 calls after a warm-up (which compiles, for the compiled
layers); its model FLOPs are 6 x parameters x tokens, its MFU those over `--peak-tflops` (an
H100's or H200's dense bf16 peak by default). `--tiny --device cpu --update-only` runs the update
part on the CPU with a 2-layer model of the same vocabulary: the test of this script.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import time_and_peak, timed
from torch.profiler import ProfilerActivity, profile
from transformers import Qwen2Config, Qwen2ForCausalLM

from entroprl.demo.models import QWEN25_05B, QWEN25_05B_TINY
from entroprl.rollout.sampler import sample
from entroprl.train.compiled import compile_layers
from entroprl.train.forward import forward_log_probs, fuse_head
from entroprl.train.precision import cast_parameters

UPDATE_VARIANTS = {
    "logits, eager": (False, False),
    "logits, compiled": (False, True),
    "fused head, eager": (True, False),
    "fused head, compiled": (True, True),
}
"""Each update variant's (model.fused_head, model.compile)."""


def top_kernels(prof, n: int, cuda: bool) -> str:
    """A markdown table of the `n` kernels (on the CPU: operators, by self time) with the most
    device time."""
    events = [e for e in prof.key_averages() if _time(e, cuda) > 0]
    events.sort(key=lambda e: _time(e, cuda), reverse=True)
    total = sum(_time(e, cuda) for e in events)
    lines = ["| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
    for e in events[:n]:
        name = e.key if len(e.key) < 70 else e.key[:67] + "..."
        spent = _time(e, cuda)
        lines.append(f"| {name} | {e.count} | {spent / 1e3:.1f} | {spent / total:.0%} |")
    return "\n".join(lines) + f"\n\nall kernels: {total / 1e3:.1f} ms of device time"


def _time(event, cuda: bool) -> float:
    return event.device_time_total if cuda else event.self_cpu_time_total


def _profile(fn, cuda: bool):
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
    return prof


def bench_sampler(model, args) -> None:
    vocab = model.config.vocab_size
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
        prof = _profile(lambda s=static: (decode(s, 32), torch.cuda.synchronize()), cuda=True)
        print(f"\n## 32 decode steps, {name}: the kernels with the most device time\n")
        print(top_kernels(prof, 10, cuda=True))


def bench_update(model, args) -> None:
    """One micro-batch's forward and backward in each of `UPDATE_VARIANTS`, on copies of
    `model`; then the kernels of the fastest."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.train()
    rows, length = args.micro_batch, args.prompt + args.new_tokens
    batch = torch.randint(3, model.config.vocab_size, (rows, length), device=device)
    attention = torch.ones_like(batch)
    flops = 6 * sum(p.numel() for p in model.parameters()) * rows * length
    print(f"\n## one update micro-batch: {rows} x {length} tokens, forward and backward\n")
    print("| variant | ms | TFLOP/s (6 N T) | MFU | peak memory GiB |\n|---|---:|---:|---:|---:|")
    runs = {}
    for name, (fused, compiled) in UPDATE_VARIANTS.items():
        variant = copy.deepcopy(model)
        if fused:
            fuse_head(variant)
        if compiled:
            compile_layers(variant)

        def micro_batch(variant=variant, fused=fused):
            # the update of the GPU check: no entropy bonus, so no gradient through the entropy
            log_prob, _ = forward_log_probs(
                variant, batch, attention, args.new_tokens, fused_head=fused
            )
            log_prob.mean().backward()
            variant.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()

        measured = time_and_peak(micro_batch, 2, device)
        runs[name] = micro_batch, measured["seconds"]
        tflops = flops / measured["seconds"] / 1e12
        # the CPU's peak resident set only grows: after the first variant it says nothing
        peak = f"{measured['peak_bytes'] / 2**30:.1f}" if cuda else "-"
        print(
            f"| {name} | {measured['seconds'] * 1e3:.0f} | {tflops:.3g} | "
            f"{tflops / args.peak_tflops:.1%} | {peak} |"
        )
    fastest = min(runs, key=lambda name: runs[name][1])
    print(f"\n## the kernels of one micro-batch, {fastest}\n")
    print(top_kernels(_profile(runs[fastest][0], cuda), 15, cuda))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=128)
    parser.add_argument("--update-only", action="store_true", help="skip the sampler")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for the MFU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 128")
    args = parser.parse_args()
    if args.device != "cuda" and not args.update_only:
        parser.error("the sampler part needs --device cuda (or pass --update-only)")
    torch.manual_seed(0)
    with torch.device(args.device):
        shape = QWEN25_05B_TINY if args.tiny else QWEN25_05B
        model = cast_parameters(Qwen2ForCausalLM(Qwen2Config(**shape)), torch.bfloat16)
    if not args.update_only:
        bench_sampler(model.eval(), args)
    bench_update(model, args)


if __name__ == "__main__":
    main()
