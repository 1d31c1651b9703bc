"""Checkpoints and resuming (issue 11): a damaged newest checkpoint is skipped for the newest valid
one, a run directory is never restarted or mixed with another run unless told to, pruning keeps
the newest checkpoint, and metrics.jsonl holds each step once after a resume.

One run of 4 steps (a checkpoint per step, the last 3 kept) is made once; each test damages a copy
of it and resumes to step 4, which must give the uninterrupted run's weights bit for bit."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from entroprl.errors import NonFiniteError
from entroprl.train import checkpoint
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer, TrainingError
from tests.policies import alternating_scores, make_tiny_policy
from tests.test_trainer import small_config

STEPS = 4


def run_config(out_dir, **trainer):
    return small_config(
        out_dir,
        trainer={"steps": STEPS, "save_every": 1, "keep_checkpoints": 3, **trainer},
    )


def train(out_dir, *, resume=False, overwrite=False, **trainer):
    model, tok = make_tiny_policy()
    t = Trainer(run_config(out_dir, **trainer), model=model, tokenizer=tok)
    t.score = alternating_scores  # every step moves the weights: resuming has state to restore
    t.train(resume=resume, overwrite=overwrite)
    return t


def weights(run, step):
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors")


def steps_in_file(run) -> list[int]:
    """The step of every line of metrics.jsonl, in file order (duplicates kept)."""
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    train(out)
    return out


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path):
    """Flip 4 bytes near the end: in the tensor data, past the safetensors header, so that the
    file still loads, with different numbers."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 36):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "state.json missing": (lambda c: (c / "state.json").unlink(), "no state.json"),
    "state.json garbage": (lambda c: (c / "state.json").write_text("{"), "state.json"),
    "model truncated": (lambda c: truncate(c / "model" / "model.safetensors"), "bytes"),
    "optimizer truncated": (lambda c: truncate(c / "optimizer.safetensors"), "bytes"),
    "weights flipped": (lambda c: flip_bytes(c / "model" / "model.safetensors"), "SHA-256"),
    "rng missing": (lambda c: (c / "rng.safetensors").unlink(), "missing"),
}


def test_the_base_run(base_run):
    assert steps_in_file(base_run) == [0, 1, 2, 3, 4]
    names = sorted(p.name for p in (base_run / "checkpoints").glob("step_*"))
    assert names == ["step_000002", "step_000003", "step_000004"]
    state = json.loads((base_run / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["step"] == 4
    assert "model/model.safetensors" in state["files"]
    # every step moved the weights, so the bit-for-bit comparisons below compare something
    for earlier, later in ((2, 3), (3, 4)):
        a, b = weights(base_run, earlier), weights(base_run, later)
        assert any(not torch.equal(a[name], b[name]) for name in a), (earlier, later)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(run, base_run, damage, capsys):
    harm, reason = DAMAGE[damage]
    harm(run / "checkpoints" / "step_000004")
    train(run, resume=True)
    out = capsys.readouterr().out
    assert "resumed from step 3" in out
    skipped = next(line for line in out.splitlines() if "step_000004" in line)
    assert reason in skipped, out
    final = weights(run, STEPS)
    for name, value in weights(base_run, STEPS).items():
        assert torch.equal(final[name], value), name
    assert steps_in_file(run) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("pointer", ["", "garbage\n", "step_000099", None])
def test_the_latest_pointer_is_not_trusted(run, pointer, capsys):
    latest = run / "checkpoints" / "latest"
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer)
    before = (run / "metrics.jsonl").read_bytes()
    train(run, resume=True)
    assert "resumed from step 4" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing left to run


def test_resume_refuses_when_no_checkpoint_is_usable(run):
    for step in (2, 3, 4):
        (run / "checkpoints" / f"step_{step:06d}" / "state.json").unlink()
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="no usable checkpoint") as caught:
        train(run, resume=True)
    assert all(f"step_00000{s}" in str(caught.value) for s in (2, 3, 4))
    assert "--overwrite" in str(caught.value)
    assert (run / "metrics.jsonl").read_bytes() == before
    assert len(list((run / "checkpoints").glob("step_*"))) == 3


