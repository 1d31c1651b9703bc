"""The fused head (`model.fused_head`, `forward.fuse_head`): the log-probs, entropies and gradients
of the model's own logits, computed from its hidden states, in every form the trainer runs the
model (copies, LoRA, the shared prefix, a whole step), and refused for a model whose logits are not
its output layer's product."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from entroprl.errors import ConfigError
from entroprl.rollout.sampler import cache_keyword
from entroprl.train import forward
from entroprl.train.trainer import Trainer
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_shared_prefix import grouped_batch
from tests.test_trainer import SPLIT_TEST_SETTINGS, small_config


def _policy(tied: bool = True, seed: int = 1):
    model, tok = make_tiny_policy(seed=seed)
    if not tied:  # an output layer of its own, with a bias
        emb = model.get_input_embeddings().weight
        head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=True)
        head.weight.data.copy_(emb.detach())
        model.lm_head = head
        model.config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # away from the init's near-uniform logits
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.double(), tok


def _forward_and_grads(
    model, ids, attention, R, *, shared: bool, fused: bool, mask=None, columns=None
):
    """Log-probs, entropies and the parameters' gradients of a weighted loss over them (over the
    tokens of `mask` only, where given)."""
    weights = torch.randn(ids.shape[0], R, generator=torch.Generator().manual_seed(3))
    weights = weights.to(ids.device, next(model.parameters()).dtype)
    model.zero_grad()
    logp, entropy = forward.forward_log_probs(
        model,
        ids,
        attention,
        R,
        temperature=0.8,
        entropy_grad=True,
        shared_prefix=shared,
        fused_head=fused,
        columns=columns,
    )
    loss = logp * weights + entropy
    (loss if mask is None else loss * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy.detach(), grads


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_log_probs_entropies_and_gradients_equal_the_logits_path(tied, shared):
    model, tok = _policy(tied)
    fused = copy.deepcopy(model)
    forward.fuse_head(fused)
    R = 7
    ids, attention, _ = grouped_batch(tok, 3, R)
    want = _forward_and_grads(model, ids, attention, R, shared=shared, fused=False)
    got = _forward_and_grads(fused, ids, attention, R, shared=shared, fused=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    assert got[2].keys() == want[2].keys()
    assert ("lm_head.bias" in got[2]) == (not tied)
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_other_calls_run_the_models_own_forward_and_copies_keep_it():
    model, tok = _policy()
    plain = copy.deepcopy(model)
    forward.fuse_head(model)
    ids = torch.tensor([tok("1 2>3=", add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    # what the sampler and generate read of the forward: the model's own signature
    assert cache_keyword(model) == cache_keyword(plain)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tok.pad_token_id}
    assert torch.equal(model.generate(ids, **kwargs), plain.generate(ids, **kwargs))
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin  # a copy runs its own weights
    with torch.no_grad():
        twin.get_output_embeddings().weight.mul_(2)
    request = forward.HeadRequest(tokens=ids[:, 1:])
    ours = model(input_ids=ids, fused_head=request)[0]
    theirs = twin(input_ids=ids, fused_head=request)[0]
    assert not torch.allclose(ours, theirs)


def test_lora_adapters_get_the_same_gradients():
    pytest.importorskip("peft")
    from entroprl.train import lora

    model, tok = _policy()
    fused = copy.deepcopy(model)
    forward.fuse_head(fused)
    R = 5
    ids, attention, _ = grouped_batch(tok, 2, R)
    results = []
    for m, is_fused in ((model, False), (fused, True)):
        torch.manual_seed(4)  # the adapters' A: the same random start in both
        adapted = lora.attach(m, 4, 8.0, "all-linear")
        with torch.no_grad():  # LoRA's B starts at 0: move it, so that A has a gradient
            for name, p in adapted.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
        results.append(_forward_and_grads(adapted, ids, attention, R, shared=False, fused=is_fused))
    (logp, entropy, grads), (f_logp, f_entropy, f_grads) = results
    torch.testing.assert_close(f_logp, logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f_entropy, entropy, rtol=1e-10, atol=1e-10)
    assert grads.keys() == f_grads.keys() and all("lora_" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(f_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_steps_equal_those_of_the_logits_path(tmp_path, monkeypatch, checkpointing):
    """Two whole steps (rollout, old log-probs, the update over micro-batches, the entropy bonus)
    with the fused head: the same weights and logged values, for updates that move them; with the
    decoder layers' activations recomputed in the backward too (model.gradient_checkpointing)."""
    calls = {"logits": [0, 0], "linear": [0, 0]}  # per run: the passes through each path
    for path in calls:
        name = "logprobs_and_entropy" if path == "logits" else "linear_logprobs_and_entropy"
        original = getattr(forward, name)

        def counted(*args, path=path, original=original, **kwargs):
            calls[path][len(results)] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(forward, name, counted)
    results = []
    for fused in (False, True):
        model, tok = make_tiny_policy()
        config = small_config(
            tmp_path / str(fused),
            algorithm={
                "policy_loss": "clip_cov",
                "loss": SPLIT_TEST_SETTINGS,
                "entropy_coef": 0.01,
            },
            model={"fused_head": fused, "gradient_checkpointing": checkpointing},
            optim={"mini_batch_size": 8, "micro_batch_size": 4, "epochs": 2},
            trainer={"eval_every": 0, "entropy_change_every": 1},
        )
        trainer = Trainer(config, model=model, tokenizer=tok)
        trainer.score = alternating_scores
        metrics = [trainer.train_step(1), trainer.train_step(2)]
        weights = torch.cat([p.detach().flatten() for p in trainer.actor.model.parameters()])
        results.append((metrics, weights))
    (full, w_full), (fused, w_fused) = results
    # every pass of the fused run went through the fused head (the logits path: its check alone)
    assert calls["logits"][0] > 10 and calls["linear"][0] == 0
    assert calls == {"logits": [calls["logits"][0], 1], "linear": [0, calls["logits"][0] + 1]}
    initial = torch.cat([p.detach().flatten() for p in make_tiny_policy()[0].parameters()])
    assert full[1]["actor/grad_norm"] > 0 and (w_full - initial).abs().max() > 1e-4
    torch.testing.assert_close(w_fused, w_full, atol=1e-6, rtol=1e-5)
    for step in range(2):
        for key, value in full[step].items():
            if not key.startswith(("timing_s/", "perf/")):
                assert fused[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_a_run_resumes_with_the_fused_head_turned_on(tmp_path):
    """What a run that ran out of memory does (`entroprl.train.out_of_memory`): resume with the
    fused head on, accepted without --allow-config-change, from the same weights."""
    for steps, fused in ((2, False), (3, True)):
        model, tok = make_tiny_policy()
        config = small_config(
            tmp_path,
            model={"fused_head": fused},
            trainer={"steps": steps, "save_every": 1, "eval_every": 0},
        )
        trainer = Trainer(config, model=model, tokenizer=tok)
        trainer.score = alternating_scores
        trainer.train(resume=fused)
        if not fused:
            saved = [p.detach().clone() for p in trainer.actor.model.parameters()]
    assert trainer.step == 3
    now = trainer.actor.model.parameters()
    moved = [(p.detach() - q).abs().max() for p, q in zip(now, saved, strict=True)]
    assert max(moved) > 0  # step 3 trained on from the checkpoint


@pytest.mark.parametrize(
    ("field", "value"),
    [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625), ("logits_scaling", 8.0)],
)
def test_a_model_that_transforms_its_logits_is_refused_by_its_config(field, value):
    model, _ = make_tiny_policy()
    setattr(model.config, field, value)
    with pytest.raises(ConfigError, match=rf"model\.fused_head: .*{field}={value}"):
        forward.fuse_head(model)


