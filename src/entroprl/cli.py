"""The `entroprl` command: train, eval, demo, analyze, compare, export.

    entroprl train CONFIG.yaml [key=value ...] [--resume | --overwrite]
    entroprl eval --model DIR --bench [NAME=]FORMAT:PATH [--bench ...]
    entroprl demo [--out DIR] [--methods A,B,...] [--seeds N] [--jobs N] [--threads N]
    entroprl analyze RUN [--out DIR] [--smooth N] [--min-points N] [--min-entropy-range NATS]
    entroprl compare RUN [RUN ...] [--out DIR] [--smooth N] [--pool] [--min-points N] ...
    entroprl export CHECKPOINT|RUN --out DIR

Under `torchrun`, `train` runs on every rank (NCCL on GPUs, gloo on CPU), the model replicated
(`trainer.strategy=ddp`) or sharded (`trainer.strategy=fsdp`). FSDP without torchrun runs as a
single-rank process group, for its mixed precision alone.

Every failure the user can act on (configuration, input files, the file system, a diverged run)
ends the command with one line naming the problem and a non-zero exit code: 2 for a command line
argparse rejects (`EXIT_USAGE`), 1 for everything found wrong after that (`EXIT_ERROR`), 130 when
Ctrl-C stopped it (`EXIT_INTERRUPTED`, as a shell reports SIGINT). Any other exception (a
ValueError from a shape check, say) is a bug of entroprl's, not the user's: it keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, NoReturn

from entroprl import __version__
from entroprl.errors import USER_ERRORS, ConfigError, InputError, Interrupted

EXIT_ERROR = 1
"""The configuration, an input file, the file system or the run itself is at fault; the message
says which. sys.exit with a message exits with it."""
EXIT_USAGE = 2
"""The command line itself is wrong (unknown command or option, a missing argument): argparse's."""
EXIT_INTERRUPTED = 130
"""Ctrl-C: 128 + SIGINT, what a shell reports for a command that SIGINT ended."""


def __getattr__(name: str):
    # `init_distributed` lived here; `entroprl.train.distributed.init` now, the old name kept for
    # one release (resolved on use: the distributed module imports torch)
    if name == "init_distributed":
        from entroprl import _moved
        from entroprl.train import distributed

        _moved.warn("entroprl.cli.init_distributed", "entroprl.train.distributed.init")
        return distributed.init
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quiet_thread_os_error(args: threading.ExceptHookArgs) -> None:
    """TensorBoard writes from a thread of its own; on a full or read-only disk that thread dies
    with an OSError, which the writer raises again in the main thread, reported there in one
    line: the thread's own traceback would only repeat it."""
    if not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)


def cmd_train(args: argparse.Namespace) -> None:
    from entroprl.config import load_config
    from entroprl.train import distributed
    from entroprl.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    distributed.init(config.trainer.strategy)
    try:
        out = Trainer(config).train(
            resume=args.resume,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )
        distributed.shutdown()
    finally:  # after an error no barrier: another rank may never reach it
        distributed.shutdown(wait_for_all=False)
    print(f"run directory: {out}")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``entroprl eval`` (read by `cmd_eval`)."""
    parser.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model: local directory or hub id (default: the config's model.path)",
    )
    parser.add_argument(
        "--bench",
        action="append",
        default=[],
        metavar="[NAME=]FORMAT:PATH",
        help="a benchmark file; FORMAT is gsm8k, math or jsonl (jsonl reads "
        "data.prompt_key / data.answer_key). Repeat for several.",
    )
    parser.add_argument(
        "--task",
        default=None,
        help="also evaluate this task's held-out set "
        "(data.test_file for gsm8k/math/jsonl); the default without --bench",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config for the other settings "
        "(prompt rendering, rollout.backend, rollout.max_new_tokens, ...)",
    )
    parser.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default=None,
        help="generation backend (rollout.backend): Hugging Face generate or vLLM",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=32,
        help="samples per problem on small benchmarks; 0: greedy only",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.6, help="sampling temperature of the samples"
    )
    parser.add_argument(
        "--small-max",
        type=int,
        default=100,
        help="benchmarks with at most this many problems are sampled",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate the first N problems of each benchmark only",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write results.json, results.md and the generations into this directory",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``entroprl eval``: load the model, evaluate the benchmarks, print the table, write `--out`.

    Returns the report. Settings not on the command line come from the config: the model's
    dtype and device, ``rollout.backend`` (hf or vllm), ``rollout.max_new_tokens``,
    ``rollout.top_p``, ``trainer.seed`` and the prompt rendering of ``data``.
    """
    from entroprl.config import load_config
    from entroprl.tasks.evaluation import format_table, write_report

    overrides = [
        *([f"model.path={args.model}"] if args.model else []),
        *([f"data.task={args.task}"] if args.task else []),
        *([f"rollout.backend={args.backend}"] if args.backend else []),
        *args.overrides,
    ]
    config = load_config(args.config, overrides)
    with contextlib.ExitStack() as stack:
        report, records = _evaluate(args, *_eval_policy(config, stack))
    report["model"] = config.model.path
    print(format_table(report))
    if args.out:
        print(f"results written to {write_report(report, records, args.out)}")
    return report


