#!/usr/bin/env bash
# Installs entroprl and its test tools into .venv (idempotent), then runs lint and every test,
# the slow end-to-end ones included. This is the README's test command and what CI runs.
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
