"""The README's doors run as written: its Python examples and those of docs/library.md, and its
commands that run on a CPU (the analyze door on the shipped TRL log, the trainer door on the demo's
configuration, shortened to a few steps)."""

import re
import shlex
from pathlib import Path

import pytest

from entroprl import cli
from entroprl.algos import losses

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "library.md"], ids=lambda p: p.name)
def test_python_examples_run(page, monkeypatch):
    # the library page registers a loss of its own: kept out of the registry other tests read
    registry = dict(losses.POLICY_LOSSES)
    monkeypatch.setattr(losses, "POLICY_LOSSES", registry)
    monkeypatch.setattr(losses.registry, "POLICY_LOSSES", registry)
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert blocks, f"{page.name} has no Python example"
    exec(compile("\n".join(blocks), str(page), "exec"), {})


def door_commands(door: str) -> list[list[str]]:
    """The `entroprl ...` lines of the README's bash blocks under the heading `door`."""
    text = README.read_text()
    section = text[text.index(door) :]
    section = section[: section.index("\n### ", 1) if "\n### " in section[1:] else None]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("entroprl ")]


def in_a_copy(tmp_path, monkeypatch):
    """Run in an empty directory that sees the clone's examples/ and src/ where the README does."""
    for name in ("examples", "src", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)


def test_the_analyze_door(tmp_path, monkeypatch):
    (command,) = door_commands("### 1. Analyse the runs you already have")
    in_a_copy(tmp_path, monkeypatch)
    cli.main(command)
    assert (tmp_path / "runs" / "analysis" / "report.html").is_file()


@pytest.mark.slow
def test_the_trainer_door(tmp_path, monkeypatch):
    train, analyze = door_commands("### 3. Train with entroprl's trainer")[:2]
    assert train[0] == "train" and analyze[0] == "analyze"
    in_a_copy(tmp_path, monkeypatch)
    cli.main([*train, "trainer.steps=3", "trainer.eval_every=3", "trainer.progress=false"])
    cli.main(analyze)
    run = tmp_path / analyze[1]
    assert (run / "metrics.jsonl").is_file() and (run / "analysis" / "report.html").is_file()


def test_every_train_command_is_a_configuration_the_trainer_accepts(tmp_path, monkeypatch):
    """Each `entroprl train` line of the README, its configuration file with its overrides,
    passes the configuration's checks (one once asked for LoRA where it was refused)."""
    from entroprl.config import load_config

    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("entroprl train ")]
    assert len(commands) >= 2
    in_a_copy(tmp_path, monkeypatch)
    for command in commands:
        args = cli.build_parser().parse_args(command)
        load_config(args.config, args.overrides)