def _eval_policy(config, stack: contextlib.ExitStack) -> tuple[Any, Any, Any]:
    """(config, model, tokenizer) that `entroprl eval` samples with: the policy on its device, or
    for the vLLM engine, which loads `model.path` itself, no model. LoRA adapters are merged into
    their base model; for the engine into a temporary folder (removed when `stack` closes) that
    the returned config's `model.path` names."""
    from dataclasses import replace

    import torch
    from transformers import AutoTokenizer

    from entroprl.train import policy

    if config.rollout.backend != "vllm":
        model, tokenizer = policy.load_policy(config)
        return config, model.to(policy.pick_device(config.trainer.device)).eval(), tokenizer
    if config.model.path is None:
        raise ConfigError("model.path: rollout.backend=vllm needs a checkpoint directory")
    path = policy.model_dir(config.model.path)
    if not policy.is_adapter(path):
        return config, None, AutoTokenizer.from_pretrained(path)
    merged = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="entroprl-merged-")))
    policy.write_merged(path, merged, getattr(torch, config.model.dtype))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    return replace(config, model=replace(config.model, path=str(merged))), None, tokenizer


def _evaluate(args: argparse.Namespace, config, model, tokenizer) -> tuple[dict, dict]:
    """The report and per-sample records of `entroprl eval`'s benchmarks (`--bench`, and the
    task's held-out set with `--task` or without `--bench`)."""
    from entroprl.rollout.backend import make_backend
    from entroprl.tasks import math_problems
    from entroprl.tasks.base import Task
    from entroprl.tasks.evaluation import Benchmark, Protocol, load_benchmark, run_benchmarks
    from entroprl.tasks.registry import build_task

    d = config.data
    benchmarks = [load_benchmark(spec, d, tokenizer, limit=args.limit) for spec in args.bench]
    if args.task or not args.bench:
        if d.task in math_problems.FORMATS:
            if d.test_file is None:
                raise InputError(f"data.test_file: set it to evaluate task {d.task!r}")
            spec = f"{d.task}={d.task}:{d.test_file}"
            benchmarks.append(load_benchmark(spec, d, tokenizer, limit=args.limit or d.test_limit))
        else:
            task = build_task(d, tokenizer)
            test = task.test[: args.limit] if args.limit else task.test
            held_out = Task(task.name, [], test, task.reward_fn)
            benchmarks.append(Benchmark(task.name, held_out, None, f"task:{task.name}"))
    protocol = Protocol(
        samples=args.samples,
        temperature=args.temperature,
        top_p=config.rollout.top_p,
        max_new_tokens=config.rollout.max_new_tokens,
        small_max=args.small_max,
        prompts_per_call=config.rollout.generation_batch_size,
        seed=config.trainer.seed,
    )
    return run_benchmarks(make_backend(config, model, tokenizer), benchmarks, protocol)


