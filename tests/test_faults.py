"""Fault injection through the `entroprl` command (issue 11).

`entroprl train` is killed with SIGKILL at random moments, during checkpoint writes among them,
its newest checkpoint then damaged in each way a disk or a copy damages one, and resumed with
`--resume`: the final weights equal those of an uninterrupted run bit for bit, and metrics.jsonl
holds each step once. Then the command on a full disk and on a read-only file system (small tmpfs
and read-only mounts, in a mount namespace of its own): one line naming the problem, no traceback.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from entroprl.demo.models import save_model
from tests.policies import make_tiny_policy
from tests.test_trainer import small_config

pytestmark = pytest.mark.slow

STEPS = 5
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    """Flip 4 bytes in the tensor data, past the safetensors header: the file still loads."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 36):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "state.json missing": lambda c: (c / "state.json").unlink(),
    "latest empty": lambda c: (c.parent / "latest").write_text(""),
    "latest garbage": lambda c: (c.parent / "latest").write_text("\x00garbage/../x\n"),
    "model truncated": lambda c: truncate(c / "model" / "model.safetensors"),
    "optimizer truncated": lambda c: truncate(c / "optimizer.safetensors"),
    "weights flipped": lambda c: flip_bytes(c / "model" / "model.safetensors"),
}
"""Each way of damaging the newest checkpoint `c` (the pointer `latest` beside it included)."""

INVALIDATES = {"state.json missing", "model truncated", "optimizer truncated", "weights flipped"}


def make_config(folder: Path) -> Path:
    """A 5-step run of the tiny policy, a checkpoint every step (the last 2 kept), an evaluation
    every 2 steps; the path of its YAML file. The policy solves nothing, so that its rewards
    would all be 0 and its weights never move; overlong penalties make rewards differ within
    groups (responses that stop early keep more)."""
    model, tok = make_tiny_policy()
    model_dir = save_model(model, tok, folder / "model")
    values = small_config(
        folder / "unused", model={"path": str(model_dir)}, algorithm={"overlong_buffer": 4}
    ).to_dict()
    values["trainer"] |= {"device": "cpu", "steps": STEPS, "save_every": 1}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "entroprl.cli", "train", str(config), f"trainer.out_dir={out}"]


