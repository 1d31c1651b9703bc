"""Entropy dynamics: how one update changes policy entropy, and the covariances that drive it.

algorithms.md §2 and §3.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entroprl.algos.checks import check_finite, check_nonempty, check_same_shape
from entroprl.algos.entropy import compute_dtype, log_softmax_rows, row_chunk, row_slices, rowdot
from entroprl.train import distributed


def token_covariance(
    logp: Tensor, advantages: Tensor, mask: Tensor, *, across_ranks: bool = True
) -> Tensor:
    """Token-level covariance terms over the valid tokens of the selection scope (algorithms.md §3).

        cov[i,t] = (logp[i,t] - mean(logp)) * (A[i,t] - mean(A)),   means over tokens with m = 1

    The scope is the tensors passed in; with `across_ranks` and torch.distributed running, the means
    are taken over the valid tokens of every rank. `logp` is detached: the covariance only selects
    tokens. Padding positions get 0.
    """
    check_same_shape(logp=logp, advantages=advantages, mask=mask)
    check_finite("advantages", advantages, mask)
    check_finite("logp", logp, mask)
    valid = mask.bool()
    m = valid.to(torch.float64)
    # where, not a product with the mask: NaN or inf at padding must not reach the sums
    logp = torch.where(valid, logp.detach().to(torch.float64), 0.0)
    adv = torch.where(valid, advantages.detach().to(torch.float64), 0.0)
    sums = torch.stack([(logp * m).sum(), (adv * m).sum(), m.sum()])
    if across_ranks:
        sums = distributed.all_reduce_sum(sums)
    check_nonempty(sums[2], "mask (over the covariance scope)")
    mean_logp, mean_adv = sums[0] / sums[2], sums[1] / sums[2]
    return ((logp - mean_logp) * (adv - mean_adv) * m).to(advantages.dtype)


def first_order_entropy_change(
    logits: Tensor, logit_delta: Tensor, *, chunk_rows: int = 1024
) -> Tensor:
    """First-order change of the softmax entropy when the logits move by `logit_delta`
    (algorithms.md §2).

        dH ≈ -Cov_{a~pi}(log pi(a), dz(a))
           = -(sum_a pi_a log pi_a dz_a - (sum_a pi_a log pi_a)(sum_a pi_a dz_a))

    computed as -sum_a pi_a (log pi_a + H) dz_a, the same quantity since E_pi[log pi] = -H. One
    value per row: the last dimension is the action (vocabulary) axis, leading dimensions are kept.
    Vanilla policy gradient on a tabular softmax has dz = eta*pi*A, natural policy gradient
    dz = eta*A. A diagnostic: inputs are detached, and rows are processed `chunk_rows` at a time so
    a full-vocabulary float32 copy is never made. float64 if either input is float64, else float32.
    """
    check_same_shape(logits=logits, logit_delta=logit_delta)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty action dimension, got {list(logits.shape)}")
    check_finite("logits", logits)
    check_finite("logit_delta", logit_delta)
    dtype = compute_dtype(logits, logit_delta)
    n = logits.shape[:-1].numel()
    out = torch.empty(n, dtype=dtype, device=logits.device)
    with torch.no_grad():
        for rows in row_slices(n, chunk_rows):
            out[rows] = _neg_cov_rows(logits.detach(), logit_delta.detach(), rows, dtype)
    return out.view(logits.shape[:-1])


def _neg_cov_rows(z: Tensor, dz: Tensor, rows: slice, dtype: torch.dtype) -> Tensor:
    """-Cov_pi(log pi, dz) for rows `rows`; its buffers die when it returns."""
    log_pi = log_softmax_rows(z, rows, dtype)
    pi = log_pi.exp()
    entropy = -rowdot(pi, log_pi)
    return -rowdot(pi.mul_(log_pi.add_(entropy[:, None])), row_chunk(dz, rows).to(dtype))


def covariance_summary(
    cov: Tensor,
    mask: Tensor,
    *,
    fractions: tuple[float, ...] = (0.0002, 0.002, 0.02, 0.2, 0.5),
    across_ranks: bool = True,
) -> dict[str, float]:
    """Mean token covariance of the top fractions of valid tokens (the paper's covariance groups).

    The N valid tokens (m = 1) are ranked by `cov` (algorithms.md §3, e.g. from `token_covariance`);
    for each fraction p the value is the mean of the top k = max(ceil(p*N), 1) of them, under the
    key "top_{100p}%" (0.02 -> "top_2%"). "all" is the mean over all valid tokens. Ties do not
    matter: tied tokens have the same value. p*N is rounded to 9 decimals before the ceiling so
    float error (0.2*N landing just above an integer) cannot add a token. With `across_ranks` and
    torch.distributed running, the ranking is over the valid tokens of every rank.
    """
    check_same_shape(cov=cov, mask=mask)
    for p in fractions:
        if not 0 < p <= 1:
            raise ValueError(f"fractions must lie in (0, 1], got {p}")
    check_finite("cov", cov, mask)
    values = cov.detach()[mask.bool()].to(torch.float64)
    if across_ranks:
        values, _ = distributed.all_gather_cat(values)
    n = check_nonempty(values.new_tensor(values.numel()), "mask (for the covariance summary)")
    cumulative = torch.sort(values, descending=True).values.cumsum(0)
    summary = {}
    for p in fractions:
        k = max(math.ceil(round(p * n, 9)), 1)
        summary[f"top_{100 * p:g}%"] = float(cumulative[k - 1] / k)
    summary["all"] = float(cumulative[-1] / n)
    return summary


def response_mean_logp(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean token log-prob of each response, sum_t(logp*m)[i] / sum_t(m)[i], shape (B,).

    Raises on a response with no valid token: its mean is undefined.
    """
    check_same_shape(logp=logp, mask=mask)
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got {list(logp.shape)}")
    check_finite("logp", logp, mask)
    valid = mask.bool()
    lengths = valid.sum(-1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().reshape(-1).tolist()
        raise ValueError(f"mask selects no token in responses {empty}: their mean is undefined")
    return torch.where(valid, logp.detach().to(torch.float64), 0.0).sum(-1) / lengths


def response_covariance(
    response_logp: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    *,
    weighted: bool = False,
    across_ranks: bool = False,
) -> float:
    """Response-level covariance behind the paper's Fig. 8 check (algorithms.md §2).

    Each prompt is a state and each of its G sampled responses an action. Per group g:

        cov_g = (1/G) sum_i (x_i - mean_g x)(y_i - mean_g y),   x = response_logp,
        y = A, or pi*A when `weighted` (vanilla policy gradient), with pi = exp(response_logp)

    and the result is the plain mean of cov_g over groups. `response_logp` is the response's mean
    token log-prob (`response_mean_logp`), so pi is the geometric-mean per-token probability; the
    sequence probability exp(sum logp) would underflow for long responses and make pi*A vanish.
    The covariance is the population one (1/G): it is taken under the distribution of the sampled
    responses. A group of one response has covariance 0 and counts as such in the mean. All inputs
    are (B,); `group_ids` are integer prompt ids (any values, responses need not be contiguous).
    With `across_ranks` and torch.distributed running, the mean is over every rank's groups (a
    group never spans ranks), and a rank may hold none.
    """
    check_same_shape(response_logp=response_logp, advantages=advantages, group_ids=group_ids)
    if response_logp.dim() != 1:
        raise ValueError(f"response_logp must be (B,), got {list(response_logp.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must hold integer ids, got {group_ids.dtype}")
    check_finite("response_logp", response_logp)
    check_finite("advantages", advantages)
    x = response_logp.detach().to(torch.float64)
    y = advantages.detach().to(torch.float64)
    if weighted:
        y = x.exp() * y
    _, group, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sizes = sizes.to(torch.float64)

    def group_mean(v: Tensor) -> Tensor:
        return torch.zeros_like(sizes).index_add_(0, group, v) / sizes

    dx = x - group_mean(x)[group]
    dy = y - group_mean(y)[group]
    totals = torch.stack([group_mean(dx * dy).sum(), sizes.new_tensor(sizes.numel())])
    if across_ranks:
        totals = distributed.all_reduce_sum(totals)
    check_nonempty(totals[1], "response batch")
    return float(totals[0] / totals[1])
