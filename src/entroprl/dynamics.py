"""Entropy dynamics: how one update changes policy entropy, and the covariances that drive it.

SPEC sections 2 and 3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entroprl import distributed
from entroprl.checks import check_finite, check_nonempty, check_same_shape


def token_covariance(
    logp: Tensor, advantages: Tensor, mask: Tensor, *, across_ranks: bool = True
) -> Tensor:
    """Token-level covariance terms over the valid tokens of the selection scope (SPEC 3).

        cov[i,t] = (logp[i,t] - mean(logp)) * (A[i,t] - mean(A)),   means over tokens with m = 1

    The scope is the tensors passed in; with `across_ranks` and torch.distributed running, the means
    are taken over the valid tokens of every rank. `logp` is detached: the covariance only selects
    tokens. Padding positions get 0.
    """
    check_same_shape(logp=logp, advantages=advantages, mask=mask)
    check_finite("advantages", advantages, mask)
    check_finite("logp", logp, mask)
    m = mask.to(torch.float64)
    logp = logp.detach().to(torch.float64)
    adv = advantages.detach().to(torch.float64)
    sums = torch.stack([(logp * m).sum(), (adv * m).sum(), m.sum()])
    if across_ranks:
        sums = distributed.all_reduce_sum(sums)
    check_nonempty(sums[2], "mask (over the covariance scope)")
    mean_logp, mean_adv = sums[0] / sums[2], sums[1] / sums[2]
    return ((logp - mean_logp) * (adv - mean_adv) * m).to(advantages.dtype)
