"""vLLM rollout backend (the ``vllm`` extra).

`VLLMBackend` samples with a vLLM engine colocated with the training model and returns the same
`RolloutBatch` layout as `HFBackend`: left-padded prompts, right-padded responses, the response
mask 1 up to and including the token that stopped the response (EOS) and 0 after it; and with it
the log-probability the engine gave each sampled token (``rollout_log_probs``), which the trainer
compares with its own (`entroprl.algos.mismatch`).

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless the user set it), so
`sync_weights` hands the training model's tensors to the engine without a copy to another process.
It goes through vLLM's in-place reload (``reload_weights`` on the worker, from the
``model_executor/model_loader/reload`` package): a plain ``model.load_weights`` on a live engine
writes into parameters that vLLM has already turned into its kernels' format (repacked for the CPU
kernels, quantized, padded), and on the CPU backend fails outright ("'Parameter' object has no
attribute 'weight_loader'"). The reload restores each layer to its checkpoint layout, loads it,
re-runs the layer's weight processing and copies the result into the original storage, so CUDA
graphs and the engine's references stay valid; it is the same path on CPU and GPU. Under
``torchrun`` every rank holds its own engine (vLLM's ``external_launcher``, one data-parallel rank
per process) and samples its own prompts. vLLM is imported when a `VLLMBackend` is made, never
before.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from entroprl.errors import InputError
from entroprl.rollout.batch import RolloutBatch, build_batch, response_mask_from_ids
from entroprl.train import distributed, lora, parallel


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "rollout.backend=vllm needs vLLM, which is not installed (or failed to import: "
            f"{e}). Install it with pip install 'entroprl[vllm]' on a GPU machine, or "
            "bash scripts/vllm_env.sh for vLLM's CPU build; or use rollout.backend=hf"
        ) from e
    return vllm


def _reloads_in_place(worker: Any) -> bool:
    """Runs on vLLM's worker: whether its model runner can reload weights in place from tensors."""
    reload = getattr(worker.model_runner, "reload_weights", None)
    return reload is not None and "weights_iterator" in inspect.signature(reload).parameters


