"""Time training steps of the demo configuration: rollout and update throughput, and the cost of
the exact covariance selection (one extra no-grad forward per mini-batch, algorithms.md §3) against
`cov_logp=old`.

    python benchmarks/bench_train_step.py [--steps 5] [--untrained]

Prints a markdown table; each row is the median over the measured steps (the first step is a
warm-up and is dropped).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from entroprl.config import config_from_dict
from entroprl.demo.race import _merge, demo_config
from entroprl.train.trainer import Trainer

VARIANTS = {
    "grpo (ppo)": {"algorithm": {"policy_loss": "ppo"}},
    "clip_cov, cov_logp=exact": {"algorithm": {"policy_loss": "clip_cov", "cov_logp": "exact"}},
    "clip_cov, cov_logp=old": {"algorithm": {"policy_loss": "clip_cov", "cov_logp": "old"}},
    "kl_cov, cov_logp=exact": {"algorithm": {"policy_loss": "kl_cov", "cov_logp": "exact"}},
    "kl_cov, cov_logp=old": {"algorithm": {"policy_loss": "kl_cov", "cov_logp": "old"}},
}


def policy(untrained: bool):
    if untrained:
        from entroprl.demo.models import build_model, tiny_config
        from entroprl.demo.tokenizer import build_char_tokenizer
        from entroprl.demo.warmstart import WarmStartConfig

        ws = WarmStartConfig()
        tok = build_char_tokenizer()
        config = tiny_config(
            len(tok),
            hidden_size=ws.hidden_size,
            num_layers=ws.num_layers,
            num_heads=ws.num_heads,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
        )
        return build_model(config, seed=0), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entroprl.demo.warmstart import WarmStartConfig, default_cache_dir, warm_start

    path = warm_start(WarmStartConfig(), default_cache_dir())
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo uses 1)")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="a fresh model of the demo's size instead of the warm start",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, overrides in VARIANTS.items():
        model, tok = policy(args.untrained)
        with tempfile.TemporaryDirectory() as out:
            values = _merge(demo_config(), overrides)
            values = _merge(
                values,
                {
                    "trainer": {
                        "out_dir": out,
                        "eval_every": 0,
                        "progress": False,
                        "report_to": [],
                        "rollout_samples": 0,
                        "steps": args.steps + 1,
                    }
                },
            )
            trainer = Trainer(config_from_dict(values), model=model, tokenizer=tok)
            steps = []
            for step in range(1, args.steps + 2):
                t = time.perf_counter()
                metrics = trainer.train_step(step)
                metrics["wall"] = time.perf_counter() - t
                steps.append(metrics)
        steps = steps[1:]

        def med(key, steps=steps):
            return statistics.median(m[key] for m in steps)

        rows.append(
            (
                name,
                med("wall"),
                med("timing_s/gen"),
                med("timing_s/update_actor"),
                med("perf/rollout_tokens_per_s"),
                med("perf/update_tokens_per_s"),
                med("response_length/mean"),
            )
        )
    print(
        f"threads: {torch.get_num_threads()}, steps measured: {args.steps}, "
        f"model: {'untrained' if args.untrained else 'warm start'}\n"
    )
    print("| variant | step s | rollout s | update s | rollout tok/s | update tok/s | resp len |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.0f} | "
            f"{r[6]:.1f} |"
        )


if __name__ == "__main__":
    main()