def _law_criteria(args: argparse.Namespace):
    """`law.LawCriteria` from --min-points and --min-entropy-range, its defaults where not given
    (imported here: scipy, behind it, would slow every command's start)."""
    from entroprl.analysis.law import LawCriteria

    given = {"min_points": args.min_points, "min_entropy_range": args.min_entropy_range}
    return LawCriteria(**{k: v for k, v in given.items() if v is not None})


def cmd_analyze(args: argparse.Namespace) -> None:
    from entroprl.analysis.report import analyze_run

    report = analyze_run(
        args.run,
        args.out,
        fit_fraction=args.fit_fraction,
        smooth=args.smooth,
        entropy_key=args.entropy_key,
        accuracy_key=args.accuracy_key,
        criteria=_law_criteria(args),
    )
    print(f"report: {report}")


def cmd_compare(args: argparse.Namespace) -> None:
    from entroprl.analysis.comparison import compare_runs

    report = compare_runs(
        args.runs,
        args.out,
        fit_fraction=args.fit_fraction,
        smooth=args.smooth,
        pool=args.pool,
        entropy_key=args.entropy_key,
        accuracy_key=args.accuracy_key,
        criteria=_law_criteria(args),
    )
    print(f"report: {report}")


def cmd_export(args: argparse.Namespace) -> None:
    from entroprl.train import checkpoint, policy

    source, out = Path(args.checkpoint), Path(args.out)
    if out.exists():
        raise InputError(f"{out} exists: name a new folder for the exported model")
    if (source / "checkpoints").is_dir():  # a run: its newest valid checkpoint
        source, _, skipped = checkpoint.find_resumable(source / "checkpoints")
        for line in skipped:
            print(f"skipped checkpoint {line}")
        if source is None:
            raise InputError(f"{args.checkpoint}: no valid checkpoint to export")
    try:
        checkpoint.export_hf(source, out)
    except checkpoint.DamagedCheckpoint as e:
        raise InputError(f"{source}: {e}") from None
    merged = " with its LoRA adapters merged in" if policy.is_adapter(source / "model") else ""
    print(f"exported {source} to {out} (Hugging Face format{merged})")


def cmd_demo(args: argparse.Namespace) -> None:
    from entroprl.demo.race import run_demo

    run_demo(
        Path(args.out),
        steps=args.steps,
        methods=None if args.methods is None else args.methods.split(","),
        seeds=args.seeds,
        jobs=args.jobs,
        threads=args.threads,
    )


