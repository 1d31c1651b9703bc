"""`data.reward: module:function`: a user's reward with TRL's signature, run bounded in a sandbox,
stopping the run with one line when it misbehaves."""

from __future__ import annotations

import pytest

from entroprl.config import config_from_dict
from entroprl.errors import ConfigError, RewardError
from entroprl.tasks.registry import build_task
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config

COMPLETIONS = ["1+2", "3*4-3", "9", "21"]
PROMPTS = ["1 2>3=", "12 3 4>9=", "5>5=", "2 1>3="]


def _task(reward, timeout=60.0):
    config = config_from_dict(
        {"data": {"train_size": 8, "test_size": 4, "reward": reward, "reward_timeout": timeout}}
    )
    return build_task(config.data)


def test_a_users_reward_scores_with_trls_signature():
    task = _task("tests.custom_rewards:has_a_one")
    assert task.score(COMPLETIONS, [None] * 4, PROMPTS) == [1.0, 0.0, 0.0, 1.0]
    task = _task("tests.custom_rewards:echoes_the_prompt")
    assert task.score(["1", "x", "5", "1"], [None] * 4, PROMPTS) == [1.0, 0.0, 1.0, 0.0]
    task = _task("tests.custom_rewards:none_for_some")
    assert task.score(COMPLETIONS, [None] * 4, PROMPTS) == [2.5, 0.0, 2.5, 0.0]  # None is 0


@pytest.mark.parametrize(
    "function, message",
    [
        ("raises", r"data\.reward=tests\.custom_rewards:raises raised .*KeyError: 'solution'"),
        ("one_short", r"returned 3 values; expected a list of 4 floats"),
        ("strings", r"returned a str at position 0; expected floats"),
    ],
)
def test_a_reward_that_misbehaves_stops_with_one_line(function, message):
    task = _task(f"tests.custom_rewards:{function}")
    with pytest.raises(RewardError, match=message):
        task.score(COMPLETIONS, [None] * 4, PROMPTS)


def test_a_reward_that_overruns_is_killed():
    task = _task("tests.custom_rewards:sleeps", timeout=1.0)
    with pytest.raises(RewardError, match=r"did not return within data\.reward_timeout=1 s"):
        task.score(COMPLETIONS, [None] * 4, PROMPTS)


@pytest.mark.parametrize(
    "reward, message",
    [
        ("tests.no_such_module:fn", "cannot load it.*ModuleNotFoundError"),
        ("tests.custom_rewards:missing", "cannot load it.*AttributeError"),
        ("tests.custom_rewards:NOT_A_FUNCTION", "is not a function"),
        ("not a spec:x y", "expected module:function"),
    ],
)
def test_a_reward_that_cannot_load_is_a_config_error(reward, message):
    with pytest.raises(ConfigError, match=rf"data\.reward=.*{message}"):
        _task(reward)


def test_the_trainer_trains_on_a_users_reward(tmp_path):
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path / "run",
        data={"reward": "tests.custom_rewards:has_a_one"},
        trainer={"steps": 2, "eval_every": 2},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    start = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    # an untrained model rarely writes a correct Countdown answer, but often a "1"
    assert any(not (a == p).all() for a, p in zip(start, model.parameters(), strict=True))
    assert trainer.validate()["val-core/countdown/acc/mean@2"] > 0
