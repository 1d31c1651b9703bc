"""What samples rollouts: the interface every generation backend follows, and the factory that
builds the one `rollout.backend` names (`HFBackend`, `VLLMBackend`)."""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroprl.algos.checks import check_choice
from entroprl.config import BACKENDS, Config
from entroprl.errors import ConfigError
from entroprl.rollout.batch import RolloutBatch
from entroprl.rollout.hf import HFBackend
from entroprl.rollout.vllm import VLLMBackend
from entroprl.train import distributed, parallel
from entroprl.train.policy import model_dir


class GenerationBackend(Protocol):
    """Anything that can sample responses for the trainer (Hugging Face here, vLLM on GPUs)."""

    def generate(
        self, prompts: list[str], *, n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> RolloutBatch: ...

    def sync_weights(self, model: PreTrainedModel) -> None: ...


def make_backend(
    config: Config, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase
) -> GenerationBackend:
    """The rollout backend named by ``config.rollout.backend``.

    ``hf``: `HFBackend` on `model`. ``vllm``: a `VLLMBackend` that loads ``config.model.path``
    (the same checkpoint as the training model; call ``sync_weights`` before each rollout so that
    it samples from the current policy) in the dtype the policy's forward runs in
    (``model.compute_dtype``, else ``model.dtype``), seeded with ``config.trainer.seed``, with
    ``rollout.gpu_memory_utilization`` and ``rollout.enforce_eager``; `model` may be None
    (evaluation needs no training copy).
    """
    name = config.rollout.backend
    check_choice("rollout.backend", name, BACKENDS)
    if name == "hf":
        if model is None:
            raise ValueError("rollout.backend=hf samples from the training model: pass it")
        return HFBackend(
            model,
            tokenizer,
            config.rollout.generation_batch_size,
            progress=config.trainer.progress and distributed.rank() == 0,
            synced=parallel.is_sharded(model) and distributed.world_size() > 1,
            static_cache=config.rollout.static_cache,
        )
    if config.model.path is None:
        raise ConfigError(
            "model.path: rollout.backend=vllm loads the model from a checkpoint "
            "directory; set model.path"
        )
    device = next(model.parameters()).device if model is not None else None
    return VLLMBackend(
        str(model_dir(config.model.path)),
        tokenizer,
        dtype=config.model.compute_dtype or config.model.dtype,
        seed=config.trainer.seed,
        gpu_memory_utilization=config.rollout.gpu_memory_utilization,
        device=device,
        enforce_eager=config.rollout.enforce_eager,
    )
