"""The GPU path, run for real: `pytest -m gpu` on a machine with a CUDA GPU (skipped elsewhere,
saying why). `scripts/gpu_check.sh` runs these after its throughput check.

Every registered loss, dynamic-sampling refills, the shared prefix, bfloat16 compute, the fused
head, compiled layers, resume, FSDP with a sharded checkpoint (and with LoRA), and the demo's
model, each for a few trainer steps on the GPU (and the memory and MFU they log), with a reward
that differs within groups so that the steps move the weights; the fused head's log-probs and
gradients against the logits path; and the sampler's CUDA graph drawing the tokens
`model.generate` draws."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from entroprl.algos import losses
from entroprl.rollout.hf import HFBackend
from entroprl.tasks.base import Example, Task
from entroprl.train import distributed, parallel, perf
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_sampler import PROMPTS, generate_reference, grouped_policy
from tests.test_trainer import small_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)"),
]


def _has_a_one(completion, answer):
    return float("1" in completion)


def _task() -> Task:
    prompts = ["1 2>3=", "12 3 4>9=", "5>5=", "7 1>8="]
    return Task(
        "ones", [Example(p, None) for p in prompts] * 8, [Example(prompts[0], None)], _has_a_one
    )


def _train(tmp_path, steps=2, resume=False, **sections):
    sections.setdefault("trainer", {})
    sections["trainer"] = {"device": "cuda", "steps": steps, "eval_every": 0} | sections["trainer"]
    config = small_config(tmp_path / "run", **sections)
    model, tok = make_tiny_policy()
    model = model.to(getattr(torch, config.model.dtype))  # as load_policy loads it
    trainer = Trainer(config, task=_task(), model=model, tokenizer=tok)
    start = [p.detach().clone() for p in trainer.actor.model.parameters()]
    trainer.train(resume=resume)
    return trainer, start


def _moved(trainer, start) -> bool:
    return any(
        not torch.equal(a, p) for a, p in zip(start, trainer.actor.model.parameters(), strict=True)
    )


def _on_the_gpu(trainer) -> None:
    assert trainer.device.type == "cuda" and trainer.device.index is not None
    assert distributed.run_device() == trainer.device
    assert all(p.device == trainer.device for p in trainer.actor.model.parameters())


@pytest.mark.parametrize("name", sorted(losses.POLICY_LOSSES))
def test_every_registered_loss_trains_on_the_gpu(tmp_path, name):
    trainer, start = _train(tmp_path, algorithm={"policy_loss": name})
    _on_the_gpu(trainer)
    assert _moved(trainer, start)


def test_refills_and_shared_prefix_on_the_gpu(tmp_path):
    """Dynamic sampling's refills all-reduce a count on the run's device; the shared prefix
    copies a KV cache across rows."""
    trainer, start = _train(
        tmp_path,
        algorithm={
            "dynamic_sampling": True,
            "dynamic_sampling_max_batches": 3,
            "policy_loss": "kl_cov",
        },
        optim={"shared_prefix": True},
    )
    assert _moved(trainer, start)


def test_bfloat16_compute_samples_from_the_bfloat16_copy(tmp_path):
    trainer, start = _train(tmp_path, model={"compute_dtype": "bfloat16"})
    assert trainer.actor.sampling_model is trainer.actor.forward_model
    assert next(trainer.actor.sampling_model.parameters()).dtype == torch.bfloat16
    assert _moved(trainer, start)


def test_fused_head_trains_with_bfloat16_compute_and_the_shared_prefix(tmp_path):
    """The log-probs from the hidden states inside the bfloat16 copy's forward, the prompts
    computed once; the sampler (its CUDA graph) runs the same model's own forward."""
    trainer, start = _train(
        tmp_path,
        model={"compute_dtype": "bfloat16", "fused_head": True},
        optim={"shared_prefix": True},
        algorithm={"entropy_coef": 0.01},
    )
    _on_the_gpu(trainer)
    assert _moved(trainer, start)


def test_compiled_layers_train_and_the_cuda_graph_sampler_runs_them_eagerly(tmp_path):
    """model.compile with the fused head and bfloat16 compute: the update runs compiled layers,
    the CUDA-graph sampler the same layers eagerly."""
    trainer, start = _train(
        tmp_path,
        model={"compute_dtype": "bfloat16", "fused_head": True, "compile": True},
    )
    _on_the_gpu(trainer)
    assert all(
        layer._compiled_call_impl is not None
        for layer in parallel.decoder_layers(trainer.actor.forward_model)
    )
    assert _moved(trainer, start)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_trains_on_the_gpu_and_samples_through_the_cuda_graph(tmp_path, dtype):
    """LoRA in one process: the CUDA-graph sampler runs the peft model's forward; with bfloat16
    weights the adapters train in float32."""
    pytest.importorskip("peft")
    trainer, start = _train(tmp_path, model={"lora_rank": 4, "lora_alpha": 8.0, "dtype": dtype})
    _on_the_gpu(trainer)
    assert _moved(trainer, start)
    dtypes = {("lora_" in n, p.dtype) for n, p in trainer.actor.model.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, getattr(torch, dtype))}


