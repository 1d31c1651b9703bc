"""The Hugging Face backend: the training model itself samples the rollout, with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from entroprl.errors import InputError
from entroprl.rollout.batch import RolloutBatch, build_batch, response_mask_from_ids
from entroprl.rollout.sampler import sample
from entroprl.train import compiled, parallel
from entroprl.train.progress import bars


class HFBackend:
    """Sampling from a Hugging Face model with a KV cache (`entroprl.rollout.sampler.sample`: each
    distinct prompt prefilled once, finished rows dropped; the tokens `model.generate` draws under
    the same seed), in chunks of `batch_size` sequences.

    `temperature=0` decodes greedily. The policy's own distribution is sampled: temperature and
    top-p only, not the model's `generation_config` (whose top-k, repetition penalty and the like
    `model.generate` would add). With `progress`, a bar follows the chunks of calls that need more
    than one. `synced` is for a model sharded over ranks (FSDP): every rank keeps stepping until all
    ranks' sequences have stopped, so it samples with `model.generate(synced_gpus=True)`, which
    keeps the ranks' forwards in step (no rows dropped, each prompt prefilled n times, the model's
    generation_config applied); every rank must then make the same calls with the same number of
    prompts. A sharded model is gathered once for each call (a whole copy in its compute dtype on
    every rank, as verl's Hugging Face rollout does), not for every token.

    `static_cache` (None: on a GPU, for a model that is not sharded) decodes with the sampler's
    fixed-shape cache, each step replayed as a CUDA graph there (`sampler._decode_static`); True
    also on the CPU, where no graph is captured.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 256,
        *,
        progress: bool = False,
        synced: bool = False,
        static_cache: bool | None = None,
    ):
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise InputError("the tokenizer needs a pad token and an EOS token for batched rollout")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.progress, self.synced, self.static_cache = progress, synced, static_cache

    def sync_weights(self, model: PreTrainedModel) -> None:
        self.model = model

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> RolloutBatch:
        tok = self.tokenizer
        tok.padding_side = "left"
        device = next(self.model.parameters()).device
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        distinct_ids, distinct_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        owner = torch.arange(len(prompts), device=device).repeat_interleave(n)
        was_training = self.model.training
        self.model.eval()
        chunks = []
        starts = range(0, len(owner), self.batch_size)
        bar = tqdm(
            starts,
            desc="generate",
            unit="chunk",
            leave=False,
            disable=not bars(self.progress) or len(starts) == 1,
        )
        # a sharded model: gathered once, not every token; compiled layers: run eagerly
        with parallel.gathered(self.model), compiled.eager():
            for start in bar:
                # a chunk may begin or end inside a prompt's group: its prompts with their counts
                rows, counts = owner[start : start + self.batch_size].unique_consecutive(
                    return_counts=True
                )
                chunks.append(
                    self._sample(
                        distinct_ids[rows],
                        distinct_mask[rows],
                        counts,
                        temperature=temperature,
                        top_p=top_p,
                        max_new_tokens=max_new_tokens,
                    )
                )
        self.model.train(was_training)
        width = max(c.shape[1] for c in chunks)
        response = torch.cat(
            [F.pad(c, (0, width - c.shape[1]), value=tok.pad_token_id) for c in chunks]
        )
        response_mask = response_mask_from_ids(response, tok.eos_token_id)
        return build_batch(
            distinct_ids[owner], distinct_mask[owner], response, response_mask, tok, n
        )

    def _sample(
        self,
        ids: Tensor,
        mask: Tensor,
        counts: Tensor,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> Tensor:
        """Responses (counts.sum(), T) to the distinct prompts `ids`, `counts[i]` to prompt i."""
        tok = self.tokenizer
        if not self.synced:
            static = self.static_cache
            if static is None:
                static = ids.device.type == "cuda" and not parallel.is_sharded(self.model)
            return sample(
                self.model,
                ids,
                mask,
                counts,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                static_cache=static,
            )
        sampling = (
            # top_k=0: sample from the policy itself, not transformers' default top-50
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature > 0
            else {"do_sample": False}
        )
        config = GenerationConfig(
            **sampling,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        expand = torch.arange(len(counts), device=ids.device).repeat_interleave(counts)
        out = self.model.generate(
            input_ids=ids[expand],
            attention_mask=mask[expand],
            generation_config=config,
            synced_gpus=True,
        )
        return out[:, ids.shape[1] :]
