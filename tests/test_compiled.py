"""`model.compile` (`entroprl.train.compiled`): compiled decoder layers train as the eager ones do,
alone and sharded by FSDP2, and sampling compiles nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters

from entroprl.train import checkpoint, distributed, parallel
from entroprl.train.trainer import Trainer
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_fused_head import run_benchmark
from tests.test_trainer import SPLIT_TEST_SETTINGS, small_config


def _steps(tmp_path, compile_: bool, model=None, trainer=None, algorithm=None):
    config = small_config(
        tmp_path / str(compile_),
        algorithm={"policy_loss": "clip_cov", "loss": SPLIT_TEST_SETTINGS, "entropy_coef": 0.01}
        | (algorithm or {}),
        model={"compile": compile_} | (model or {}),
        optim={"mini_batch_size": 8, "micro_batch_size": 4},
        trainer={"eval_every": 0, "entropy_change_every": 1} | (trainer or {}),
    )
    policy, tok = make_tiny_policy()
    trainer = Trainer(config, model=policy, tokenizer=tok)
    trainer.score = alternating_scores

    def weights():  # this rank's shards under FSDP
        local = (getattr(p, "_local_tensor", p) for p in trainer.actor.model.parameters())
        return torch.cat([p.detach().flatten() for p in local])

    start = weights()
    metrics = [trainer.train_step(1), trainer.train_step(2)]
    assert (weights() - start).abs().max() > 1e-4  # the steps moved the weights
    return trainer, metrics, weights()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [{}, {"fused_head": True}, {"lora_rank": 4}, {"gradient_checkpointing": True}],
    ids=["plain", "fused", "lora", "checkpointing"],
)
def test_compiled_layers_train_as_the_eager_ones(tmp_path, model):
    """Two whole steps (rollout, old log-probs, the update, the entropy change): the weights and
    logged values of the eager run, to the compiler's float rounding; with the fused head, with
    LoRA adapters inside the compiled layers, and with each compiled layer's activations
    recomputed in the backward (gradient checkpointing)."""
    if model.get("lora_rank"):
        pytest.importorskip("peft")
    torch._dynamo.reset()
    _, eager, w_eager = _steps(tmp_path, False, model)
    trainer, compiled, w_compiled = _steps(tmp_path, True, model)
    layers = parallel.decoder_layers(trainer.actor.forward_model)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert counters["stats"]["unique_graphs"] > 0  # the training passes ran compiled code
    torch.testing.assert_close(w_compiled, w_eager, atol=1e-5, rtol=1e-4)
    _assert_same_metrics(compiled, eager)


def _assert_same_metrics(compiled: list[dict], eager: list[dict]) -> None:
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


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        runs = {}
        for compile_ in (False, True):
            trainer, metrics, _ = _steps(
                Path(out),
                compile_,
                trainer={"strategy": "fsdp"},
                algorithm={"kl_coef": 0.05},  # a sharded reference model, compiled too
            )
            state = {k: v.full_tensor() for k, v in trainer.actor.model.state_dict().items()}
            trainer.step = 2
            trainer.save()  # sharded, every rank its own
            runs[compile_] = trainer, metrics, state
        trainer = runs[True][0]
        for model in (trainer.actor.model, trainer.actor.ref_model):
            assert parallel.is_sharded(model)
            layers = parallel.decoder_layers(model)
            assert len(layers) == model.config.num_hidden_layers
            assert all(layer._compiled_call_impl is not None for layer in layers)
        (_, eager, w_eager), (_, compiled, w_compiled) = runs[False], runs[True]
        assert w_compiled.keys() == w_eager.keys()  # the checkpoint's names are the eager ones
        for key, value in w_eager.items():
            torch.testing.assert_close(w_compiled[key], value, atol=1e-5, rtol=1e-4, msg=key)
        _assert_same_metrics(compiled, eager)
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_sharded_layers_train_as_the_eager_ones(tmp_path):
    """FSDP2 over two gloo ranks with a sharded reference model: the compiled run's weights and
    logged values are the eager run's, to the compiler's rounding, and so is its sharded
    checkpoint, weights and AdamW state under the eager run's names."""
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    paths = [tmp_path / run / "checkpoints" / "step_000002" for run in ("False", "True")]
    assert all(checkpoint.is_sharded(checkpoint.verify(path)) for path in paths)
    eager, compiled = (checkpoint.read_sharded(path) for path in paths)
    assert compiled.keys() == eager.keys() and any(".exp_avg_sq" in k for k in eager)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_the_gpu_step_benchmark_runs_its_update_part_on_the_cpu():
    """benchmarks/bench_gpu_step.py --update-only, tiny, on the CPU: a row for each of the four
    update variants (logits or fused head, eager or compiled), then the fastest one's profile."""
    tiny = ["--tiny", "--device", "cpu", "--update-only", "--prompt", "8", "--new-tokens", "8"]
    out = run_benchmark("bench_gpu_step.py", *tiny, "--micro-batch", "4", timeout=600)
    rows = [line for line in out.splitlines() if line.startswith(("| logits", "| fused"))]
    assert [row.split(" | ")[0] for row in rows] == [
        "| logits, eager",
        "| logits, compiled",
        "| fused head, eager",
        "| fused head, compiled",
    ]
    assert "## the kernels of one micro-batch" in out
