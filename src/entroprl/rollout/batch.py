"""A rollout: G sampled responses per prompt as one padded batch.

Prompts are left-padded and responses right-padded, so every response starts at the same column
and the response mask is a simple (B, R) block: 1 up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase


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
    (`entroprl.algos.mismatch`). None: not reported (Hugging Face `generate`)."""

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


@dataclass(kw_only=True)
class ScoredRollout:
    """A rollout with its verifier's scores and its rewards, row for row."""

    batch: RolloutBatch
    scores: Tensor
    """(B,) the verifier's score of each response (1 for a correct answer)."""
    rewards: Tensor
    """(B,) the reward the advantages are computed from: the score, plus any shaping of the
    reward (the overlong penalty)."""

    def rows(self, index: Tensor) -> ScoredRollout:
        return ScoredRollout(
            batch=self.batch.rows(index), scores=self.scores[index], rewards=self.rewards[index]
        )

    @staticmethod
    def concat(parts: list[ScoredRollout], pad_token_id: int) -> ScoredRollout:
        """`concat_batches` of the parts' batches, with their scores and rewards."""
        return ScoredRollout(
            batch=concat_batches([p.batch for p in parts], pad_token_id),
            scores=torch.cat([p.scores for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
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
