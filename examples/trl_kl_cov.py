"""TRL's GRPO on Countdown with KL-Cov and entroprl's entropy diagnostics: a plain TRL script in
which two lines switch the plug-in on (README, door 2; docs/trl.md).

    python examples/trl_kl_cov.py                  # the demo's tiny model on the CPU, into out/
    python examples/trl_kl_cov.py --model Qwen/Qwen2.5-0.5B-Instruct
    entroprl analyze out/trainer_state.json       # then door 1

Without `--model` it trains the demo's warm-started tiny model (trained once and cached, under a
minute on a CPU), whose prompts are Countdown's own short format (`3 5 7>22=`); a chat model is
given the same text. The reward is TRL's reward-function signature over entroprl's exact verifier.
"""

import argparse

import torch
from datasets import Dataset

from entroprl.integrations.trl import CovGRPOConfig as GRPOConfig, CovGRPOTrainer as GRPOTrainer
from entroprl.tasks.countdown import CountdownProblem, countdown_reward, generate_problems


def countdown_dataset(n: int, split: str) -> Dataset:
    """`prompt` plus the columns TRL hands the reward function by name."""
    problems = generate_problems(n, seed=0, split=split)
    return Dataset.from_dict(
        {
            "prompt": [p.prompt for p in problems],
            "numbers": [list(p.numbers) for p in problems],
            "target": [p.target for p in problems],
        }
    )


def accuracy(prompts, completions, numbers, target, **kwargs) -> list[float]:
    """1 where the completion reaches the target with the given numbers, else 0 (named so that
    TRL logs `eval_rewards/accuracy/mean`, which `entroprl analyze` takes for the accuracy)."""
    return [
        countdown_reward(c, CountdownProblem(tuple(n), t))
        for c, n, t in zip(completions, numbers, target, strict=True)
    ]


def demo_model() -> str:
    """The demo's warm-started tiny Countdown model (trained on the first call, then cached)."""
    from entroprl.demo.warmstart import WarmStartConfig, default_cache_dir, warm_start

    return str(warm_start(WarmStartConfig(), default_cache_dir()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a model folder or hub id (default: demo's)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation period")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (tiny model: 1e-3)")
    cli = parser.parse_args()

    settings = dict(
        learning_rate=cli.lr,
        max_steps=cli.steps,
        per_device_train_batch_size=32,  # responses per optimizer step: 4 prompts x 8
        num_generations=8,
        max_completion_length=16,
        eval_strategy="steps",
        eval_steps=cli.eval_every,
        per_device_eval_batch_size=64,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        # KL-Cov's share of tokens and coefficient as the demo sets them for ~6-token responses
        kl_cov_ratio=0.2,
        kl_cov_coef=5.0,
    )
    args = GRPOConfig(output_dir="out", **settings, loss_type="kl_cov", steps_per_generation=4)
    trainer = GRPOTrainer(
        model=cli.model or demo_model(),
        reward_funcs=accuracy,
        args=args,
        train_dataset=countdown_dataset(2000, "train"),
        eval_dataset=countdown_dataset(64, "test"),
    )
    trainer.train()
    trainer.save_state()  # out/trainer_state.json: what `entroprl analyze` reads


if __name__ == "__main__":
    main()