class VLLMBackend:
    """Sampling with a vLLM engine; the `GenerationBackend` interface of `HFBackend`.

    Prompts are tokenized here as `HFBackend` does (no special tokens added: a chat template
    already holds them), so the training forward sees exactly the sampled token ids. Sampling is
    from the policy itself: no top-k, min-p or repetition penalty, whatever the checkpoint's
    generation config says. ``temperature=0`` decodes greedily. The log-probs it reports are of
    the distribution it sampled from (``logprobs_mode="processed_logprobs"``: after temperature and
    top-p), the behaviour policy of the importance-sampling correction.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dtype: str = "bfloat16",
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        device: torch.device | str | None = None,
        **engine_kwargs: Any,
    ):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise InputError("the tokenizer needs a pad token and an EOS token for batched rollout")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        self.vllm, self.tokenizer = vllm, tokenizer
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type == "cpu":
            # vLLM's CPU worker sizes the KV cache as this fraction of the node's memory minus the
            # process's resident size, which a trainer (model, optimizer, earlier batches) can
            # already exceed at small fractions: the engine then refuses to start. Sized
            # explicitly, the fraction means the same whatever the process holds.
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            engine_kwargs.setdefault("kv_cache_memory_bytes", int(gpu_memory_utilization * total))
        if distributed.world_size() > 1:
            engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            engine_kwargs.setdefault("data_parallel_size", distributed.world_size())
        self.llm = vllm.LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            **engine_kwargs,
        )
        if not all(self.llm.collective_rpc(_reloads_in_place)):
            raise ImportError(
                f"rollout.backend=vllm: vLLM {getattr(vllm, '__version__', '?')} cannot reload "
                "weights in place (its model runner's reload_weights takes no weights_iterator), "
                "so the engine could not follow the policy. Install a newer one: "
                "pip install 'entroprl[vllm]'"
            )
        self.device = torch.device(device)

    def sync_weights(self, model: PreTrainedModel | torch.nn.Module) -> None:
        """Copy the training model's current weights into the engine (vLLM's in-place reload, see
        the module docstring), a LoRA policy's merged with its adapters (`lora.merged_tensors`),
        and drop its prefix cache (the cached keys and values were computed with the old
        weights)."""
        # A generator, in state-dict order (layer by layer, which the reload needs to hold only
        # one layer's tensors at a time): a sharded model is gathered one tensor at a time as
        # vLLM loads it, and the engine runs in this process, so nothing is serialised.
        model = parallel.unwrapped(model)
        tensors = lora.merged_tensors if lora.is_lora(model) else parallel.full_tensors
        weights = tensors(model)
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
        )
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> RolloutBatch:
        tok = self.tokenizer
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        params = self.vllm.SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            top_k=-1,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob, no alternatives
            detokenize=False,  # the batch decodes its texts itself
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False
        )
        samples = [sample for request in outputs for sample in request.outputs]
        if len(samples) != len(prompts) * n:
            raise RuntimeError(
                f"vLLM returned {len(samples)} responses for {len(prompts)} prompts x n={n}"
            )
        responses = [list(sample.token_ids) for sample in samples]
        # vLLM hands log-probs over as one dict per sampled token: there is no tensor to take
        log_probs = [
            [step[token].logprob for step, token in zip(s.logprobs, s.token_ids, strict=True)]
            for s in samples
        ]
        return assemble_batch(
            prompt_ids, responses, n, tok, device=self.device, log_probs=log_probs
        )


def assemble_batch(
    prompt_ids: list[list[int]],
    responses: list[list[int]],
    n: int,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: torch.device | str = "cpu",
    log_probs: list[list[float]] | None = None,
) -> RolloutBatch:
    """The `RolloutBatch` of `n` responses per prompt, given as token lists (prompt-major), with
    the engine's log-prob of each token (`log_probs`, lists shaped like `responses`) if given.

    Row ``i`` holds prompt ``i // n`` left-padded to the longest prompt, then response ``i``
    right-padded to the longest response. A response is its tokens as the engine returned them,
    the stop token (EOS) last when it stopped on one: the response mask is 1 exactly there, and
    tokens past a first EOS (an engine that did not stop) are masked and padded as `HFBackend`
    does.
    """
    if len(responses) != len(prompt_ids) * n:
        raise ValueError(
            f"expected {len(prompt_ids)} prompts x n={n} = {len(prompt_ids) * n} "
            f"responses, got {len(responses)}"
        )
    if any(len(r) == 0 for r in responses):
        raise ValueError("an empty response: the engine must return at least one token")
    if log_probs is not None and [len(x) for x in log_probs] != [len(r) for r in responses]:
        raise ValueError("log_probs must hold one value per response token")
    # assembled on the CPU from the engine's lists, then moved in one copy per tensor
    pad = tokenizer.pad_token_id
    prompts = _padded([p for p in prompt_ids for _ in range(n)], pad, "left")
    response = _padded(responses, pad, "right")
    lengths = torch.tensor([len(r) for r in responses], device="cpu")
    in_response = torch.arange(response.shape[1], device="cpu") < lengths[:, None]
    response_mask = response_mask_from_ids(response, tokenizer.eos_token_id) * in_response
    prompt_lengths = torch.tensor([len(p) for p in prompt_ids], device="cpu").repeat_interleave(n)
    width = prompts.shape[1]
    prompt_mask = (torch.arange(width, device="cpu") >= width - prompt_lengths[:, None]).long()
    device = torch.device(device)
    rollout_log_probs = None
    if log_probs is not None:
        rollout_log_probs = _padded(log_probs, 0.0, "right", torch.float32).to(device)
    return build_batch(
        prompts.to(device),
        prompt_mask.to(device),
        response.to(device),
        response_mask.to(device),
        tokenizer,
        n,
        rollout_log_probs,
    )


def _padded(rows: Iterable[list], pad: float, side: str, dtype: torch.dtype = torch.long) -> Tensor:
    return pad_sequence(
        [torch.tensor(r, dtype=dtype, device="cpu") for r in rows],
        batch_first=True,
        padding_value=pad,
        padding_side=side,
    )
