"""Rollout: G sampled responses per prompt, with a KV cache, as one padded batch.

Prompts are left-padded and responses right-padded, so every response starts at the same column
and the response mask is a simple (B, R) block: 1 up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from entroprl import parallel
from entroprl.sampler import sample


@dataclass
class RolloutBatch:
    input_ids: Tensor
    """(B, P + R): left-padded prompt followed by the right-padded response."""
    attention_mask: Tensor
    response_mask: Tensor
    """(B, R) float: 1 for response tokens up to and including the first EOS."""
    group_ids: Tensor
    """(B,) int64: responses to the same prompt share an id (the prompt's index in the call)."""
    texts: list[str]
    """Decoded responses, special tokens removed."""
    rollout_log_probs: Tensor | None = None
    """(B, R) float32: the log-probability the engine gave each sampled token when it sampled it
    (0 at padding), where the backend reports it (vLLM); the trainer compares it with its own
    (`entroprl.mismatch`). None: not reported (Hugging Face `generate`)."""

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, -self.response_mask.shape[1] :]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def rows(self, index: Tensor) -> RolloutBatch:
        """The rows `index` (a 1-D tensor of positions), padding columns no row uses removed."""
        index = index.to(self.input_ids.device)
        P = self.prompt_len
        prompt = self.attention_mask[index, :P]
        response = self.response_mask[index]
        left = P - int(prompt.sum(-1).max().item()) if len(index) else P
        width = int(response.sum(-1).max().item()) if len(index) else 0
        return RolloutBatch(
            input_ids=self.input_ids[index, left : P + width],
            attention_mask=self.attention_mask[index, left : P + width],
            response_mask=response[:, :width],
            group_ids=self.group_ids[index],
            texts=[self.texts[i] for i in index.tolist()],
            rollout_log_probs=None
            if self.rollout_log_probs is None
            else self.rollout_log_probs[index, :width],
        )


def concat_batches(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """One batch of all rows, prompts left-padded and responses right-padded to the longest;
    each batch's group ids are offset past the previous ones so that groups stay apart. Rollout
    log-probs are kept when every batch has them."""
    P = max(b.prompt_len for b in batches)
    R = max(b.response_mask.shape[1] for b in batches)
    ids, attn, resp, groups, texts, logps, offset = [], [], [], [], [], [], 0
    for b in batches:
        left, right = P - b.prompt_len, R - b.response_mask.shape[1]
        ids.append(F.pad(b.input_ids, (left, right), value=pad_token_id))
        attn.append(F.pad(b.attention_mask, (left, right), value=0))
        resp.append(F.pad(b.response_mask, (0, right), value=0.0))
        groups.append(b.group_ids + offset)
        offset += int(b.group_ids.max().item()) + 1 if len(b.group_ids) else 0
        texts += b.texts
        if b.rollout_log_probs is not None:
            logps.append(F.pad(b.rollout_log_probs, (0, right), value=0.0))
    rollout_log_probs = torch.cat(logps) if len(logps) == len(batches) else None
    return RolloutBatch(
        torch.cat(ids),
        torch.cat(attn),
        torch.cat(resp),
        torch.cat(groups),
        texts,
        rollout_log_probs,
    )


def response_mask_from_ids(response_ids: Tensor, eos_token_id: int) -> Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = (response_ids == eos_token_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return (eos_before == 0).float()


def build_batch(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response: Tensor,
    response_mask: Tensor,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    rollout_log_probs: Tensor | None = None,
) -> RolloutBatch:
    """The `RolloutBatch` of left-padded prompts (each repeated `n` times, prompt-major) and their
    right-padded responses: padding outside `response_mask` is set to the pad token (and to 0 in
    `rollout_log_probs`, given as (B, R) like `response`) and the responses are decoded."""
    response = torch.where(response_mask.bool(), response, tokenizer.pad_token_id)
    if rollout_log_probs is not None:
        rollout_log_probs = torch.where(response_mask.bool(), rollout_log_probs, 0.0)
    rows = prompt_ids.shape[0]
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        group_ids=torch.arange(rows // n, device=prompt_ids.device).repeat_interleave(n),
        texts=tokenizer.batch_decode(response, skip_special_tokens=True),
        rollout_log_probs=rollout_log_probs,
    )


class HFBackend:
    """Sampling from a Hugging Face model with a KV cache (`entroprl.sampler.sample`: each distinct
    prompt prefilled once, finished rows dropped; the tokens `model.generate` draws under the same
    seed), in chunks of `batch_size` sequences.

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
            raise ValueError("the tokenizer needs a pad token and an EOS token for batched rollout")
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
            disable=not self.progress or len(starts) == 1,
        )
        with parallel.gathered(self.model):  # a sharded model: gathered once, not every token
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
