"""The `entroprl` command fails with one line naming the problem the user can act on, and with a
traceback where the fault is entroprl's."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors import SafetensorError

from entroprl.cli import main
from entroprl.demo.models import save_model
from entroprl.errors import USER_ERRORS, SettingError
from entroprl.train import checkpoint
from tests.policies import make_tiny_policy
from tests.test_analysis import make_run
from tests.test_trainer import small_config


def fails(argv: list[str]) -> str:
    """The message `entroprl ARGV` exits with; it must be one line and say it is entroprl's."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    message = caught.value.code
    assert isinstance(message, str), f"exit code {message!r}, no message"
    assert message.startswith("entroprl: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = make_tiny_policy()
    return save_model(model, tok, tmp_path_factory.mktemp("model"))


@pytest.fixture
def config_file(tmp_path, model_dir):
    values = small_config(tmp_path / "run", model={"path": str(model_dir)}).to_dict()
    values["trainer"] |= {"device": "cpu", "steps": 2, "save_every": 1, "eval_every": 0}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.save_every=0", "trainer.save_every"),
        ("trainer.device=gpu", "trainer.device"),
        ("optim.lr=.inf", "optim.lr"),
        ("data.task=gsm9k", "data.task"),
    ],
)
def test_configuration_errors_are_one_line(config_file, override, named):
    assert named in fails(["train", str(config_file), override])


def test_an_out_dir_that_is_a_file(config_file, tmp_path):
    (tmp_path / "file").write_text("")
    message = fails(["train", str(config_file), f"trainer.out_dir={tmp_path / 'file'}"])
    assert str(tmp_path / "file") in message and "not a directory" in message


def test_a_rerun_into_a_run_directory_and_resume_with_overwrite(config_file, tmp_path):
    main(["train", str(config_file), "trainer.steps=1"])
    message = fails(["train", str(config_file)])
    assert "--resume" in message and "--overwrite" in message
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main(["train", str(config_file), "--resume", "--overwrite"])
    main(["train", str(config_file), "--resume"])
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000002"


def test_disk_full_while_checkpointing(config_file, tmp_path, monkeypatch):
    """The second checkpoint cannot be written: the message names it and the disk, its partial
    folder is removed, and the first checkpoint stays the newest."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) > 2:  # optimizer and RNG of step 1 go through
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    message = fails(["train", str(config_file)])
    assert "No space left on device" in message and "step_000002" in message
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_000001"]
    assert (folder / "latest").read_text() == "step_000001"


@pytest.mark.parametrize("command", ["analyze", "compare"])
def test_an_out_that_is_a_file(tmp_path, command):
    make_run(tmp_path / "run", steps=20, rollout_steps=())
    (tmp_path / "file").write_text("")
    message = fails([command, str(tmp_path / "run"), "--out", str(tmp_path / "file")])
    assert str(tmp_path / "file") in message and "not a directory" in message


def test_analyze_smooth_and_compare_pool_from_the_command_line(tmp_path, capsys):
    for seed in range(2):
        make_run(tmp_path / "grpo" / f"seed_{seed}", seed=seed, rollout_steps=())
    main(["analyze", str(tmp_path / "grpo" / "seed_0"), "--smooth", "5"])
    assert "smooth 5" in (tmp_path / "grpo" / "seed_0" / "analysis" / "report.html").read_text()
    runs = [str(tmp_path / "grpo" / f"seed_{seed}") for seed in range(2)]
    main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--pool"])
    assert (tmp_path / "cmp" / "pooled_law.png").is_file()
    assert "smooth must be an odd integer" in fails(["analyze", runs[0], "--smooth", "4"])
    assert "seeds must be at least 1" in fails(["demo", "--seeds", "0"])
    assert "jobs must be at least 1" in fails(["demo", "--jobs", "0"])


def test_law_criteria_from_the_command_line(tmp_path):
    make_run(tmp_path / "run", steps=40, rollout_steps=())
    main(["analyze", str(tmp_path / "run"), "--out", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "analysis.json").read_text())["law"]["valid"] is True
    main(["analyze", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--min-points", "50"])
    law = json.loads((tmp_path / "b" / "analysis.json").read_text())["law"]
    assert law["valid"] is False and law["checks"]["min_points"] == 50
    assert law["reasons"] == [
        "too few points: 40 with both entropy and accuracy, at least 50 are needed"
    ]
    run = str(tmp_path / "run")
    assert "min_points must be at least 4" in fails(["analyze", run, "--min-points", "3"])
    message = fails(["compare", run, "--min-entropy-range", "-1"])
    assert "min_entropy_range must be a finite number >= 0" in message


def test_off_a_terminal_a_run_prints_one_line_per_step(config_file, tmp_path):
    """Redirected to a file, bars would fill it with refreshes: a line per step instead, and no
    library's bar either."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "entroprl.cli", "train", str(config_file), "trainer.progress=true"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "\r" not in output
    steps = [line for line in output.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in steps] == ["step 1/2", "step 2/2"]
    assert all("entropy " in line and "acc " in line for line in steps)


def test_bars_only_on_a_terminal(monkeypatch):
    from entroprl.train import progress

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert progress.bars(True) and not progress.bars(False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not progress.bars(True)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"entroprl {version('entroprl')}"


def test_help_lists_every_command_and_shows_defaults(capsys):
    from entroprl.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    first = top.split("\n\n")[1]  # the description's first line
    assert all(name in first and f"\n    {name} " in top for name in commands), top
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo = " ".join(capsys.readouterr().out.split())
    assert "--seeds SEEDS seeds per method (intervals need >= 2) (default: 3)" in demo
    assert "--out OUT output directory (default: runs/demo)" in demo
    assert "(default: None)" not in demo and "(default: False)" not in demo


@pytest.mark.parametrize(
    "error", [e("the user's fault") for e in USER_ERRORS if e is not SettingError]
)
def test_every_user_error_is_one_line(monkeypatch, error):
    """Each class of `entroprl.errors.USER_ERRORS` reaches the terminal as one line."""
    monkeypatch.setattr("entroprl.analysis.report.analyze_run", lambda *a, **k: raise_(error))
    assert "the user's fault" in fails(["analyze", "some_run"])


def test_a_setting_error_is_one_line(monkeypatch):
    error = SettingError("ratio", "must be in (0, 1]")
    monkeypatch.setattr("entroprl.analysis.report.analyze_run", lambda *a, **k: raise_(error))
    assert "ratio must be in (0, 1]" in fails(["analyze", "some_run"])


def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch):
    """A plain ValueError (a shape check inside entroprl, say) is a bug: it leaves `main` as
    itself, and Python prints its traceback, not one line."""
    error = ValueError("shape mismatch: logp[4, 3], mask[4, 2] must all have the same shape")
    monkeypatch.setattr("entroprl.analysis.report.analyze_run", lambda *a, **k: raise_(error))
    with pytest.raises(ValueError, match="shape mismatch") as caught:
        main(["analyze", "some_run"])
    assert caught.value is error


def test_init_distributed_moved_to_the_distributed_module():
    import entroprl.cli
    from entroprl.train import distributed

    with pytest.warns(DeprecationWarning, match=r"entroprl\.train\.distributed\.init"):
        assert entroprl.cli.init_distributed is distributed.init


def raise_(error: BaseException):
    raise error