def train(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command(config, out), *extra],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def killed(config: Path, out: Path, moment: str, step: int, rng: random.Random, *extra: str) -> str:
    """Start a run and SIGKILL it: while it writes the checkpoint of `step` (`moment` "checkpoint
    write"; at a random point of the write), or at a random moment up to 3 s after the checkpoint
    of `step - 1` is complete ("random"). Returns what happened."""
    process = subprocess.Popen(
        [*command(config, out), *extra],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = out / "checkpoints"
    awaited = folder / (
        f".step_{step:06d}.tmp" if moment == "checkpoint write" else f"step_{step - 1:06d}"
    )
    try:
        while process.poll() is None and not awaited.exists():
            time.sleep(0.001)
        delay = rng.uniform(0.0, 0.05 if moment == "checkpoint write" else 3.0)
        deadline = time.monotonic() + delay
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        finished = process.wait() == 0
    what = "had finished" if finished else f"killed {delay:.3f} s after {awaited.name} appeared"
    return f"{moment} of step {step}: {what}"


def newest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    return found[-1] if found else None


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    name = f"step_{STEPS:06d}"
    return load_file(out / "checkpoints" / name / "model" / "model.safetensors")


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The message of a failed command: one `entroprl:` line, no traceback."""
    assert done.returncode not in (0, None), done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("entroprl: "), done.stderr[-3000:]
    return line


def trial(
    config: Path, out: Path, damage: str, moment: str, reference: dict, rng: random.Random
) -> list[str]:
    """Kill a run at `moment` of a random step from 2 on, damage its newest checkpoint, kill the
    resumed run while it writes its next checkpoint, resume it to the end; check the outcome
    against the uninterrupted `reference` weights. Returns a log of what happened."""
    log = [killed(config, out, moment, rng.randint(2, STEPS), rng)]
    newest = newest_checkpoint(out)
    others = len(list((out / "checkpoints").glob("step_*"))) - 1
    DAMAGE[damage](newest)
    log.append(f"damaged {newest.name} ({others} older): {damage}")
    if damage in INVALIDATES and others == 0:
        message = one_line_error(train(config, out, "--resume"))
        assert "no usable checkpoint" in message and "--overwrite" in message, message
        log.append("resume refused: no usable checkpoint; --overwrite")
        done = train(config, out, "--overwrite")
    else:
        resumed = int(newest.name[5:]) - (damage in INVALIDATES)
        if resumed < STEPS:
            log.append(
                "resume: " + killed(config, out, "checkpoint write", resumed + 1, rng, "--resume")
            )
        done = train(config, out, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    log += [line for line in done.stdout.splitlines() if "checkpoint" in line or "resumed" in line]
    assert logged_steps(out) == list(range(STEPS + 1)), logged_steps(out)
    weights = final_weights(out)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name
    return log


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    config = make_config(folder)
    done = train(config, folder / "reference")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = final_weights(folder / "reference")
    initial = load_file(folder / "model" / "model.safetensors")
    # the runs move the weights: the bit-for-bit comparisons compare something
    assert any(not torch.equal(reference[name], initial[name]) for name in initial)
    return config, reference


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_killed_damaged_and_resumed_runs_end_like_an_uninterrupted_one(setup, tmp_path, damage):
    config, reference = setup
    index = sorted(DAMAGE).index(damage)
    moment = "checkpoint write" if index % 2 else "random"
    log = trial(config, tmp_path / "run", damage, moment, reference, random.Random(index))
    print("\n".join(log))


# -- file systems ----------------------------------------------------------------------------


def _namespace() -> list[str] | None:
    """A prefix that runs a command in a mount namespace of its own (where it may mount), or None
    where the system allows none."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


NAMESPACE = _namespace()
needs_mounts = pytest.mark.skipif(NAMESPACE is None, reason="no mount namespace allowed here")


def in_namespace(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NAMESPACE, "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=600
    )


@needs_mounts
def test_disk_full(setup, tmp_path):
    """A tmpfs with room for the first checkpoint, not the second: the run stops with one line,
    leaves no partial checkpoint, and once there is room the first checkpoint resumes."""
    config, _ = setup
    disk, out = tmp_path / "disk", tmp_path / "disk" / "run"
    disk.mkdir()
    small = ["trainer.steps=2", "trainer.eval_every=0", "trainer.rollout_samples=0"]
    run = shlex.join([*command(config, out), *small])
    t = tmp_path
    in_namespace(
        f"mount -t tmpfs -o size=400k tmpfs {disk}; {run} >{t}/full.out 2>{t}/full.err; "
        f"echo $? >{t}/full.rc; ls -a {out}/checkpoints >{t}/ls; "
        f"mount -o remount,size=4m {disk}; {run} --resume >{t}/more.out 2>{t}/more.err; "
        f"echo $? >{t}/more.rc"
    )
    outputs = [(t / f"full.{x}").read_text() for x in ("rc", "out", "err")]
    full = subprocess.CompletedProcess([], int(outputs[0]), outputs[1], outputs[2])
    message = one_line_error(full)
    assert "No space left on device" in message and "step_000002" in message, message
    assert (t / "ls").read_text().split() == [".", "..", "latest", "step_000001"]
    assert (t / "more.rc").read_text().strip() == "0", (t / "more.err").read_text()[-3000:]
    assert "resumed from step 1" in (t / "more.out").read_text()


@needs_mounts
def test_disk_full_for_tensorboard(setup, tmp_path):
    """TensorBoard writes from a thread of its own: its failure is one line too, not the
    thread's traceback."""
    config, _ = setup
    disk = tmp_path / "disk"
    disk.mkdir()
    run = shlex.join([*command(config, disk / "run"), "trainer.report_to=[tensorboard]"])
    message = one_line_error(in_namespace(f"mount -t tmpfs -o size=4k tmpfs {disk} && {run}"))
    assert "No space left on device" in message, message


@needs_mounts
def test_read_only_file_system(setup, tmp_path):
    config, _ = setup
    fresh = tmp_path / "readonly"
    fresh.mkdir()
    done = in_namespace(
        f"mount -t tmpfs -o ro tmpfs {fresh} && {shlex.join(command(config, fresh / 'run'))}"
    )
    assert "Read-only file system" in one_line_error(done)

    run = tmp_path / "run"
    assert train(config, run, "trainer.steps=1").returncode == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    resume = shlex.join([*command(config, run), "--resume"])
    done = in_namespace(f"mount --bind {run} {run} && mount -o remount,bind,ro {run} && {resume}")
    assert "Read-only file system" in one_line_error(done)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


# -- Ctrl-C and two processes (issue 23) --------------------------------------------------------


def interrupt(
    config: Path, out: Path, moment: str, rng: random.Random
) -> subprocess.CompletedProcess:
    """Start a run in a session of its own and press Ctrl-C (SIGINT to its whole process group,
    as a terminal does) at a random moment after checkpoint 1 is complete ("step") or while it
    writes checkpoint 3 ("checkpoint write") of its 5."""
    process = subprocess.Popen(
        command(config, out),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    awaited = out / "checkpoints" / ("step_000001" if moment == "step" else ".step_000003.tmp")
    while process.poll() is None and not awaited.exists():
        time.sleep(0.001)
    time.sleep(rng.uniform(0.0, 0.3 if moment == "step" else 0.02))
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("moment", ["step", "checkpoint write"])
def test_ctrl_c_stops_with_one_line_and_the_run_resumes_intact(setup, tmp_path, moment):
    config, reference = setup
    out = tmp_path / "run"
    done = interrupt(config, out, moment, random.Random(moment))
    assert done.returncode == 130, (done.stdout[-2000:], done.stderr[-3000:])
    line = one_line_error(done)
    newest = max((out / "checkpoints").glob("step_*"), key=lambda p: p.name)
    assert line.startswith("entroprl: interrupted;") and f"{newest} (step" in line, line
    assert train(config, out, "--resume").returncode == 0
    assert logged_steps(out) == list(range(STEPS + 1))
    weights = final_weights(out)
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name


def stop_with_ctrl_c(process: subprocess.Popen) -> None:
    """Ctrl-C `process` (a run too long to end on its own): it must stop cleanly."""
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()  # a run that ignored Ctrl-C must not outlive its failed test
        stdout, stderr = process.communicate()
        raise AssertionError(f"Ctrl-C did not stop the run: {stderr[-3000:]}") from None
    assert process.returncode == 130, (stdout, stderr[-3000:])


def test_two_processes_on_one_run_directory(setup, tmp_path):
    """Two `--resume` processes started together on one run: one trains, the other stops at once
    naming the first's pid. The first, stopped later with Ctrl-C, has logged each step once."""
    config, _ = setup
    out = tmp_path / "run"
    assert train(config, out, "trainer.steps=2").returncode == 0
    both = [
        subprocess.Popen(
            [*command(config, out), "trainer.steps=100000", "--resume"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    while all(p.poll() is None for p in both):
        time.sleep(0.01)
    refused = next(p for p in both if p.poll() is not None)
    winner = next(p for p in both if p is not refused)
    stdout, stderr = refused.communicate()
    done = subprocess.CompletedProcess(refused.args, refused.returncode, stdout, stderr)
    assert f"in use by another entroprl process (pid {winner.pid} on" in one_line_error(done)
    assert refused.returncode == 1
    while len(logged_steps(out)) < 5:  # the winner trains on
        time.sleep(0.01)
    stop_with_ctrl_c(winner)
    steps = logged_steps(out)
    assert steps == list(range(len(steps))) and len(steps) >= 5, steps


def test_overwrite_while_another_process_trains_is_refused(setup, tmp_path):
    """`--overwrite` of a run that is still training stops, naming the trainer's pid, and
    deletes nothing: the run trains on."""
    config, _ = setup
    out = tmp_path / "run"
    running = subprocess.Popen(
        [*command(config, out), "trainer.steps=100000"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while running.poll() is None and not (out / "checkpoints" / "step_000001").exists():
        time.sleep(0.01)
    message = one_line_error(train(config, out, "--overwrite"))
    assert f"pid {running.pid} on" in message, message
    assert running.poll() is None  # still training
    stop_with_ctrl_c(running)
    steps = logged_steps(out)
    assert steps == list(range(len(steps))) and len(steps) >= 2, steps
    newest = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / newest).is_dir() and (out / "config.yaml").is_file()


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_stops(setup, tmp_path):
    """Under torchrun only rank 0 takes the lock; when another process holds it, every rank stops
    at once with one line (rank 0's names the holder), none waits for the others. (torchrun then
    prints a traceback of its own for its failed workers.)"""
    config, _ = setup
    out = tmp_path / "run"
    out.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    launch = [str(torchrun), "--nproc-per-node", "2", "-m", "entroprl.cli", "train", str(config)]
    from entroprl.train.rundir import lock_directory

    with lock_directory(out):
        done = subprocess.run(
            [*launch, f"trainer.out_dir={out}", "trainer.steps=1"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert any(f"in use by another entroprl process (pid {os.getpid()} on" in x for x in lines)
    assert "entroprl: rank 0 stopped the run (its message says why)" in lines
    # torchrun reports its failed workers with a traceback of its own; none comes from a rank
    assert "/entroprl/" not in done.stderr.replace(str(config), ""), done.stderr[-3000:]
    assert not (out / "config.yaml").exists()
    done = subprocess.run(
        [*launch, f"trainer.out_dir={out}", "trainer.steps=1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_steps(out) == [0, 1]
