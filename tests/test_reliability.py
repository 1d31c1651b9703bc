"""A run never lies about what it holds (issue 23): Ctrl-C, resuming with other settings, two
processes on one run directory, plug-ins and optional packages, hostile configurations and logs,
exit codes. Each case goes through the `entroprl` command (`cli.main`) where it can; the ones
that need real processes and signals are in tests/test_faults.py (slow)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from entroprl import cli, config
from entroprl.algos import losses
from entroprl.analysis import runs as analysis
from entroprl.cli import main
from entroprl.config import ConfigError, load_config
from entroprl.demo.models import build_model, save_model, tiny_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.errors import TrainingError
from entroprl.tasks import countdown, math_problems
from entroprl.train import checkpoint, rundir
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy
from tests.test_analysis import make_run
from tests.test_trainer import small_config

ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def fails(argv: list[str], capsys=None) -> str:
    """The one-line message `entroprl ARGV` exits with (exit code 1)."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    message = caught.value.code
    assert isinstance(message, str), f"exit code {message!r}, no message"
    assert message.startswith("entroprl: ") and "\n" not in message, message
    return message


def interrupted(argv: list[str], capsys) -> str:
    """The line `entroprl ARGV` prints when Ctrl-C stops it; its exit code must be 130."""
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == cli.EXIT_INTERRUPTED, e.code
    except KeyboardInterrupt:  # what reaches the user as a traceback
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    else:
        pytest.fail("the command ended normally")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("entroprl: interrupted"), lines
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = make_tiny_policy()
    return save_model(model, tok, tmp_path_factory.mktemp("model"))


