"""Training state held per rank under each strategy (`entroprl.train.parallel`): DDP against FSDP2.

    python benchmarks/bench_sharding.py [--worlds 1 2 4] [--hidden 512] [--layers 8]
        [--vocab 32000] [--tokens 256] [--repeats 3]

Each (strategy, world size) case spawns its ranks (gloo on CPU, NCCL with one GPU per rank when
there are enough GPUs), builds the same Qwen2 model, wraps it with `parallel.wrap`, and runs AdamW
steps on random tokens (forward, backward, gradient clipping, step). It then counts the bytes each
rank holds, from the tensors themselves (the local shards of sharded parameters): weights,
gradients and AdamW state, and reports the largest rank. The step time is the median over the
repeats after one warm-up step. Last, greedy generation of `--gen-tokens` tokens for 8 prompts,
timed once with parameters gathered at every forward and once gathered for the whole call
(`parallel.gathered`, what `HFBackend` does). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from entroprl.demo.models import build_model, tiny_config
from entroprl.train import parallel


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _generate(model, args, device, synced: bool, gather: bool) -> float:
    """Seconds to sample `--gen-tokens` tokens for 8 prompts of 16 random tokens (KV cache on),
    with the parameters gathered once for the call (`parallel.gathered`) or at every forward."""
    prompts = torch.randint(args.vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(device)
    n = args.gen_tokens
    start = time.perf_counter()
    with parallel.gathered(model) if gather else contextlib.nullcontext(), torch.no_grad():
        model.generate(
            prompts, do_sample=False, max_new_tokens=n, min_new_tokens=n, synced_gpus=synced
        )
    return time.perf_counter() - start


def _case(rank, world, tmp, args, strategy):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if gpu:
        torch.cuda.set_device(rank)
    backend = "nccl" if gpu else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if gpu else torch.device("cpu")
        config = tiny_config(
            args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=8,
            max_position=args.tokens,
        )
        model = build_model(config, seed=0).to(device)
        n = sum(p.numel() for p in model.parameters())  # before sharding: the whole model
        wrapped = parallel.wrap(model, strategy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(
            args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(rank)
        )
        ids = ids.to(device)
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the gradients to count them
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        generation = [
            _generate(model, args, device, strategy == "fsdp", gather) for gather in (0, 1)
        ]
        params = list(model.parameters())
        held = torch.tensor(
            [
                _local_bytes(params),
                _local_bytes(p.grad for p in params),
                _local_bytes(
                    v
                    for s in optimizer.state.values()
                    for v in s.values()
                    if torch.is_tensor(v) and v.dim()
                ),
                statistics.median(times[1:]),
                *generation,
            ],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        if rank == 0:
            (Path(tmp) / "result.json").write_text(json.dumps([n, *held.tolist()]))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args()

    mb = 2**20
    print(
        "| strategy | ranks | parameters | weights MB/rank | grads MB/rank | AdamW MB/rank "
        "| total MB/rank | bytes/param/rank | step s | generate s | generate s, gathered |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for world in args.worlds:
        for strategy in parallel.STRATEGIES:
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_case, args=(world, tmp, args, strategy), nprocs=world)
                n, weights, grads, adam, step, gen, gen_gathered = json.loads(
                    (Path(tmp) / "result.json").read_text()
                )
            total = weights + grads + adam
            print(
                f"| {strategy} | {world} | {n / 1e6:.1f}M | {weights / mb:.1f} | {grads / mb:.1f} "
                f"| {adam / mb:.1f} | {total / mb:.1f} | {total / n:.2f} | {step:.3f} | {gen:.2f} "
                f"| {gen_gathered:.2f} |"
            )


if __name__ == "__main__":
    main()