def test_a_resumed_run_logs_each_step_once(run):
    """Killed after logging step 4 and before its checkpoint: step 4 runs again, logged once."""
    shutil.rmtree(run / "checkpoints" / "step_000004")
    train(run, resume=True)
    assert steps_in_file(run) == [0, 1, 2, 3, 4]


def test_a_cut_off_last_metrics_line_is_repaired_before_appending(run):
    shutil.rmtree(run / "checkpoints" / "step_000004")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "actor/entro')  # killed in the middle of a line
    train(run, resume=True)
    assert steps_in_file(run) == [0, 1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_rerun_into_a_run_directory_stops_unless_told_to_overwrite(run, base_run):
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="--resume") as caught:
        train(run, steps=2)
    assert "--overwrite" in str(caught.value)
    assert (run / "metrics.jsonl").read_bytes() == before
    assert (run / "checkpoints" / "step_000004").is_dir()

    (run / "notes.txt").write_text("mine")  # files entroprl did not write are left alone
    train(run, overwrite=True, steps=2)
    assert steps_in_file(run) == [0, 1, 2]
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_000001", "step_000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "rollouts" / "step_000004.jsonl").exists()
    for name, value in weights(base_run, 2).items():  # the same first two steps
        assert torch.equal(weights(run, 2)[name], value), name


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(TrainingError, match="exclude"):
        train(tmp_path / "run", resume=True, overwrite=True)


def test_resume_without_any_checkpoint_starts_at_step_0(tmp_path, capsys):
    """A run killed before its first checkpoint: --resume runs it from the start, and the steps
    it had logged are logged again, once."""
    out = tmp_path / "run"
    train(out, steps=1, save_every=5)
    shutil.rmtree(out / "checkpoints")
    train(out, resume=True, steps=1)
    assert "starting at step 0" in capsys.readouterr().out
    assert steps_in_file(out) == [0, 1]


# -- the checkpoint module alone ---------------------------------------------------------------


def save(folder, step, model, tok, keep):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    no_optimizer = {"state": {}, "param_groups": []}
    return checkpoint.save(folder, step, model, tok, state, no_optimizer, {}, keep)


def test_pruning_orders_by_step_and_keeps_the_newest(tmp_path):
    """Six-digit names sort step 1,000,000 before step 999,999: pruning by name deleted the
    checkpoint it had just written."""
    model, tok = make_tiny_policy()
    folder = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000):
        newest = save(folder, step, model, tok, keep=2)
        assert newest.is_dir()
        assert (folder / "latest").read_text() == newest.name
    assert sorted(p.name for p in folder.glob("step_*")) == ["step_1000000", "step_999999"]
    path, state, skipped = checkpoint.find_resumable(folder)
    assert (path, state["step"], skipped) == (folder / "step_1000000", 1_000_000, [])


def test_pruning_removes_leftovers_and_checkpoints_past_the_newest(tmp_path):
    """After a resume from an older checkpoint the skipped newer ones, and the temporary folders
    of interrupted writes, go once a new checkpoint is written."""
    model, tok = make_tiny_policy()
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(folder, step, model, tok, keep=5)
    (folder / ".step_000004.tmp").mkdir()
    save(folder, 2, model, tok, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_000001", "step_000002"]


def test_nonfinite_weights_are_never_saved(tmp_path):
    model, tok = make_tiny_policy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(state))
    state[name][0] = float("nan")
    with pytest.raises(NonFiniteError, match=re.escape(name)):
        checkpoint.save(tmp_path, 1, model, tok, state, {"state": {}, "param_groups": []}, {}, 2)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_named_for_another_step_is_not_used(tmp_path):
    model, tok = make_tiny_policy()
    folder = tmp_path / "checkpoints"
    save(folder, 1, model, tok, keep=3)
    save(folder, 2, model, tok, keep=3)
    (folder / "step_000002").rename(folder / "step_000009")
    path, state, skipped = checkpoint.find_resumable(folder)
    assert (path.name, state["step"]) == ("step_000001", 1)
    assert skipped == ["step_000009: state.json says step 2, not the step of its name"]
