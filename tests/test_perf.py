"""entroprl.train.perf: verl's FLOP count against the model's own matrices and a count by hand,
the step's perf/ figures by hand, and what a training step logs. (Against verl's own counter:
tests/test_verl_integration.py.)"""

import math

import pytest
import torch
from transformers import GPT2Config, Qwen3MoeConfig

from entroprl.demo.models import build_model, tiny_config
from entroprl.train import perf
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config


def _layer_matrices(model) -> int:
    """The weights of the decoder layers' linear maps (no biases, no norms)."""
    return sum(
        m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dense_count_is_the_models_own_matrices_and_the_embedding_twice(arch, kv_heads):
    config = tiny_config(50, hidden_size=32, num_layers=3, num_heads=4, arch=arch)
    config.num_key_value_heads = kv_heads
    model = build_model(config, seed=0)
    counted = perf.flops_model(model.config)
    embedding = model.get_input_embeddings().weight.numel()
    assert counted.dense == _layer_matrices(model) + 2 * embedding
    assert counted.attention == 8 * 4 * 3  # head_dim x heads x layers


def test_mixture_of_experts_counts_the_experts_a_token_runs_and_the_router():
    config = Qwen3MoeConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=64,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        num_experts=6,
        num_experts_per_tok=2,
    )
    counted = perf.flops_model(config)
    # by hand: q and o 16 x 16, k and v 16 x 8; two experts of 3 x 16 x 8, a 16 x 6 router
    per_layer = (2 * 256 + 2 * 128) + 2 * 3 * 16 * 8 + 16 * 6
    assert counted.dense == 2 * per_layer + 2 * 50 * 16
    assert counted.attention == 4 * 4 * 2


def test_an_uncounted_model_type_has_no_count():
    assert perf.flops_model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20)) is None


def test_training_flops_by_hand():
    model = perf.FlopsModel(dense=1000, attention=24)
    tokens = perf.TokenCounts(sampled=0, in_loss=0, total=8, squares=3**2 + 5**2)
    assert model.training_flops(tokens) == 6 * 1000 * 8 + 6 * 24 * 34


def test_token_counts_of_the_rows_kept():
    attention_mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]])
    train_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    kept = torch.tensor([True, True, False])
    counts = perf.TokenCounts.over_ranks(torch.tensor(7), attention_mask, train_mask, kept)
    assert counts == perf.TokenCounts(sampled=7, in_loss=3, total=8, squares=9 + 25)


def test_step_metrics_by_hand():
    tokens = perf.TokenCounts(sampled=300, in_loss=200, total=500, squares=25_000)
    times = perf.StepTimes(step=10.0, generation=4.0, update=2.0)
    flops = perf.FlopsModel(dense=10**9, attention=1000)
    m = perf.step_metrics(tokens, times, world=2, sweeps=3, flops=flops, peak_tflops=100.0)
    assert m["perf/total_num_tokens"] == 500
    assert m["perf/time_per_step"] == 10.0
    assert m["perf/throughput"] == 500 / (10.0 * 2)
    assert m["perf/rollout_tokens_per_s"] == 300 / 4.0
    assert m["perf/update_tokens_per_s"] == 200 * 3 / 2.0
    model_flops = 6e9 * 500 + 6 * 1000 * 25_000
    assert m["perf/mfu/actor"] == pytest.approx(model_flops * 3 / 2.0 / 2 / 100e12, rel=1e-12)
    unknown = perf.step_metrics(tokens, times, world=2, sweeps=3, flops=flops, peak_tflops=None)
    assert "perf/mfu/actor" not in unknown
    uncounted = perf.step_metrics(tokens, times, world=2, sweeps=3, flops=None, peak_tflops=1.0)
    assert "perf/mfu/actor" not in uncounted


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H20", 148.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA L40", 181.05),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_by_the_gpus_name(name, peak):
    assert perf.peak_by_name(name) == peak


def test_no_peak_and_no_gpu_memory_on_a_cpu():
    assert perf.device_peak_tflops(torch.device("cpu")) is None
    memory = perf.memory_metrics(torch.device("cpu"))
    assert list(memory) == ["perf/cpu_memory_used_gb"]
    assert 0 < memory["perf/cpu_memory_used_gb"] < 1e6


def _one_informative_group(trainer):
    """Scores 0, 1, 0, 1 ... but all 0 in the first group: dynamic sampling drops that group."""
    score = trainer.score

    def scored(batch, examples):
        out = score(batch, examples)
        n = trainer.config.rollout.n
        out.scores = (torch.arange(len(batch.texts)) % 2).float()
        out.scores[:n] = 0
        out.rewards = out.scores.clone()
        return out

    trainer.score = scored
    return trainer


def test_a_step_logs_verls_counts_of_its_training_batch(tmp_path, monkeypatch):
    """The logged tokens are those of the rows dynamic sampling kept (the first group is not),
    and perf/mfu/actor is verl's FLOP count of them over the update's time and the peak."""
    seen = []
    over_ranks = perf.TokenCounts.over_ranks

    def spy(sampled, attention_mask, train_mask, kept):
        counts = over_ranks(sampled, attention_mask, train_mask, kept)
        seen.append((attention_mask.clone(), train_mask.clone(), kept.clone(), counts))
        return counts

    monkeypatch.setattr(perf.TokenCounts, "over_ranks", spy)
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path,
        trainer={"steps": 1, "peak_tflops": 0.5, "eval_every": 0},
        algorithm={"dynamic_sampling": True, "dynamic_sampling_max_batches": 1},
        optim={"epochs": 2},
    )
    trainer = _one_informative_group(Trainer(config, model=model, tokenizer=tok))
    trainer.train()
    (record,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["step"] == 1]
    ((attention_mask, train_mask, kept, counts),) = seen
    n = config.rollout.n
    assert kept.tolist() == [False] * n + [True] * (len(kept) - n)
    lengths = [int(row.sum()) for row, k in zip(attention_mask, kept, strict=True) if k]
    assert record["perf/total_num_tokens"] == sum(lengths)
    assert counts.in_loss == train_mask.sum().item() > 0
    flops = perf.flops_model(model.config)
    by_hand = 6 * flops.dense * sum(lengths) + 6 * flops.attention * sum(x * x for x in lengths)
    update = record["timing_s/update_actor"]
    assert record["perf/mfu/actor"] == pytest.approx(by_hand * 2 / update / 0.5e12, rel=1e-9)
    assert record["perf/throughput"] == pytest.approx(sum(lengths) / record["timing_s/step"])
    assert math.isfinite(record["perf/cpu_memory_used_gb"])
