"""`model.path` as a Hugging Face hub id, resolved through huggingface_hub's cache: tested offline
(HF_HUB_OFFLINE=1) against a cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from entroprl.demo.models import save_model
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config

REPO = "entroprl-tests/tiny-qwen2"


def hub_cache(root):
    """A huggingface_hub cache holding REPO at one revision, as `snapshot_download` leaves it."""
    model, tok = make_tiny_policy()
    repo = root / f"models--{REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_model(model, tok, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def _run(args, cache, tmp_path):
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "entroprl.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_hub_id_trains_from_the_offline_cache(tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache)
    config = tmp_path / "run.yaml"
    values = small_config(tmp_path / "out", trainer={"steps": 1, "eval_every": 0}).to_dict()
    config.write_text(yaml.safe_dump(values))
    done = _run(["train", str(config), f"model.path={REPO}"], cache, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoints" / "step_000001").is_dir()
    if importlib.util.find_spec("peft"):  # LoRA adapters name the hub id, not its cache folder
        lora = ["model.lora_rank=4", f"trainer.out_dir={tmp_path / 'lora'}"]
        done = _run(["train", str(config), f"model.path={REPO}", *lora], cache, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        saved = tmp_path / "lora" / "checkpoints" / "step_000001" / "model" / "adapter_config.json"
        assert json.loads(saved.read_text())["base_model_name_or_path"] == REPO


def test_an_id_missing_from_the_offline_cache_is_one_line(tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(tmp_path / "out").to_dict()))
    done = _run(["train", str(config), "model.path=entroprl-tests/absent"], cache, tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "model.path=entroprl-tests/absent" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_a_hub_id_of_lora_adapters_evaluates_on_its_hub_base_model(tmp_path):
    """An adapter repository (peft's files, no config.json) whose base model is a hub id too:
    both resolved through the cache, the adapters merged into the base."""
    pytest.importorskip("peft")
    from entroprl.train import lora

    cache = tmp_path / "hub"
    hub_cache(cache)
    model, tok = make_tiny_policy()
    adapted = lora.attach(model, rank=4, alpha=8.0, targets="all-linear")
    adapted.peft_config["default"].base_model_name_or_path = REPO
    repo = cache / "models--entroprl-tests--tiny-lora"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    adapted.save_pretrained(repo / "snapshots" / commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    args = ["eval", "--model", "entroprl-tests/tiny-lora", "--task", "countdown", "--limit", "2"]
    done = _run([*args, "data.test_size=2", "rollout.max_new_tokens=4"], cache, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| countdown | 2 |" in done.stdout
