#!/usr/bin/env bash
# The first-GPU check (scripts/gpu_check.py): a few GRPO steps of a Qwen2.5-0.5B-shaped policy with
# bf16 compute and vLLM colocated, nothing downloaded, then the GPU tests (pytest -m gpu). Needs
# torch, transformers and pytest, and vLLM for the engine (entroprl itself is taken from src/);
# without vLLM it says so and samples with the Hugging Face backend instead, which measures
# everything but the engine and the mismatch. The check runs once for each of the update's
# variants, side by side: as configured, with the fused head (model.fused_head), and with the fused
# head and compiled decoder layers (model.compile; not with --legacy, the first GPU run's
# settings), each limited to GPU_CHECK_LIMIT seconds (default 180: the three variants and the
# GPU tests fit one 10-minute call). A variant that fails is reported, the next one runs, and the
# script exits non-zero. Extra arguments go to every gpu_check.py run (--tiny: the
# CPU-sized run that the vLLM tests make, which skips the GPU tests; --legacy: the first GPU run's
# settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
limit=${GPU_CHECK_LIMIT:-180}
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
failed=0
variants=("" "--fused-head")
case " $* " in
*" --legacy "*) ;;
*) variants+=("--fused-head --compile") ;;
esac
for variant in "${variants[@]}"; do
    # shellcheck disable=SC2086  # the variant's flags, split
    timeout "$limit" "$PY" scripts/gpu_check.py --backend "$backend" $variant "$@" ||
        { echo "FAILED: gpu_check.py $variant"; failed=1; }
done
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
fi
exit $failed
