"""LoRA through peft (`model.lora_rank`): only the adapters train, the diagnostics are those of
the adapted policy, the reference of kl_coef is the model with its adapters off, and a run saved
as an adapter resumes exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from entroprl.errors import ConfigError, TrainingError
from entroprl.train import distributed, lora, parallel
from entroprl.train.forward import forward_log_probs
from entroprl.train.precision import native_bfloat16
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer
from tests.policies import alternating_scores, make_tiny_policy, needs_native_bfloat16
from tests.test_trainer import TIMING, small_config

pytest.importorskip("peft")

LORA = {"lora_rank": 4, "lora_alpha": 8.0}
BF16 = {"dtype": "bfloat16"}


def _train(out, steps, resume=False, trainer_overrides=None, **sections):
    model, tok = make_tiny_policy()
    sections.setdefault("model", LORA)
    config = small_config(
        out,
        trainer={"steps": steps, "save_every": 1, "eval_every": 0, "report_to": []}
        | (trainer_overrides or {}),
        **sections,
    )
    model = model.to(getattr(torch, config.model.dtype))  # as load_policy loads it
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


def test_gradient_checkpointing_trains_the_adapters_as_without(tmp_path):
    """With gradient checkpointing (load_policy's non-reentrant form) the adapters train exactly
    as without it, although the frozen embeddings give the checkpointed layers inputs that need
    no gradient."""
    adapters = []
    for checkpointing in (False, True):
        model, tok = make_tiny_policy()
        if checkpointing:
            kwargs = {"use_reentrant": False}  # as load_policy turns it on
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        config = small_config(
            tmp_path / str(checkpointing),
            model=LORA | {"gradient_checkpointing": checkpointing},
            trainer={"steps": 2, "eval_every": 0, "report_to": []},
        )
        trainer = Trainer(config, model=model, tokenizer=tok)
        trainer.score = alternating_scores
        trainer.train()
        named = trainer.actor.model.named_parameters()
        adapters.append({n: p.detach() for n, p in named if "lora_" in n})
    assert any(p.abs().sum() > 0 for n, p in adapters[1].items() if "lora_B" in n)
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=0, atol=1e-7, msg=name)


@needs_native_bfloat16
def test_bfloat16_weights_train_float32_adapters(tmp_path):
    """model.dtype=bfloat16 with LoRA: the frozen weights held in bfloat16, the adapters that
    train in float32 (peft's autocast), as TRL's peft runs load them."""
    trainer = _train(tmp_path / "run", 2, model=LORA | BF16)
    params = dict(trainer.actor.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert any(p.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)


def test_resuming_with_other_adapters_names_them(tmp_path):
    _train(tmp_path / "run", 1)
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path / "run",
        model=LORA | {"lora_target_modules": "q_proj,v_proj"},
        trainer={"steps": 2, "save_every": 1, "eval_every": 0, "report_to": []},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    with pytest.raises(TrainingError, match=r"adapters are not this model's.*lora_target_modules"):
        trainer.train(resume=True, allow_config_change=True)


def test_a_lora_checkpoint_exports_and_evaluates_as_its_merged_model(tmp_path):
    """`entroprl export` of a LoRA run writes the base model with the adapters merged in: a plain
    Hugging Face model whose logits are the trained adapted policy's; `entroprl eval --model`
    takes the checkpoint's adapter folder itself, with the same results as the exported model."""
    from transformers import AutoModelForCausalLM

    from entroprl import cli
    from entroprl.demo.models import save_model

    model, tok = make_tiny_policy()
    save_model(model, tok, tmp_path / "base")
    config = small_config(
        tmp_path / "run",
        model=LORA,
        trainer={"steps": 2, "save_every": 2, "eval_every": 0, "report_to": []},
    )
    trainer = Trainer(
        config, model=AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer=tok
    )
    trainer.score = alternating_scores
    trainer.train()
    cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    ids = torch.randint(3, 20, (3, 12))
    with torch.no_grad():
        policy = trainer.actor.forward_model.eval()
        torch.testing.assert_close(merged(ids).logits, policy(ids).logits, rtol=0, atol=1e-5)
        untrained = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
    assert not torch.allclose(merged(ids).logits, untrained, atol=1e-4)  # the adapters moved
    adapters = tmp_path / "run" / "checkpoints" / "step_000002" / "model"
    parser = cli.build_parser()
    common = ["--task", "countdown", "--limit", "3", "--samples", "2", "data.test_size=3"]
    reports = [
        cli.cmd_eval(parser.parse_args(["eval", "--model", str(folder), *common]))
        for folder in (adapters, tmp_path / "merged")
    ]
    assert reports[0]["benchmarks"] == reports[1]["benchmarks"]


def test_adapters_without_their_base_model_say_so(tmp_path):
    from entroprl.train import policy

    (tmp_path / "adapters").mkdir()
    config = {"base_model_name_or_path": str(tmp_path / "gone"), "peft_type": "LORA"}
    (tmp_path / "adapters" / policy.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"base model .*base_model_name_or_path.*gone"):
        policy.load_pretrained(tmp_path / "adapters")
    config["base_model_name_or_path"] = None
    (tmp_path / "adapters" / policy.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"names no base model"):
        policy.load_pretrained(tmp_path / "adapters")


def test_adapters_trained_on_adapters_load_as_the_trained_policy(tmp_path):
    """A LoRA run from a folder of adapters (model.path) trains new adapters on the merged model;
    its checkpoint names that folder as its base, so it loads as the policy it trained (before,
    it named the first base model, and the first adapters were lost). A chain of bases that comes
    back on itself is an error that says so."""
    from transformers import AutoModelForCausalLM

    from entroprl.demo.models import save_model
    from entroprl.train import policy

    base, tok = make_tiny_policy()
    save_model(base, tok, tmp_path / "base")
    torch.manual_seed(0)
    sft = lora.attach(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), 4, 8.0, "all-linear")
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    sft.save_pretrained(tmp_path / "sft")
    model, tok = policy.load_pretrained(tmp_path / "sft")
    config = small_config(
        tmp_path / "run",
        model=LORA,
        trainer={"steps": 2, "save_every": 2, "eval_every": 0, "report_to": []},
    )
    trainer = Trainer(config, model=model, tokenizer=tok)
    trainer.score = alternating_scores
    trainer.train()
    saved = tmp_path / "run" / "checkpoints" / "step_000002" / "model"
    ids = torch.randint(3, 20, (3, 12))
    with torch.no_grad():
        trained = trainer.actor.forward_model.eval()(ids).logits
        loaded = policy.load_pretrained(saved)[0](ids).logits
        start = policy.load_pretrained(tmp_path / "sft")[0](ids).logits
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert not torch.allclose(loaded, start, atol=1e-4)  # the new adapters moved
    config_file = tmp_path / "sft" / policy.ADAPTER_CONFIG
    looped = json.loads(config_file.read_text()) | {"base_model_name_or_path": str(saved)}
    config_file.write_text(json.dumps(looped))
    with pytest.raises(ConfigError, match=r"chain of base models .* comes back to"):
        policy.load_pretrained(saved)


def test_adapters_name_their_base_folder_wherever_they_are_loaded_from(tmp_path, monkeypatch):
    """`model.path` given relative to the working directory: the adapters record the folder's
    absolute path, so they load from anywhere."""
    import yaml

    from entroprl import cli
    from entroprl.demo.models import save_model

    model, tok = make_tiny_policy()
    save_model(model, tok, tmp_path / "base")
    values = small_config(
        tmp_path / "run", model={"path": "base", **LORA}, trainer={"steps": 1, "eval_every": 0}
    ).to_dict()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    cli.main(["train", "run.yaml"])
    saved = tmp_path / "run" / "checkpoints" / "step_000001" / "model" / "adapter_config.json"
    assert json.loads(saved.read_text())["base_model_name_or_path"] == str(tmp_path / "base")


def _sharded_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kl = {"algorithm": {"kl_coef": 0.1}}
        _train(f"{out}/ddp", 3, trainer_overrides={"strategy": "ddp"}, **kl)
        sharded = _train(f"{out}/fsdp", 3, trainer_overrides={"strategy": "fsdp"}, **kl)
        assert parallel.is_sharded(sharded.actor.model)
        _train(f"{out}/resumed", 2, trainer_overrides={"strategy": "fsdp"}, **kl)
        _train(f"{out}/resumed", 3, resume=True, trainer_overrides={"strategy": "fsdp"}, **kl)
        # the replicated run's checkpoint resumes sharded
        _train(f"{out}/ddp", 4, resume=True, trainer_overrides={"strategy": "fsdp"}, **kl)
        if native_bfloat16():  # bfloat16 frozen weights beside float32 adapters in one unit
            bf16 = _train(
                f"{out}/bf16", 2, trainer_overrides={"strategy": "fsdp"}, model=LORA | BF16
            )
            dtypes = {("lora_" in n, p.dtype) for n, p in bf16.actor.model.named_parameters()}
            assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
        # what vLLM loads from a sharded LoRA policy: the merge of its whole tensors (every rank
        # makes the same adapters, as the trainer's seed makes them)
        torch.manual_seed(0)
        model = lora.attach(make_tiny_policy(hidden=32, layers=2)[0], 4, 8.0, "all-linear")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(generator=torch.Generator().manual_seed(len(name)))
        expected = copy.deepcopy(model).merge_and_unload().state_dict()
        merged = dict(lora.merged_tensors(parallel.shard(model, device=torch.device("cpu"))))
        if rank == 0:
            torch.save({"expected": expected, "merged": merged}, f"{out}/merged.pt")
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.distributed
def test_lora_sharded_over_two_ranks_trains_as_ddp_and_resumes_exactly(tmp_path):
    """FSDP over two gloo ranks with the adapters sharded in their layers: every logged value of
    a replicated (DDP) run, the reference's KL (the adapters off) included; its checkpoint holds
    the adapters alone, and a run resumed from it ends where the straight one does, bit for bit;
    the DDP run's checkpoint resumes sharded;
    the merged weights vLLM would load are peft's own merge."""
    out = str(tmp_path)
    mp.spawn(_sharded_worker, args=(2, f"{out}/init", out), nprocs=2, join=True)
    ddp, fsdp, resumed = (
        read_metrics(tmp_path / run / "metrics.jsonl") for run in ("ddp", "fsdp", "resumed")
    )
    assert all(r["actor/grad_norm"] > 0 and r["actor/kl_loss"] > 0 for r in fsdp[2:])
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for other in (ddp[:3], resumed):
        for r1, r2 in zip(fsdp, other, strict=True):
            for key, value in r1.items():
                if not key.startswith(TIMING) and not key.startswith("perf/"):
                    assert r2[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (r1["step"], key)
    straight, again = (
        tmp_path / run / "checkpoints" / "step_000003" / "model" for run in ("fsdp", "resumed")
    )
    a, b = (load_file(p / lora.ADAPTER_WEIGHTS) for p in (straight, again))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (straight / "model.safetensors").exists()
    saved = torch.load(tmp_path / "merged.pt")
    assert list(saved["merged"]) == list(saved["expected"])
    for name, value in saved["expected"].items():
        torch.testing.assert_close(saved["merged"][name], value, rtol=0, atol=1e-6, msg=name)


def _start_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cpu = torch.device("cpu")
        for name in ("plain-fsdp", "plain-ddp", "lora-fsdp"):
            model = make_tiny_policy(seed=rank, hidden=32, layers=2)[0]  # other weights per rank
            if name.startswith("lora"):
                torch.manual_seed(rank)
                model = lora.attach(model, 4, 8.0, "all-linear")
                with torch.no_grad():  # peft starts lora_B at 0: make the adapters differ too
                    for key, p in model.named_parameters():
                        if "lora_B" in key:
                            p.normal_(generator=torch.Generator().manual_seed(rank))
            made = {k: v.clone() for k, v in model.state_dict().items()}
            wrapped = parallel.wrap(model, name.split("-")[1], device=cpu)
            torch.save(
                {"made": made, "trains": parallel.model_state(wrapped)}, f"{out}/{name}-{rank}.pt"
            )
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.distributed
def test_every_rank_starts_from_rank_0s_weights_and_adapters(tmp_path):
    """Ranks that made different weights and adapters (other seeds) all train rank 0's, sharded
    (FSDP) as replicated (DDP, which broadcasts them): without it each FSDP rank would keep its
    shard of its own."""
    mp.spawn(_start_worker, args=(2, f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    for name in ("plain-fsdp", "plain-ddp", "lora-fsdp"):
        zero, one = (torch.load(tmp_path / f"{name}-{rank}.pt") for rank in (0, 1))
        assert zero["made"].keys() == one["made"].keys()
        differ = {k for k in one["made"] if not torch.equal(zero["made"][k], one["made"][k])}
        made = {k for k in one["made"] if "embed" in k or "lora_" in k or k.endswith("proj.weight")}
        assert differ >= made, name
        trains = zero["trains"]
        assert len(trains) == len(one["made"])
        for key, value in trains.items():
            torch.testing.assert_close(value, zero["made"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_merged_tensors_are_peft_merged_models_and_leave_the_adapters(targets):
    """What the vLLM backend loads: the names and layout of the base model's state dict, the
    values of peft's own merge (`merge_and_unload` on a copy), the policy itself unchanged."""
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
