"""Sampling the responses: the batch a rollout returns (`batch`), the backend protocol and
`make_backend` (`backend`), the training model's own sampler (`hf`, `sampler`) and vLLM
(`vllm`).

`entroprl.rollout` was one module before; its names (`RolloutBatch`, `HFBackend`, ...) are served
from their new modules for one release."""

from entroprl import _moved

__getattr__ = _moved.moved_names(
    "entroprl.rollout", "entroprl.rollout.batch", "entroprl.rollout.hf"
)
