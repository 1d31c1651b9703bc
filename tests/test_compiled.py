"""`model.compile` (`entroprl.train.compiled`): compiled decoder layers train as the eager ones do,
sampling compiles nothing, and FSDP is refused."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from entroprl.errors import ConfigError
from entroprl.train import parallel
from entroprl.train.trainer import Trainer
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_trainer import SPLIT_TEST_SETTINGS, small_config


def _steps(tmp_path, compile_: bool, **model):
    model_config = {"compile": compile_} | model
    config = small_config(
        tmp_path / str(compile_),
        algorithm={"policy_loss": "clip_cov", "loss": SPLIT_TEST_SETTINGS, "entropy_coef": 0.01},
        model=model_config,
        optim={"mini_batch_size": 8, "micro_batch_size": 4},
        trainer={"eval_every": 0, "entropy_change_every": 1},
    )
    policy, tok = make_tiny_policy()
    trainer = Trainer(config, model=policy, tokenizer=tok)
    trainer.score = alternating_scores

    def weights():
        return torch.cat([p.detach().flatten() for p in trainer.actor.model.parameters()])

    start = weights()
    metrics = [trainer.train_step(1), trainer.train_step(2)]
    assert (weights() - start).abs().max() > 1e-4  # the steps moved the weights
    return trainer, metrics, weights()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", [{}, {"fused_head": True}, {"lora_rank": 4}], ids=["plain", "fused", "lora"]
)
def test_compiled_layers_train_as_the_eager_ones(tmp_path, model):
    """Two whole steps (rollout, old log-probs, the update, the entropy change): the weights and
    logged values of the eager run, to the compiler's float rounding; with the fused head, and
    with LoRA adapters inside the compiled layers."""
    if model.get("lora_rank"):
        pytest.importorskip("peft")
    torch._dynamo.reset()
    _, eager, w_eager = _steps(tmp_path, False, **model)
    trainer, compiled, w_compiled = _steps(tmp_path, True, **model)
    layers = parallel.decoder_layers(trainer.actor.forward_model)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert counters["stats"]["unique_graphs"] > 0  # the training passes ran compiled code
    torch.testing.assert_close(w_compiled, w_eager, atol=1e-5, rtol=1e-4)
    for step in range(2):
        for key, value in eager[step].items():
            if not key.startswith(("timing_s/", "perf/")):
                assert compiled[step][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_sampling_compiles_nothing_and_the_passes_do(tmp_path):
    """The rollout backend samples from the compiled layers eagerly (no graph made); a log-prob
    pass then compiles and runs them."""
    torch._dynamo.reset()
    counters.clear()
    config = small_config(tmp_path, model={"compile": True}, trainer={"eval_every": 0})
    policy, tok = make_tiny_policy()
    trainer = Trainer(config, model=policy, tokenizer=tok)
    batch = trainer.backend.generate(
        ["1 2>3=", "5>5="], n=2, temperature=1.0, top_p=1.0, max_new_tokens=4
    )
    assert counters["stats"]["unique_graphs"] == 0
    trainer.actor.entropy(batch)
    assert counters["stats"]["unique_graphs"] > 0


def test_compile_is_refused_with_fsdp(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.compile"):
        small_config(tmp_path, model={"compile": True}, trainer={"strategy": "fsdp"})