def test_the_gpus_memory_and_mfu_are_logged(tmp_path):
    """verl's perf/ figures on a GPU: its peak memory, and the MFU where its peak is known."""
    trainer, _ = _train(tmp_path)
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] == 2]
    allocated = record["perf/max_memory_allocated_gb"]
    assert 0 < allocated <= record["perf/max_memory_reserved_gb"]
    if perf.device_peak_tflops(trainer.device) is None:
        assert "perf/mfu/actor" not in record
    else:
        assert 0 < record["perf/mfu/actor"] < 1


def test_fused_head_equals_the_logits_path_on_the_gpu():
    from entroprl.train import forward
    from tests.test_fused_head import _forward_and_grads, _policy
    from tests.test_shared_prefix import grouped_batch

    model, tok = _policy()
    model = model.float().cuda()
    fused = copy.deepcopy(model)
    forward.fuse_head(fused)
    ids, attention, _ = grouped_batch(tok, 3, 7)
    ids, attention = ids.cuda(), attention.cuda()
    want = _forward_and_grads(model, ids, attention, 7, shared=False, fused=False)
    got = _forward_and_grads(fused, ids, attention, 7, shared=False, fused=True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_resume_on_the_gpu_continues_the_run(tmp_path):
    straight, _ = _train(tmp_path / "a", steps=3, trainer={"save_every": 1})
    _train(tmp_path / "b", steps=2, trainer={"save_every": 1})
    resumed, _ = _train(tmp_path / "b", steps=3, resume=True, trainer={"save_every": 1})
    assert resumed.step == 3
    for a, b in zip(
        straight.actor.model.parameters(), resumed.actor.model.parameters(), strict=True
    ):
        # atomics in the embedding's backward make GPU sums order-dependent in the last bits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "model",
    [{}, {"compile": True}, {"lora_rank": 4}],
    ids=["eager", "compiled", "lora"],
)
def test_fsdp_with_a_sharded_checkpoint_on_the_gpu(tmp_path, model):
    """FSDP over a process group of one (NCCL), saved sharded and resumed; with its sharded
    layers compiled too; and LoRA adapters sharded with their layers, saved whole."""
    from entroprl.train.distributed import init as init_distributed

    if model.get("lora_rank"):
        pytest.importorskip("peft")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init_distributed("fsdp")
    fsdp = {"strategy": "fsdp"}
    try:
        trainer, start = _train(tmp_path, steps=2, model=model, trainer=fsdp | {"save_every": 1})
        assert parallel.is_sharded(trainer.actor.model) and _moved(trainer, start)
        layers = parallel.decoder_layers(trainer.actor.model)
        compiled = [layer._compiled_call_impl is not None for layer in layers]
        assert compiled and all(c == bool(model.get("compile")) for c in compiled)
        resumed, _ = _train(tmp_path, steps=3, resume=True, model=model, trainer=fsdp)
        assert resumed.step == 3
    finally:
        torch.distributed.destroy_process_group()


def test_the_demo_model_trains_on_the_gpu(tmp_path):
    from entroprl.config import config_from_dict
    from entroprl.demo.race import demo_config
    from entroprl.demo.warmstart import WarmStartConfig, warm_start

    path = warm_start(WarmStartConfig(steps=20, num_problems=50, eval_problems=8), tmp_path / "ws")
    values = demo_config()
    values["model"] = values.get("model", {}) | {"path": str(path)}
    values["trainer"] |= {
        "device": "cuda",
        "steps": 2,
        "eval_every": 2,
        "out_dir": str(tmp_path / "run"),
        "progress": False,
    }
    trainer = Trainer(config_from_dict(values))
    trainer.train()
    _on_the_gpu(trainer)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_cuda_graph_sampler_draws_what_generate_draws(temperature, top_p, grouped):
    """On the GPU the sampler decodes with a static cache replayed as a CUDA graph (no fallback
    to eager: its warning fails the test), grouped-query heads as rows; the tokens are
    `model.generate`'s under the seed."""
    model, tok = grouped_policy() if grouped else make_tiny_policy()
    model = model.cuda()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the decode step could not be captured")
        torch.manual_seed(0)
        batch = HFBackend(model, tok).generate(
            PROMPTS, n=4, temperature=temperature, top_p=top_p, max_new_tokens=12
        )
    model.eval()
    torch.manual_seed(0)
    expected = generate_reference(model, tok, PROMPTS, 4, 256, temperature, top_p, 12)
    assert batch.response_ids.device.type == "cuda"
    assert torch.equal(batch.response_ids, expected.to(batch.response_ids.device))