def test_the_check_compares_without_dropout():
    """A model with dropout, in training mode: the check draws none, and leaves the mode."""
    model, _ = make_tiny_policy()
    model.config.attention_dropout = 0.9
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.9
    model.train()
    forward.fuse_head(model)
    assert model.training


def test_a_model_whose_logits_differ_is_refused_by_the_check():
    """A forward that scales its logits, undeclared in its config: the check on a few tokens
    finds the fused head's results off the model's own."""
    model, _ = make_tiny_policy()
    original = type(model).forward

    class Scaled(type(model)):
        def forward(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            out.logits = out.logits * 3
            return out

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    model.__class__ = Scaled
    with pytest.raises(ConfigError, match=r"model\.fused_head: on 6 tokens, .* differ"):
        forward.fuse_head(model)


def test_a_model_without_a_linear_head_is_refused():
    model, _ = make_tiny_policy()
    model.lm_head = torch.nn.Identity()
    with pytest.raises(ConfigError, match=r"model\.fused_head: .*Identity"):
        forward.fuse_head(model)


TINY_BENCHMARK = [
    "--vocab",
    "500",
    "--hidden",
    "64",
    "--shapes",
    "2x8",
    "--dtypes",
    "float32",
    "--repeats",
    "1",
]


def run_benchmark(script: str, *args: str, timeout: float) -> str:
    """Run benchmarks/`script` with `args` from the repository root with entroprl from src/;
    its standard output, once it has exited 0."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_the_benchmark_runs():
    """benchmarks/bench_fused_head.py, tiny: a row per mode, each case in its own process."""
    out = run_benchmark("bench_fused_head.py", *TINY_BENCHMARK, timeout=300)
    rows = [line for line in out.splitlines() if line.startswith(("| grad", "| no_grad"))]
    assert len(rows) == 2