class _Help(argparse.RawDescriptionHelpFormatter):
    """The help as written, each option's default after its text where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entroprl", description=__doc__, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub.add_parser("train", help="RL-train a policy from a YAML config", **_HELP))
    p = sub.add_parser(
        "eval", help="evaluate a model on benchmark files or a task's test set", **_HELP
    )
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)
    _add_export(
        sub.add_parser(
            "export",
            help="a Hugging Face model folder from a checkpoint (a sharded FSDP one too)",
            **_HELP,
        )
    )
    _add_demo(
        sub.add_parser(
            "demo", help="watch GRPO collapse entropy and Clip-Cov/KL-Cov hold it", **_HELP
        )
    )
    p = sub.add_parser(
        "analyze",
        help="report: stages, entropy-performance law, forecast, "
        "covariance (entroprl, TRL, verl, TensorBoard or W&B logs)",
        **_HELP,
    )
    p.add_argument(
        "run",
        help="run directory, trainer_state.json, verl JSON lines or console output, "
        "TensorBoard events (file or folder), or W&B .csv (recognised by content)",
    )
    p.add_argument("--out", default=None, help="output directory (default: RUN/analysis)")
    p.set_defaults(func=cmd_analyze)
    q = sub.add_parser("compare", help="overlay several runs and tabulate their law fits", **_HELP)
    q.add_argument("runs", nargs="+", help="runs, in any format analyze reads")
    q.add_argument("--out", default="comparison", help="output directory")
    q.add_argument(
        "--pool",
        action="store_true",
        help="also fit the law on the runs of each method together (METHOD/seed_K: its seeds), "
        "with bootstrap intervals",
    )
    q.set_defaults(func=cmd_compare)
    for x in (p, q):
        _add_law_options(x)
    return parser


_HELP = {"formatter_class": _Help}


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-6")
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in trainer.out_dir from its newest valid checkpoint",
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in trainer.out_dir, if there is one, and start again",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even where settings that change the run (model, data, "
        "batch sizes, seed, algorithm, optimizer, dtypes) differ from those of its checkpoint; "
        "each segment's configuration is kept in the run directory",
    )
    p.set_defaults(func=cmd_train)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder, or a run (its newest valid checkpoint)")
    p.add_argument("--out", required=True, help="the new model folder")
    p.set_defaults(func=cmd_export)


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods, each raced with the same warm start and seeds and paired "
        "with grpo (entroprl.demo.race.METHODS; an unknown name lists them); default: "
        "entroprl.demo.race.DEFAULT_METHODS",
    )
    p.add_argument("--steps", type=int, default=None, help="RL steps per method")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (intervals need >= 2)")
    p.add_argument(
        "--jobs", type=int, default=None, help="runs at a time (default: cores / --threads)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.set_defaults(func=cmd_demo)


def _add_law_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fit-fraction",
        type=float,
        default=0.15,
        help="share of steps the forecast is fitted on",
    )
    p.add_argument(
        "--smooth",
        type=int,
        default=1,
        metavar="N",
        help="fit the law on the performance averaged over N neighbouring logged values "
        "(odd N, centered; for a noisy per-step reward); 1: as logged",
    )
    p.add_argument(
        "--entropy-key", default=None, help="the log's entropy metric, if the guess is wrong"
    )
    p.add_argument(
        "--accuracy-key", default=None, help="the log's accuracy metric, if the guess is wrong"
    )
    p.add_argument(
        "--min-points",
        type=int,
        default=None,
        help="fewest evaluations for the law or a forecast to be taken as holding "
        "(default: law.MIN_POINTS; docs/algorithms.md 9.5)",
    )
    p.add_argument(
        "--min-entropy-range",
        type=float,
        default=None,
        metavar="NATS",
        help="least span of the entropy over the points for the law to be taken as holding "
        "(default: law.MIN_ENTROPY_RANGE)",
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with EXIT_USAGE on a bad command line
    if getattr(args, "allow_config_change", False) and not args.resume:
        parser.error("--allow-config-change goes with --resume")
    threading.excepthook = _quiet_thread_os_error
    if args.command in ("train", "eval", "demo", "export"):
        from entroprl.train import progress

        progress.quiet_libraries_off_terminal()
    try:
        args.func(args)
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot cut this line
        message = str(e) if isinstance(e, Interrupted) else "interrupted"
        print(f"entroprl: {message}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except ConfigError as e:
        _fail(f"configuration error: {e}")
    except USER_ERRORS as e:  # bad input files (metrics, logs, datasets) name what is wrong
        _fail(str(e))
    except ImportError as e:
        _fail(str(e))
    except OSError as e:  # disk full, read-only, a file where a directory goes, ...
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}")
    except RecursionError:  # every reader of JSON and YAML names its file before this
        _fail("an input nested too deeply to be read")
    except (MemoryError, RuntimeError) as e:
        if _too_large(e):
            _fail(
                f"out of memory ({str(e).strip() or type(e).__name__}): lower "
                "rollout.prompts_per_step, rollout.n, rollout.max_new_tokens, "
                "optim.micro_batch_size, trainer.eval_samples or the data sizes"
            )
        raise


def _too_large(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed (`out_of_memory.allocation_failed`) or could
    not even be sized: a tensor size that overflows 64 bits (a count of 2**62 rows, say)."""
    from entroprl.train.out_of_memory import allocation_failed

    text = str(error)
    return (
        allocation_failed(error)
        or "overflow" in text.lower()
        or "cannot be represented as a SymInt" in text
    )


def _fail(message: str) -> NoReturn:
    """Exit with `EXIT_ERROR` and `message`, on one line, on stderr."""
    sys.exit(f"entroprl: {' '.join(message.strip().splitlines())}")


if __name__ == "__main__":
    main()
