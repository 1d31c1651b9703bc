#!/usr/bin/env bash
# The first-GPU check (scripts/gpu_check.py): a few GRPO steps of a Qwen2.5-0.5B-shaped policy with
# bf16 compute and vLLM colocated, nothing downloaded, then the GPU tests (pytest -m gpu); meant to
# finish in under 8 minutes on one H100 or H200. Needs torch, transformers and pytest, and vLLM
# for the engine (entroprl itself is taken from src/); without vLLM it says so and samples with
# the Hugging Face backend instead, which measures everything but the engine and the mismatch.
# The check runs twice, the second time with the fused head (model.fused_head), for the two side by
# side. Extra arguments go to both gpu_check.py runs (--tiny: the CPU-sized run that the vLLM tests
# make, which skips the GPU tests; --legacy: the first GPU run's settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
backend=vllm
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
    backend=hf
    echo "vLLM is not installed for $PY: rollout.backend=hf instead; the colocated engine and the" \
        "rollout/training mismatch are NOT measured by this run"
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| device:',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU, CPU')"
timeout 300 "$PY" scripts/gpu_check.py --backend "$backend" "$@"
timeout 240 "$PY" scripts/gpu_check.py --backend "$backend" --fused-head "$@"
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
fi
