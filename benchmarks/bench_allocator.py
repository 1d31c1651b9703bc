"""The trainer with and without `entroprl.train.allocator.keep_freed_memory` on vs_trl.py's job.

    python benchmarks/bench_allocator.py [--workloads h128 h256] [--repeats 2] [--steps 12]
        [--variants "" "model.compute_dtype=bfloat16,optim.shared_prefix=true"]

Each run is a fresh process (the allocator's settings are per process) training entroprl on
`vs_trl.py`'s job (its model, prompts, batch and loss settings) on 2 torch threads; "glibc default"
replaces `keep_freed_memory` with a no-op before the trainer starts. The two modes alternate; the
table gives, per mode, the median over steps 3.. and over repeats of the update and the generation
phase (`timing_s/update_actor`, `timing_s/gen`), in seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import vs_trl

MODES = ("glibc default", "kept")


def worker(args) -> None:
    import torch

    from entroprl.train import allocator

    torch.set_num_threads(args.threads)
    if args.worker == "glibc default":
        allocator.keep_freed_memory = lambda: False
    result = vs_trl.run_entroprl(args.model, args.steps, 0, args.override)
    print("RESULT " + json.dumps(result))


def launch(args, model: str, mode: str, overrides: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--worker", mode, "--model", model]
    command += ["--steps", str(args.steps), "--threads", str(args.threads)]
    command += [f"--override={o}" for o in overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", default=list(vs_trl.WORKLOADS), choices=vs_trl.WORKLOADS
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["", "model.compute_dtype=bfloat16,optim.shared_prefix=true"],
        help="entroprl runs, each a comma-separated list of key=value overrides ('' = defaults)",
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print("| workload | variant | allocator | update s | generation s | update vs default |")
    print("|---|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            model = str(Path(tmp) / name)
            vs_trl.build(model, *vs_trl.WORKLOADS[name])
            for variant in args.variants:
                overrides = [o for o in variant.split(",") if o]
                rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
                for repeat in range(args.repeats):
                    for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                        rows[mode] += launch(args, model, mode, overrides)["steps"][1:]
                update = {m: statistics.median(r["update"] for r in rows[m]) for m in MODES}
                for mode in MODES:
                    gen = statistics.median(r["generation"] for r in rows[mode])
                    ratio = update[MODES[0]] / update[mode]
                    print(
                        f"| {name} | {variant or 'defaults'} | {mode} | {update[mode]:.3f} "
                        f"| {gen:.3f} | {ratio:.2f}x |"
                    )


if __name__ == "__main__":
    main()
