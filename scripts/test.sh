#!/usr/bin/env bash
# Installs entroprl and its test tools into .venv (idempotent), then runs lint and every test,
# the slow end-to-end ones included; then the TRL and verl integrations' tests, each in its own
# environment (.venv-trl, .venv-verl: verl 0.9 pins transformers<5.11), created the same way.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# The CPU build of torch first, so that the range in pyproject.toml installs nothing bigger.
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[dev,data]"
ruff check .
ruff format --check .
python -m pytest -m "not slow" -q
python -m pytest -m slow -q

# integration NAME EXTRAS MARKERS TESTS...: install entroprl with EXTRAS into .venv-NAME (torch
# pinned first, as above) and run TESTS' MARKERS tests there; where the framework cannot be
# installed on this machine, say so and go on.
integration() {
    local name=$1 extras=$2 markers=$3 env=".venv-$1"
    shift 3
    if { [ -x "$env/bin/python" ] || "$PY" -m venv "$env"; } &&
        "$env/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 &&
        "$env/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,$extras]"; then
        "$env/bin/python" -m pytest -m "$markers" -q "$@"
    else
        echo "warning: $name could not be installed on this machine: its tests are skipped" >&2
    fi
}
integration trl "data,trl,wandb" "trl or wandb" tests/test_trl_integration.py \
    tests/test_wandb_logger.py
integration verl verl verl tests/test_verl_integration.py