@pytest.fixture
def config_file(tmp_path, model_dir):
    """A 2-step run (a checkpoint every step, no evaluation) into tmp_path/run."""
    values = small_config(tmp_path / "run", model={"path": str(model_dir)}).to_dict()
    values["trainer"] |= {"device": "cpu", "steps": 2, "save_every": 1, "eval_every": 0}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def steps_in_file(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- 1. Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_during_a_step_names_the_newest_checkpoint(
    config_file, tmp_path, capsys, monkeypatch
):
    real = Trainer.train_step

    def train_step(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    line = interrupted(["train", str(config_file), "trainer.steps=4"], capsys)
    run = tmp_path / "run"
    assert str(run / "checkpoints" / "step_000002") in line and "--resume" in line, line
    monkeypatch.setattr(Trainer, "train_step", real)
    main(["train", str(config_file), "trainer.steps=4", "--resume"])
    assert steps_in_file(run) == [1, 2, 3, 4]


def test_ctrl_c_during_a_checkpoint_write(config_file, tmp_path, capsys, monkeypatch):
    """Interrupted while it writes the checkpoint of step 2: step 1's is named, and no
    checkpoint of step 2 is left but the temporary folder the next save removes."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # step 1's optimizer and RNG are written, then step 2's optimizer
            raise KeyboardInterrupt
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    line = interrupted(["train", str(config_file)], capsys)
    folder = tmp_path / "run" / "checkpoints"
    assert str(folder / "step_000001") in line, line
    assert sorted(p.name for p in folder.iterdir()) == [".step_000002.tmp", "latest", "step_000001"]
    monkeypatch.setattr(checkpoint, "save_file", real)
    main(["train", str(config_file), "--resume"])
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_000001", "step_000002"]
    assert steps_in_file(tmp_path / "run") == [1, 2]


def test_ctrl_c_before_any_checkpoint(config_file, capsys, monkeypatch):
    monkeypatch.setattr(
        Trainer, "train_step", lambda self, step: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    assert "no complete checkpoint yet" in interrupted(["train", str(config_file)], capsys)


# -- 2. resuming with other settings -----------------------------------------------------------


@pytest.fixture
def two_steps(config_file, tmp_path):
    """A finished 2-step run; (its config file, its directory, its config.yaml's text)."""
    main(["train", str(config_file)])
    run = tmp_path / "run"
    return config_file, run, (run / "config.yaml").read_text()


@pytest.mark.parametrize(
    "override",
    [
        "optim.mini_batch_size=4",
        "rollout.prompts_per_step=2",
        "trainer.seed=1",
        "optim.lr=0.002",
        "algorithm.policy_loss=clip_cov",
        "trainer.eval_samples=4",
    ],
)
def test_resume_refuses_settings_that_change_the_run(two_steps, override):
    config_file, run, before = two_steps
    message = fails(["train", str(config_file), "trainer.steps=3", override, "--resume"])
    key = override.split("=")[0]
    assert key in message and "--allow-config-change" in message, message
    assert "trainer.steps" not in message.split("another run's:")[1], message  # steps are free
    assert (run / "config.yaml").read_text() == before
    assert steps_in_file(run) == [1, 2] and not list(run.glob("config.step_*.yaml"))


def test_allowed_changes_keep_each_segment_configuration(two_steps, capsys):
    config_file, run, before = two_steps
    main(
        [
            "train",
            str(config_file),
            "trainer.steps=3",
            "optim.lr=0.002",
            "--resume",
            "--allow-config-change",
        ]
    )
    assert "optim.lr: 0.001 -> 0.002" in capsys.readouterr().out
    assert (run / "config.yaml").read_text() == before  # the settings of steps 1-2
    segment = yaml.safe_load((run / "config.step_000002.yaml").read_text())
    assert segment["optim"]["lr"] == 0.002 and segment["trainer"]["steps"] == 3
    assert steps_in_file(run) == [1, 2, 3]
    run_dir = rundir.RunDir(run)
    assert run_dir.config_of_step(3)[0].name == "config.step_000002.yaml"
    assert run_dir.config_of_step(2)[0].name == "config.yaml"
    # checkpoint 3 lost: resumed from 2 with the first settings, step 3 runs with them again
    shutil.rmtree(run / "checkpoints" / "step_000003")
    main(["train", str(config_file), "trainer.steps=3", "--resume"])
    assert yaml.safe_load((run / "config.step_000002.yaml").read_text())["optim"]["lr"] == 0.001
    assert steps_in_file(run) == [1, 2, 3]


def test_free_changes_are_accepted_and_recorded(two_steps, capsys):
    config_file, run, before = two_steps
    main(
        [
            "train",
            str(config_file),
            "trainer.steps=3",
            "trainer.eval_every=3",
            "optim.micro_batch_size=2",
            "trainer.progress=true",
            "--resume",
        ]
    )
    out = capsys.readouterr().out
    assert "settings changed since step 2" in out and "trainer.steps: 2 -> 3" in out
    assert (run / "config.yaml").read_text() == before
    assert yaml.safe_load((run / "config.step_000002.yaml").read_text())["trainer"]["steps"] == 3
    assert [r for r in steps_in_file(run)] == [1, 2, 3]


def test_steps_under_a_cosine_schedule_change_the_run(two_steps):
    config_file, run, _ = two_steps
    fails(["train", str(config_file), "optim.schedule=cosine", "--resume"])  # the schedule
    values = yaml.safe_load((run / "config.yaml").read_text())
    values["optim"]["schedule"] = "cosine"
    after = config.config_from_dict({**values, "trainer": {**values["trainer"], "steps": 5}})
    changes = config.resume_changes(values, after)
    assert config.meaning_changes(changes, after) == ["trainer.steps: 2 -> 5"]


def test_resume_changes_take_a_missing_key_as_its_default():
    before = config.Config().to_dict()
    del before["trainer"]["entropy_change_every"], before["rollout"]
    assert config.resume_changes(before, config.Config()) == {}
    after = config.config_from_dict({"trainer": {"entropy_change_every": 3}})
    assert config.resume_changes(before, after)["trainer.entropy_change_every"] == (10, 3)


def test_steps_below_the_checkpoint_are_refused(two_steps):
    config_file, run, before = two_steps
    message = fails(["train", str(config_file), "trainer.steps=1", "--resume"])
    assert "trainer.steps=1" in message and "already at step 2" in message, message
    assert (run / "config.yaml").read_text() == before


def test_a_finished_run_resumed_has_nothing_to_do(two_steps, capsys):
    config_file, run, _ = two_steps
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    main(["train", str(config_file), "--resume"])
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_model_of_another_shape_fails_with_one_line(two_steps, tmp_path):
    config_file, _, _ = two_steps
    tok = build_char_tokenizer()
    wide = tiny_config(
        len(tok),
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    other = save_model(build_model(wide, seed=0), tok, tmp_path / "wide")
    message = fails(
        [
            "train",
            str(config_file),
            "trainer.steps=3",
            f"model.path={other}",
            "--resume",
            "--allow-config-change",
        ]
    )
    assert "not of the shape of checkpoint" in message and "[" in message, message


def test_lora_adapters_of_another_rank_fail_with_one_line(tmp_path):
    pytest.importorskip("peft")

    def lora_run(rank, **kw):
        model, tok = make_tiny_policy()
        config = small_config(
            tmp_path,
            model={"lora_rank": rank, "lora_alpha": 8.0},
            trainer={"steps": 2, "save_every": 1, "eval_every": 0},
        )
        Trainer(config, model=model, tokenizer=tok).train(**kw)

    lora_run(4)
    with pytest.raises(TrainingError, match=r"not of the shape of checkpoint .*lora_A.* is \[8, "):
        lora_run(8, resume=True, allow_config_change=True)


# -- 3. one process per run directory ----------------------------------------------------------


def test_a_locked_directory_names_its_holder(tmp_path):
    holder = rf"in use by another entroprl process \(pid {os.getpid()} on"
    with (
        rundir.lock_directory(tmp_path),
        pytest.raises(TrainingError, match=holder),
        rundir.lock_directory(tmp_path),  # flock: a second open file of one process conflicts
    ):
        pass
    with rundir.lock_directory(tmp_path):  # released
        pass


def _holder(path: Path) -> subprocess.Popen:
    """Another process holding the lock on `path` until killed."""
    code = (
        "import sys, time; from pathlib import Path\n"
        "from entroprl.train.rundir import lock_directory\n"
        "with lock_directory(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        env=ENV | {"PYTHONPATH": os.pathsep.join(sys.path)},
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_is_refused_and_overwrite_deletes_nothing(two_steps):
    config_file, run, _ = two_steps
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    holder = _holder(run)
    try:
        for again in ("--resume", "--overwrite"):
            message = fails(["train", str(config_file), "trainer.steps=3", again])
            assert f"pid {holder.pid}" in message and "in use" in message, message
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the lock died with its holder
    main(["train", str(config_file), "trainer.steps=3", "--resume"])
    assert steps_in_file(run) == [1, 2, 3]


# -- 5. plug-ins and optional packages ---------------------------------------------------------


@pytest.mark.parametrize(
    "source, shown",
    [
        ("raise RuntimeError('plug-in broke')", "RuntimeError: plug-in broke ("),
        ("x = 1 / 0", "ZeroDivisionError: division by zero ("),
        ("def f(:\n    pass", "SyntaxError"),
        ("import no_such_module_here", "No module named 'no_such_module_here'"),
        ("import sys\nsys.exit(3)", "SystemExit: 3"),
    ],
)
def test_a_plugin_that_fails_to_import_is_one_line(tmp_path, monkeypatch, source, shown):
    (tmp_path / "bad_plugin.py").write_text(source + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_plugin", raising=False)
    message = fails(["eval", "algorithm.plugins=[bad_plugin]"])
    assert "algorithm.plugins[0]" in message and shown in message, message
    if "(" in shown:  # the line of the plug-in that raised
        assert f"{tmp_path / 'bad_plugin.py'}:" in message, message


@pytest.mark.parametrize("name", ["", ".x", "..", "a..b", "x-y", "a b"])
def test_a_plugin_name_that_is_no_module(name):
    with pytest.raises(ConfigError, match=r"algorithm.plugins\[0\]: .* is not a module name"):
        load_config(None, [f"algorithm.plugins=[{json.dumps(name)}]"])


def test_a_tracker_missing_is_refused_before_anything_is_written(config_file, tmp_path):
    if importlib.util.find_spec("aim") is not None:
        pytest.skip("aim is installed here")
    message = fails(["train", str(config_file), "trainer.report_to=[tensorboard,aim]"])
    assert "trainer.report_to[1]" in message and "pip install 'aim'" in message, message
    assert not rundir.RunDir(tmp_path / "run").holds_run()
    message = fails(["train", str(config_file), "trainer.report_to=[neptune]"])
    assert "trainer.report_to[0]" in message and "wandb" in message, message
    message = fails(["train", str(config_file), "trainer.wandb=true"])
    assert "trainer.wandb: now trainer.report_to" in message, message


# -- 6. hostile configurations and logs --------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion laughs in YAML, as the value of a real key: `width ** levels` values from
    under 900 bytes."""
    anchors = ["&a0 [" + ", ".join(["lol"] * width) + "]"] + [
        f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)
    ]
    return "trainer:\n  steps: [" + ", ".join(anchors) + "]\n"


@pytest.mark.parametrize(
    "text",
    [alias_bomb(), "trainer: &t {steps: 1, again: *t}\n"],  # the second holds itself
    ids=["billion laughs", "recursive alias"],
)
def test_alias_bombs_are_refused_before_the_config_is_built(tmp_path, text):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    message = fails(["eval", "--config", str(path)])
    assert time.perf_counter() - start < 5
    assert str(path) in message and "alias" in message, message


def test_aliases_that_stay_small_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("rollout: &r {n: 4}\ntrainer: {steps: 3}\nx_shared: *r\n")
    with pytest.raises(ConfigError, match="x_shared: unknown key"):  # read, then validated
        load_config(path)
    path.write_text("optim: &o {lr: 0.01}\ntrainer: {steps: 3}\n")
    assert load_config(path).optim.lr == 0.01


def test_an_override_alias_bomb_and_long_override(tmp_path):
    levels = ["&a0 [1,1,1,1,1,1,1,1,1]"] + [
        f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)
    ]
    start = time.perf_counter()
    message = fails(["eval", "trainer.steps=[" + ", ".join(levels) + "]"])
    assert "override trainer.steps" in message and "alias" in message, message
    message = fails(["eval", "trainer.out_dir=" + "x" * 20_000])
    assert "20,016 characters" in message and len(message) < 300, message
    assert time.perf_counter() - start < 5


def test_deeply_nested_yaml_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("trainer: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert str(path) in fails(["eval", "--config", str(path)])


def test_a_wrong_value_is_shown_short():
    message = fails(["eval", "trainer.steps=[" + ", ".join(["'" + "y" * 500 + "'"] * 15) + "]"])
    assert "trainer.steps: expected int" in message and len(message) < 300, message


def test_a_seed_out_of_range_names_its_key():
    assert "trainer.seed" in fails(["eval", "trainer.seed=99999999999999999999"])
    assert "trainer.seed" in fails(["eval", "trainer.seed=-1"])
    assert load_config(None, [f"trainer.seed={2**32 - 1}"]).trainer.seed == 2**32 - 1


HOSTILE_VALUES = {
    "a string": "x",
    "a list": "[1, 2]",
    "a mapping": "{a: 1}",
    "null": "null",
    "a bool": "true",
    "2**66": str(2**66),
    "2**63 - 1": str(2**63 - 1),
    "-1": "-1",
    "0": "0",
    "nan": ".nan",
    "-inf": "-.inf",
    "a subnormal": "1e-320",
    "5,000 characters": "z" * 5000,
    "a NUL": "'\\0'",
}


def config_keys() -> list[str]:
    """Every key of the configuration, each loss's settings included."""
    defaults, keys = config.Config(), []
    for section in dataclasses.fields(defaults):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if f"{section.name}.{f.name}" == "algorithm.loss":
                keys += [
                    f"algorithm.loss.{name}.{g.name}"
                    for name, spec in losses.POLICY_LOSSES.items()
                    for g in dataclasses.fields(spec.settings())
                ]
            else:
                keys.append(f"{section.name}.{f.name}")
    return keys


def test_every_key_with_every_hostile_value():
    """Each value either loads or is refused with one short line naming its key, never another
    error: 14 values on every key of the configuration."""
    bad, refused, accepted = [], 0, 0
    for key in config_keys():
        for label, value in HOSTILE_VALUES.items():
            try:
                load_config(None, [f"{key}={value}"])
                accepted += 1
            except ConfigError as e:
                message = str(e)
                short = "\n" not in message and len(message) < 600
                if short and key.rsplit(".", 1)[0] in message:
                    refused += 1
                else:
                    bad.append((key, label, message[:200]))
            except Exception as e:
                bad.append((key, label, f"{type(e).__name__}: {str(e)[:200]}"))
    assert not bad, bad
    assert refused > 1000 and accepted > 100  # the count of cases, and that both outcomes occur


def deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def test_a_deep_json_line_in_a_metrics_log(tmp_path):
    run = tmp_path / "run"
    make_run(run, steps=20, rollout_steps=())
    with open(run / "metrics.jsonl", "a") as f:
        f.write(deep_json() + "\n")
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    message = fails(["analyze", str(run)])
    assert f"{run / 'metrics.jsonl'}:{lines}" in message and "nested too deeply" in message


@pytest.mark.parametrize(
    "name, text",
    [
        ("trainer_state.json", '{"log_history": ' + deep_json() + "}"),
        ("verl.jsonl", '{"step": 1, "data": ' + deep_json() + "}\n"),
        ("log.jsonl", deep_json() + "\n"),  # not JSON-like: tried as a CSV, over csv's limit
        ("export.csv", "step,x\n" + "1," + "y" * 200_000 + "\n"),
    ],
)
def test_hostile_foreign_logs(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert str(path) in fails(["analyze", str(path)])


def test_deep_json_in_rollouts_and_data_files(tmp_path):
    (tmp_path / "step_000001.jsonl").write_text(deep_json() + "\n")
    with pytest.raises(ValueError, match=r"step_000001\.jsonl:1: not a JSON object"):
        analysis.read_rollouts(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n' + deep_json() + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: JSON nested too deeply"):
        math_problems.read_rows(data)
    problems = tmp_path / "countdown.jsonl"
    problems.write_text(deep_json() + "\n")
    with pytest.raises(ValueError, match=r"countdown\.jsonl:1: invalid Countdown problem"):
        countdown.load_jsonl(problems)


def test_a_deep_state_json_is_a_damaged_checkpoint(two_steps, capsys):
    config_file, run, _ = two_steps
    (run / "checkpoints" / "step_000002" / "state.json").write_text(deep_json())
    main(["train", str(config_file), "trainer.steps=3", "--resume"])
    out = capsys.readouterr().out
    assert "skipped checkpoint step_000002: state.json is unreadable" in out, out
    assert "resumed from step 1" in out


def test_a_full_disk_under_metrics_jsonl_names_it(tmp_path, config_file):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    tmp = tmp_path / ".metrics.jsonl.tmp"
    tmp.symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left on device") as caught:
        rundir.atomic_write_text(tmp_path / "metrics.jsonl", "x" * 100)
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")
    # through the command: a resumed run trims metrics.jsonl first, and the disk is full
    main(["train", str(config_file), "trainer.save_every=2", "trainer.steps=1"])
    run = tmp_path / "run"
    (run / ".metrics.jsonl.tmp").symlink_to("/dev/full")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # one step past checkpoint 1
    message = fails(["train", str(config_file), "--resume"])
    assert f"{run / 'metrics.jsonl'}: No space left on device" in message, message


def test_metrics_log_closing_on_a_full_disk_names_it(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(OSError) as caught:
        log.log(1, {"a": 1.0})
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")
    with pytest.raises(OSError) as caught:  # its buffer fails again as it closes
        log.close()
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")


# -- 7. exit codes -----------------------------------------------------------------------------


def entroprl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entroprl.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_exit_codes(config_file):
    usage = [(), ("train",), ("nonsense",), ("train", "x.yaml", "--allow-config-change")]
    for args in usage:
        done = entroprl(*args)
        assert done.returncode == cli.EXIT_USAGE == 2, (args, done.stderr)
    done = entroprl("train", str(config_file), "trainer.steps=0")
    assert done.returncode == cli.EXIT_ERROR == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "entroprl: configuration error: trainer.steps: must be >= 1"
    ]
    assert cli.EXIT_INTERRUPTED == 130  # as the Ctrl-C tests here and in test_faults.py check
