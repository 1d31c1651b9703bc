"""An allocation that fails in a phase of a run is an error naming that phase's settings, with
their values, and the options that save memory where they are off; on the command line, one
line. Any other error passes through as it was."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml

from entroprl import cli
from entroprl.demo.models import save_model
from entroprl.train import actor, distributed, out_of_memory
from entroprl.train.out_of_memory import OutOfMemory
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config

CUDA_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of 79 GiB"
)

IN_SAMPLING = torch.is_inference_mode_enabled  # the sampler decodes in inference mode


def in_no_grad_pass() -> bool:
    return not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _failing_forward(monkeypatch, model, when, error=None):
    """`model`'s class runs out of memory in its forwards where `when()` holds."""
    forward = type(model).forward

    @functools.wraps(forward)  # the same signature: the sampler reads it
    def failing(self, *args, **kwargs):
        if when():
            raise error or torch.OutOfMemoryError(CUDA_MESSAGE)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", failing)


def _trainer(tmp_path, **sections):
    model, tok = make_tiny_policy()
    sections.setdefault("trainer", {}).update(eval_every=0)
    return Trainer(small_config(tmp_path, **sections), model=model, tokenizer=tok), model


@pytest.mark.parametrize(
    "when, expected, absent",
    [
        (
            IN_SAMPLING,
            ["in the rollout", "rollout.generation_batch_size=256"],
            ["micro_batch", "fused_head"],
        ),
        (
            in_no_grad_pass,
            [
                "in the no-grad log-prob passes",
                "optim.log_prob_micro_batch_size=4",
                "model.fused_head=true",
            ],
            ["optim.micro_batch_size", "generation_batch_size", "gradient_checkpointing"],
        ),
        (
            torch.is_grad_enabled,
            [
                "in the update",
                "optim.micro_batch_size=4",
                "optim.micro_batch_tokens=N (a token budget per micro-batch)",
                "model.fused_head=true",
                "model.gradient_checkpointing=true",
            ],
            ["log_prob", "generation_batch_size"],
        ),
    ],
    ids=["rollout", "log_probs", "update"],
)
def test_each_phase_names_its_own_settings(tmp_path, monkeypatch, when, expected, absent):
    trainer, model = _trainer(tmp_path)
    _failing_forward(monkeypatch, model, when)
    with pytest.raises(OutOfMemory) as caught:
        trainer.train()
    message = str(caught.value)
    assert all(part in message for part in expected), message
    assert message.endswith(f"({CUDA_MESSAGE})")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert not any(other in message for other in absent), message


def test_the_evaluation_and_options_already_on(tmp_path, monkeypatch):
    """The evaluation names its samples; the options already on are not offered again, and
    the token budget is named with its value."""
    trainer, model = _trainer(
        tmp_path,
        model={"fused_head": True, "gradient_checkpointing": True},
        optim={"micro_batch_tokens": 512},
    )
    _failing_forward(monkeypatch, model, IN_SAMPLING)
    with pytest.raises(OutOfMemory, match=r"in the evaluation; lower trainer.eval_samples=2, "):
        trainer.validate()
    update = out_of_memory.advice("update", trainer.config)
    assert "optim.micro_batch_tokens=512" in update
    assert "fused_head" not in update and "gradient_checkpointing" not in update


def test_loading_the_policy_and_the_vllm_engine(tmp_path, monkeypatch):
    def no_room(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(actor.Actor, "__init__", no_room)
    with pytest.raises(OutOfMemory, match=r"loading the policy; lower model.dtype=float32 \("):
        _trainer(tmp_path)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # DDP over two ranks: FSDP shards
    ddp = small_config(tmp_path)
    assert "or save memory with trainer.strategy=fsdp" in out_of_memory.advice("policy", ddp)
    vllm = small_config(tmp_path, rollout={"backend": "vllm", "gpu_memory_utilization": 0.4})
    for phase in ("rollout", "update"):
        assert "rollout.gpu_memory_utilization=0.4" in out_of_memory.advice(phase, vllm)
    assert "generation_batch_size" not in out_of_memory.advice("rollout", vllm)


def test_other_errors_pass_through(tmp_path, monkeypatch):
    """Not an allocation: the error as it was (an overflow in a conversion is not memory)."""
    trainer, model = _trainer(tmp_path)
    error = RuntimeError("value cannot be converted to type at::Half without overflow")
    _failing_forward(monkeypatch, model, torch.is_grad_enabled, error)
    with pytest.raises(RuntimeError) as caught:
        trainer.train()
    assert caught.value is error


def test_the_command_line_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    model, tok = make_tiny_policy()
    values = small_config(tmp_path / "run", model={"path": str(tmp_path / "model")}).to_dict()
    save_model(model, tok, tmp_path / "model")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    _failing_forward(monkeypatch, model, torch.is_grad_enabled)
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", str(tmp_path / "run.yaml")])
    message = str(caught.value.code)
    assert message.startswith("entroprl: out of memory in the update; lower optim.micro_batch_size")
    assert "\n" not in message and CUDA_MESSAGE in message


def test_a_phase_inside_another_keeps_its_own_advice(tmp_path):
    """The CPU allocator's message ("can't allocate memory") names the inner phase's settings;
    the outer phase passes that error on rather than naming its own."""

    class Run:
        config = small_config(tmp_path)

        @out_of_memory.phase("update")
        def update(self):
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9"
            )

        @out_of_memory.phase("rollout")
        def step(self):
            self.update()

    with pytest.raises(OutOfMemory) as caught:
        Run().step()
    assert str(caught.value).startswith("out of memory in the update; lower optim.micro_batch_size")
    assert "rollout" not in str(caught.value)
    assert str(caught.value).endswith(
        "(DefaultCPUAllocator: can't allocate memory: you tried to allocate 9)"
    )
