"""LoRA through peft (`model.lora_rank`): only the adapters train, the diagnostics are those of
the adapted policy, the reference of kl_coef is the model with its adapters off, and a run saved
as an adapter resumes exactly."""

from __future__ import annotations

import pytest
import torch

from entroprl.errors import ConfigError
from entroprl.train import lora
from entroprl.train.forward import forward_log_probs
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_trainer import small_config

pytest.importorskip("peft")

LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def _train(out, steps, resume=False, **sections):
    model, tok = make_tiny_policy()
    config = small_config(
        out,
        model=LORA,
        trainer={"steps": steps, "save_every": 1, "eval_every": 0, "report_to": []},
        **sections,
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    trainer.score = alternating_scores
    trainer.train(resume=resume)
    return trainer


def test_only_the_adapters_train_and_the_diagnostics_are_logged(tmp_path):
    base, _ = make_tiny_policy()
    trainer = _train(tmp_path / "run", 2, algorithm={"kl_coef": 0.1})
    named = dict(trainer.actor.model.named_parameters())
    adapters = {n: p for n, p in named.items() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    frozen = {n: p for n, p in named.items() if "lora_" not in n}
    assert all(not p.requires_grad for p in frozen.values())
    # the base weights are the untouched initial ones; the adapters moved
    for name, value in base.state_dict().items():
        key = f"base_model.model.{name}".replace(".weight", ".base_layer.weight")
        mine = named.get(key, named.get(f"base_model.model.{name}"))
        if mine is not None:
            assert torch.equal(mine.detach(), value), name
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for key in ("actor/entropy", "cov/all", "dynamics/predicted_entropy_change", "actor/kl_loss"):
        assert key in records[-1], key
    assert records[-1]["actor/kl_loss"] > 0
    # the reference is the base model itself: its log-probs with the adapters off, exactly
    assert trainer.actor.ref_model is None  # no second copy of the model
    ids = torch.randint(3, 20, (4, 10))
    mask = torch.ones_like(ids)
    with lora.reference(trainer.actor.forward_model) as reference:
        theirs, _ = forward_log_probs(reference, ids, mask, 5)
    ours, _ = forward_log_probs(base, ids, mask, 5)
    assert torch.equal(theirs, ours)
    adapted, _ = forward_log_probs(trainer.actor.forward_model, ids, mask, 5)
    assert not torch.equal(adapted, ours)
    saved = tmp_path / "run" / "checkpoints" / "step_000002" / "model"
    assert (saved / "adapter_model.safetensors").is_file()
    assert (saved / "adapter_config.json").is_file()


def test_a_lora_run_resumes_exactly(tmp_path):
    straight = _train(tmp_path / "a", 3)
    _train(tmp_path / "b", 2)
    resumed = _train(tmp_path / "b", 3, resume=True)
    a, b = (dict(t.actor.model.named_parameters()) for t in (straight, resumed))
    moved = [n for n in a if "lora_" in n]
    assert moved and all(torch.equal(a[n], b[n]) for n in a)


def test_lora_with_fsdp_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.lora_rank.*strategy=ddp"):
        small_config(tmp_path, model=LORA, trainer={"strategy": "fsdp"})


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_merged_tensors_are_peft_merged_models_and_leave_the_adapters(targets):
    """What the vLLM backend loads: the names and layout of the base model's state dict, the
    values of peft's own merge (`merge_and_unload` on a copy), the policy itself unchanged."""
    import copy

    base, _ = make_tiny_policy(hidden=32, layers=2)
    original = {n: t.clone() for n, t in base.state_dict().items()}
    names = list(original)
    model = lora.attach(base, rank=4, alpha=8.0, targets=targets)  # changes `base` in place
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters that change the weights (peft starts B at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = dict(lora.merged_tensors(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert list(merged) == names == list(expected)
    changed = [n for n in names if not torch.equal(merged[n], original[n])]
    assert changed and all("proj" in n for n in changed)
    for name in names:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items())
