"""The `data` section of the configuration: which task, read from where, with which prompts.

It lives with the tasks, which read it; `entroprl.config` takes it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_PLAIN_TEMPLATE = "Question: {message}\nAnswer:"


@dataclass
class DataConfig:
    task: str = "countdown"
    """`countdown` (built in, generated) or `math` / `gsm8k` / `jsonl` (read from `train_file`)."""
    train_file: str | None = None
    """JSON lines, Parquet, or a `datasets.save_to_disk` directory (`tasks.math_problems`)."""
    test_file: str | None = None
    prompt_key: str | None = None
    """Question field; None: the format's (`question` for gsm8k and jsonl, `problem` for math)."""
    answer_key: str | None = None
    """Answer field; None: `answer` (math falls back to the last \\boxed{} of `solution`)."""
    train_size: int = 2000
    """Countdown problems generated for training (file tasks use `train_limit`)."""
    test_size: int = 200
    """Countdown problems generated for the held-out evaluation."""
    train_limit: int | None = None
    """Use only the first N usable rows of `train_file`; None: all."""
    test_limit: int | None = None
    reward: str | None = None
    """`math` or `gsm8k`; or your own function, `module:function`, with TRL's reward signature
    (`entroprl.tasks.custom_reward`); None: the task's own (gsm8k for gsm8k, math for math and
    jsonl, the Countdown verifier for countdown)."""
    reward_timeout: float = 60.0
    """Seconds your own reward function (`data.reward: module:function`) may take for one batch
    before its sandbox process is killed and the run stops."""
    instruction: str = DEFAULT_INSTRUCTION
    """Appended to every question on a new line; empty for none."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template when it has one."""
    plain_template: str = DEFAULT_PLAIN_TEMPLATE
    """Prompt without a chat template; `{message}` is the question and the instruction."""
    max_prompt_chars: int = 16_000
    """File tasks: questions longer than this (in characters) are left out, and reported, before
    any tokenizer sees them (a 10 MB question exhausted memory inside the tokenizer)."""
    seed: int = 0
    """Seed of the generated Countdown problems (file tasks are read in file order)."""
