"""The modules' old import paths, from before the package was grouped into subpackages by role,
kept for one release: `import entroprl.trainer` gives the very module object
`entroprl.train.trainer` (so a monkeypatch through either name acts on both), with a
DeprecationWarning naming the new path.

A finder rather than a file per old name: the old files are gone, so git follows each one to its
new place.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "entroprl.entropy": "entroprl.algos.entropy",
    "entroprl.dynamics": "entroprl.algos.dynamics",
    "entroprl.advantages": "entroprl.algos.advantages",
    "entroprl.mismatch": "entroprl.algos.mismatch",
    "entroprl.checks": "entroprl.algos.checks",
    "entroprl.losses": "entroprl.algos.losses",
    "entroprl.backends": "entroprl.rollout.backend",
    "entroprl.sampler": "entroprl.rollout.sampler",
    "entroprl.vllm_backend": "entroprl.rollout.vllm",
    "entroprl.trainer": "entroprl.train.trainer",
    "entroprl.forward": "entroprl.train.forward",
    "entroprl.parallel": "entroprl.train.parallel",
    "entroprl.precision": "entroprl.train.precision",
    "entroprl.allocator": "entroprl.train.allocator",
    "entroprl.distributed": "entroprl.train.distributed",
    "entroprl.checkpoint": "entroprl.train.checkpoint",
    "entroprl.rundir": "entroprl.train.rundir",
    "entroprl.progress": "entroprl.train.progress",
    "entroprl.policy": "entroprl.train.policy",
    "entroprl.lora": "entroprl.train.lora",
    "entroprl.evaluation": "entroprl.tasks.evaluation",
    "entroprl.rewards": "entroprl.tasks.rewards",
    "entroprl.comparison": "entroprl.analysis.comparison",
    "entroprl.law": "entroprl.analysis.law",
    "entroprl.stats": "entroprl.analysis.stats",
    "entroprl.foreign": "entroprl.analysis.foreign",
    "entroprl.report": "entroprl.analysis.report",
    "entroprl.warmstart": "entroprl.demo.warmstart",
    "entroprl.models": "entroprl.demo.models",
    "entroprl.tokenizer": "entroprl.demo.tokenizer",
}
"""Old module -> its new place. `entroprl.rollout`, `entroprl.analysis` and `entroprl.demo` are
packages now: their old names are served by the package (`moved_names`)."""


def warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old name goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return None  # a placeholder, replaced in sys.modules by the real module below

    def exec_module(self, module) -> None:
        # importlib returns what sys.modules holds under the name once this returns, and sets
        # it as the parent package's attribute: the new module itself, not a copy
        new = MOVED[module.__name__]
        warn(module.__name__, new)
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def moved_names(package: str, *modules: str):
    """A package's `__getattr__` serving the names of the module the package replaced (its old
    path was `package`, its code is now in `modules`), with a DeprecationWarning."""

    def __getattr__(name: str):
        if not name.startswith("__"):
            for module in modules:
                target = importlib.import_module(module)
                if hasattr(target, name):
                    warn(f"{package}.{name}", f"{module}.{name}")
                    value = getattr(target, name)
                    vars(sys.modules[package])[name] = value  # warned once
                    return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
