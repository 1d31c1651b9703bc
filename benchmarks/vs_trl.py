"""entroprl against TRL's `GRPOTrainer` on the same job, one after the other (issue 13).

    .venv-trl/bin/python benchmarks/vs_trl.py [--workloads h128 h256] [--repeats 3] [--steps 20]
        [--trl-bf16] [--lora R] [--variants "" "model.compute_dtype=bfloat16" ...]

Run it in an environment with both packages (`pip install -e '.[trl]'`: .venv-trl). The job: a
random-init tiny Qwen2 (hidden 128 or 256, 4 layers, head_dim 32, the char vocabulary) saved once
and loaded by both; the built-in Countdown task's prompts (the same strings for both, with its
verifier as the reward); 16 prompts x 8 completions per step, up to 24 new tokens, temperature 1,
one optimizer step per rollout step (one mini-batch of 128, one forward/backward of 128), token-mean
loss (TRL's `dapo`), no KL, lr 1e-6, no gradient checkpointing (TRL's default has it). entroprl
runs with its defaults otherwise (diagnostics on: entropy, covariances, predicted entropy change,
the measured change every 10 steps), plus each `--variants` entry. `--trl-bf16` adds a TRL run with
`bf16=True` (accelerate's autocast); the ratios stay against TRL in float32. `--lora R` adds LoRA
adapters of rank R on every linear layer of both (alpha 16, no dropout: TRL given peft's
`LoraConfig`, entroprl `model.lora_rank=R`; needs peft), compared with each other.

Each run is a fresh process with 2 torch threads; the frameworks alternate (which goes first
alternates by repeat). A step's time is the wall time between the ends of consecutive steps
(everything in the loop: logging included); the table gives the median over steps 3..steps and the
completion tokens per second (mean completion tokens per step / median step time), each the median
over repeats. Phases (median over steps and repeats, seconds per step): entroprl's own timings
(`timing_s/*`; "other" = metrics, entropy-change measurement and logging); TRL's methods wrapped
(generation = `_generate`, prepare = the rest of `_generate_and_score_completions`: rewards,
advantages, old log-probs when computed; loss = `compute_loss`; backward; other = optimizer,
scheduler, logging).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {"h128": (128, 4), "h256": (256, 4)}
PROMPTS, N, NEW_TOKENS, LR = 16, 8, 24, 1e-6


def build(path: str, hidden: int, layers: int) -> None:
    from _common import char_model_config

    from entroprl.demo.models import build_model, save_model
    from entroprl.demo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    config = char_model_config(tok, hidden, layers)
    save_model(build_model(config, seed=0), tok, path)


def countdown():
    from entroprl.config import Config
    from entroprl.tasks.registry import build_task

    return build_task(Config().data)


class Timer:
    """Sums the wall time spent in wrapped callables, per name, for the current step."""

    def __init__(self):
        self.current: dict[str, float] = {}

    def wrap(self, obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out, self.current = self.current, {}
        return out


def run_trl(model_dir: str, steps: int, seed: int, bf16: bool, lora_rank: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    task = countdown()
    answers = {e.prompt: e.answer for e in task.train}

    def reward(completions, prompts, **kwargs):
        return task.score(completions, [answers[p] for p in prompts])

    timer, ends, phases, tokens = Timer(), [], [], []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            phases.append(timer.take())

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=PROMPTS * N,
            num_generations=N,
            max_completion_length=NEW_TOKENS,
            temperature=1.0,
            top_p=1.0,
            learning_rate=LR,
            beta=0.0,
            loss_type="dapo",
            num_iterations=1,
            gradient_accumulation_steps=1,
            # TRL's default recomputes the forward in the backward to save memory; entroprl's
            # does not (model.gradient_checkpointing=false), and these models need no saving
            gradient_checkpointing=False,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=bf16,  # accelerate's autocast on the CPU
            seed=seed,
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": [e.prompt for e in task.train]}),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            callbacks=[StepEnds()],
            peft_config=lora_config(lora_rank),
        )
        timer.wrap(trainer, "_generate", "generation")
        timer.wrap(trainer, "_generate_and_score_completions", "prepare")
        timer.wrap(trainer, "compute_loss", "loss")
        timer.wrap(trainer.accelerator, "backward", "backward")
        score = trainer._generate_and_score_completions

        def counting(*a, **kw):
            out = score(*a, **kw)
            tokens.append(int(out["completion_mask"].sum()))
            return out

        trainer._generate_and_score_completions = counting
        trainer.train()
    rows = []
    for i in range(1, len(ends)):
        p = phases[i]
        step = ends[i] - ends[i - 1]
        prepare = p.get("prepare", 0.0) - p.get("generation", 0.0)
        rows.append(
            {
                "step": step,
                "generation": p.get("generation", 0.0),
                "prepare": prepare,
                "loss": p.get("loss", 0.0),
                "backward": p.get("backward", 0.0),
                "other": step - p.get("prepare", 0.0) - p.get("loss", 0.0) - p.get("backward", 0.0),
            }
        )
    return {"steps": rows, "tokens": tokens[1:]}


def lora_config(rank: int):
    """peft's configuration of the adapters entroprl's model.lora_rank makes; None for rank 0."""
    if not rank:
        return None
    from peft import LoraConfig

    settings = {"lora_alpha": 16.0, "target_modules": "all-linear", "lora_dropout": 0.0}
    return LoraConfig(r=rank, task_type="CAUSAL_LM", **settings)


def run_entroprl(model_dir: str, steps: int, seed: int, overrides: list[str]) -> dict:
    from entroprl.config import load_config
    from entroprl.train.distributed import init as init_distributed
    from entroprl.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            overrides=[
                f"model.path={model_dir}",
                f"rollout.prompts_per_step={PROMPTS}",
                f"rollout.n={N}",
                f"rollout.max_new_tokens={NEW_TOKENS}",
                "algorithm.policy_loss=ppo",
                "algorithm.loss_agg_mode=token-mean",
                "algorithm.kl_coef=0",
                f"optim.lr={LR}",
                f"optim.mini_batch_size={PROMPTS * N}",
                f"optim.micro_batch_size={PROMPTS * N}",
                f"trainer.steps={steps}",
                f"trainer.seed={seed}",
                f"trainer.out_dir={out}",
                "trainer.eval_every=0",
                f"trainer.save_every={steps + 1}",
                "trainer.device=cpu",
                "trainer.progress=false",
                *overrides,
            ]
        )
        ends, metrics = [], []
        init_distributed(config.trainer.strategy)  # as `entroprl train` does: FSDP in one process
        trainer = Trainer(config)
        step_fn = trainer.train_step

        def timed(step):
            out = step_fn(step)
            ends.append(time.perf_counter())
            metrics.append(out)
            return out

        trainer.train_step = timed
        trainer.train()
    rows = []
    for i in range(1, len(ends)):
        m = metrics[i]
        step = ends[i] - ends[i - 1]
        phases = {
            "generation": m["timing_s/gen"],
            "reward": m["timing_s/reward"],
            "old_log_prob": m["timing_s/old_log_prob"],
            "update": m["timing_s/update_actor"],
        }
        rows.append({"step": step, **phases, "other": step - sum(phases.values())})
    tokens = [round(m["response_length/mean"] * PROMPTS * N) for m in metrics]
    return {"steps": rows, "tokens": tokens[1:]}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "trl":
        lora = next((int(o[5:]) for o in args.override if o.startswith("lora=")), 0)
        bf16 = "bf16" in args.override
        result = run_trl(args.model, args.steps, args.seed, bf16, lora_rank=lora)
    else:
        result = run_entroprl(args.model, args.steps, args.seed, args.override)
    print("RESULT " + json.dumps(result))


def launch(args, model: str, framework: str, overrides: list[str], seed: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--worker", framework, "--model", model]
    command += ["--steps", str(args.steps), "--seed", str(seed), "--threads", str(args.threads)]
    command += [f"--override={o}" for o in overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{framework} run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarize(runs: list[dict], first: int) -> dict:
    """Median step time over steps first.. and tokens/s per run, then the median over runs; the
    phases' medians over all those steps."""
    times, rates, phases = [], [], {}
    for run in runs:
        rows = run["steps"][first - 2 :]  # rows start at step 2
        tokens = run["tokens"][first - 2 :]
        median = statistics.median(r["step"] for r in rows)
        times.append(median)
        rates.append(statistics.mean(tokens) / median)
        for row in rows:
            for key, value in row.items():
                if key != "step":
                    phases.setdefault(key, []).append(value)
    return {
        "step": statistics.median(times),
        "tok_s": statistics.median(rates),
        "phases": {k: statistics.median(v) for k, v in phases.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[""],
        help="entroprl runs, each a comma-separated list of key=value overrides ('' = defaults)",
    )
    parser.add_argument(
        "--trl-bf16",
        action="store_true",
        help="also run TRL with bf16=True (autocast), against entroprl's model.compute_dtype",
    )
    parser.add_argument(
        "--lora",
        type=int,
        default=0,
        help="also run both with LoRA adapters of this rank (compared with each other)",
    )
    parser.add_argument("--worker", choices=("trl", "entroprl"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            model = str(Path(tmp) / name)
            build(model, *WORKLOADS[name])
            jobs = [("trl", "")] + [("trl", "bf16")] * args.trl_bf16
            jobs += [("entroprl", v) for v in args.variants]
            if args.lora:
                jobs += [("trl", f"lora={args.lora}"), ("entroprl", f"model.lora_rank={args.lora}")]
            runs: dict[tuple[str, str], list[dict]] = {job: [] for job in jobs}
            for repeat in range(args.repeats):
                order = jobs if repeat % 2 == 0 else jobs[::-1]
                for framework, variant in order:
                    overrides = [o for o in variant.split(",") if o]
                    runs[framework, variant].append(
                        launch(args, model, framework, overrides, repeat)
                    )
            trl = summarize(runs["trl", ""], 3)
            trl_lora = summarize(runs["trl", f"lora={args.lora}"], 3) if args.lora else None
            for job in jobs:
                s = summarize(runs[job], 3)
                against = trl_lora if "lora" in job[1] else trl
                table.append((name, job, s, s["tok_s"] / against["tok_s"]))
    print(f"\n{args.repeats} repeats, {args.threads} threads, median over steps 3-{args.steps}\n")
    # a LoRA run's ratio is against TRL's LoRA run
    print("| workload | run | s/step | completion tok/s | vs TRL | phases (s/step) |")
    print("|---|---|---:|---:|---:|---|")
    for name, (framework, variant), s, ratio in table:
        label = framework + (f" {variant}" if variant else "")
        phases = ", ".join(f"{k} {v:.3f}" for k, v in s["phases"].items())
        print(
            f"| {name} | {label} | {s['step']:.3f} | {s['tok_s']:.0f} | {ratio:.2f}x | {phases} |"
        )


if __name__ == "__main__":
    main()
