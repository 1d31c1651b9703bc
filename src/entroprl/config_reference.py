"""docs/config.md, generated from the code: every configuration key with its type, default and the
docstring it has in `entroprl.config` (and, for `algorithm.loss.<name>.<setting>` and
`algorithm.advantage_settings.<name>.<setting>`, in the settings dataclass of each registered policy
loss and advantage estimator).

    python -m entroprl.config_reference > docs/config.md

tests/test_docs.py fails when docs/config.md is not what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from typing import Any

from entroprl import config
from entroprl.algos import advantages, losses

HEADER = """# Configuration reference

Generated from the code by `python -m entroprl.config_reference > docs/config.md`; do not edit by
hand. Every key is set in a YAML file or as `key=value` on the command line (`entroprl train
run.yaml optim.lr=1e-6`); an unknown or ill-typed key is refused with its dotted name.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields of dataclass `cls` (a string right after the
    field), each on one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for field, after in itertools.pairwise(body):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def _cell(value: Any) -> str:
    text = (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    )
    return f"`{text}`".replace("|", "\\|") if text else ""


def _table(prefix: str, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    docs = field_docs(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = str(f.type).replace("|", "\\|")
        text = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {kind} | {_cell(_default(f))} | {text} |")
    return rows


def reference() -> str:
    """The text of docs/config.md."""
    lines = [HEADER]
    for section in dataclasses.fields(config.Config):
        cls = type(_default(section))
        lines += [f"## `{section.name}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
            lines += [" ".join(cls.__doc__.split()), ""]
        lines += [*_table(f"{section.name}.", cls), ""]
    for key, kind, chooser, registry in (
        ("algorithm.loss", "policy loss", "algorithm.policy_loss", losses.POLICY_LOSSES),
        (
            "algorithm.advantage_settings",
            "advantage estimator",
            "algorithm.advantage",
            advantages.ADVANTAGE_ESTIMATORS,
        ),
    ):
        lines += [
            f"## `{key}.<name>`: each {kind}'s own settings",
            "",
            f"Set as `{key}.<name>.<setting>`; the {kind} `{chooser}` names uses its settings, "
            "the defaults below where none are given.",
            "",
        ]
        for name, spec in sorted(registry.items()):
            # entroprl's own: a plug-in registered in this process is not part of the reference
            builtin = spec.fn.__module__.startswith("entroprl.")
            if builtin and dataclasses.fields(spec.settings):
                lines += [f"### `{name}`", "", *_table(f"{key}.{name}.", spec.settings), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
