"""The package's shape: no module imports another that imports it back (at any depth, imports
inside functions and type-only imports included), the commands that only read logs start without
torch, and the modules' old paths still import the modules themselves."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "entroprl"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each entroprl module -> the entroprl modules it imports, wherever in the file: inside
    functions and under `if TYPE_CHECKING:` too (a type-only circle is still a circle: the two
    modules cannot be read apart)."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                targets |= subs or ({base} & modules.keys())
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names} & modules.keys()
        graph[name] = targets - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"entroprl.train.trainer", "entroprl.algos.losses", "entroprl.cli"} <= graph.keys()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_graph_sees_type_only_imports(tmp_path, monkeypatch):
    """The config/tasks circle was type-only: `if TYPE_CHECKING:` imports count."""
    package = tmp_path / "entroprl"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from entroprl import b\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from entroprl.a import X\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", package)
    assert _cycle(import_graph()) == ["entroprl.a", "entroprl.b", "entroprl.a"]


OLD_PATHS = {
    "entroprl.trainer": "entroprl.train.trainer",
    "entroprl.losses": "entroprl.algos.losses",
    "entroprl.sampler": "entroprl.rollout.sampler",
    "entroprl.law": "entroprl.analysis.law",
    "entroprl.warmstart": "entroprl.demo.warmstart",
    "entroprl.rewards": "entroprl.tasks.rewards",
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_path_is_the_new_module_itself(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported by an earlier test
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {OLD_PATHS[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(OLD_PATHS[old])


def test_a_monkeypatch_through_the_old_path_reaches_the_new(monkeypatch):
    from entroprl.train import trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        monkeypatch.setattr("entroprl.trainer.make_backend", "patched")
    assert trainer.make_backend == "patched"


def test_the_packages_that_were_modules_serve_their_old_names(monkeypatch):
    """`entroprl.rollout`, `.analysis` and `.demo` were modules: `from entroprl.rollout import
    RolloutBatch` still works, warned, and an unknown name is still an AttributeError."""
    import entroprl.analysis
    import entroprl.rollout
    from entroprl.analysis import runs
    from entroprl.rollout import batch, hf

    for package, name in (
        (entroprl.rollout, "RolloutBatch"),
        (entroprl.rollout, "HFBackend"),
        (entroprl.analysis, "load_run"),
    ):  # served once already (warned, then kept): served afresh here
        vars(package).pop(name, None)

    with pytest.warns(DeprecationWarning, match=r"entroprl\.rollout\.batch\.RolloutBatch"):
        from entroprl.rollout import RolloutBatch
    with pytest.warns(DeprecationWarning):
        from entroprl.rollout import HFBackend
    with pytest.warns(DeprecationWarning):
        from entroprl.analysis import load_run
    assert (RolloutBatch, HFBackend, load_run) == (batch.RolloutBatch, hf.HFBackend, runs.load_run)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = entroprl.rollout.nothing


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_log_reading_commands_import_without_torch():
    """`entroprl analyze` and `compare` (the command line, the log readers, the reports) need no
    torch: they start fast, and could be installed light."""
    code = (
        "import sys\n"
        "import entroprl.cli, entroprl.analysis, entroprl.analysis.report, "
        "entroprl.analysis.comparison, entroprl.analysis.runs, entroprl.analysis.foreign, "
        "entroprl.train.rundir, entroprl.analysis.law\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
