"""algorithms.md §1: chunked per-token log-prob and entropy, and the two batch-entropy
conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st

from entroprl.algos.entropy import (
    batch_entropy,
    linear_logprobs_and_entropy,
    logprobs_and_entropy,
)
from entroprl.train import distributed


def numpy_reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """logp and H by the textbook formulas, float64, one row at a time."""
    z_all = logits.detach().to(torch.float64).numpy() / temperature
    tok = tokens.numpy()
    b, t, _ = z_all.shape
    logp, ent = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            z = z_all[i, j]
            top = z.max()
            lse = top + math.log(np.exp(z - top).sum())
            p = np.exp(z - lse)
            logp[i, j] = z[tok[i, j]] - lse
            ent[i, j] = -(p * (z - lse)).sum()
    return logp, ent


def naive_torch(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """The unchunked autograd formulas, in float64."""
    lp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    logp = lp.gather(-1, tokens[..., None]).squeeze(-1)
    return logp, -(lp.exp() * lp).sum(-1)


def random_batch(b=3, t=4, v=50, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(b, t, v, generator=g, dtype=torch.float64)).to(dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    return logits, tokens


@pytest.mark.parametrize("chunk_rows", [1, 3, 5, 12, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_reference_for_any_chunking_and_temperature(chunk_rows, temperature):
    logits, tokens = random_batch()
    logp, ent = logprobs_and_entropy(logits, tokens, temperature=temperature, chunk_rows=chunk_rows)
    ref_logp, ref_ent = numpy_reference(logits, tokens, temperature)
    assert logp.dtype == ent.dtype == torch.float32
    assert logp.shape == ent.shape == (3, 4)
    np.testing.assert_allclose(logp.numpy(), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent.numpy(), ref_ent, rtol=1e-5, atol=1e-5)


def test_bf16_and_fp16_inputs_are_upcast_exactly():
    for dtype in (torch.bfloat16, torch.float16):
        logits, tokens = random_batch(dtype=dtype, v=300)
        logp, ent = logprobs_and_entropy(logits, tokens, chunk_rows=5)
        # The reference sees the same rounded logits, so only float32 arithmetic error remains.
        ref_logp, ref_ent = numpy_reference(logits, tokens)
        assert logp.dtype == torch.float32
        np.testing.assert_allclose(logp.numpy(), ref_logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent.numpy(), ref_ent, rtol=1e-5, atol=1e-5)
    assert logits.dtype == torch.float16  # the input is not modified in place


def test_float64_input_is_computed_in_float64():
    logits, tokens = random_batch(dtype=torch.float64)
    logp, ent = logprobs_and_entropy(logits, tokens, chunk_rows=2, temperature=0.8)
    ref_logp, ref_ent = numpy_reference(logits, tokens, 0.8)
    assert logp.dtype == torch.float64
    np.testing.assert_allclose(logp.numpy(), ref_logp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent.numpy(), ref_ent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sliced_non_contiguous_logits(temperature):
    """The trainer passes `out.logits[:, :-1]`, whose rows do not merge into one view."""
    full, _ = random_batch(b=3, t=6, v=40, dtype=torch.float64)
    logits = full[:, :-1]
    tokens = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError):
        logits.view(-1, 40)
    leaf = full.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(
        leaf[:, :-1], tokens, temperature=temperature, chunk_rows=4, entropy_grad=True
    )
    ref_logp, ref_ent = numpy_reference(logits, tokens, temperature)
    np.testing.assert_allclose(logp.detach().numpy(), ref_logp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent.detach().numpy(), ref_ent, rtol=1e-12, atol=1e-12)
    (logp.sum() + ent.sum()).backward()
    ref = full.clone().requires_grad_(True)
    ref_logp_t, ref_ent_t = naive_torch(ref[:, :-1], tokens, temperature)
    (ref_logp_t.sum() + ref_ent_t.sum()).backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-10, atol=1e-12)
    assert (leaf.grad[:, -1] == 0).all()


def test_known_values_uniform_and_peaked():
    v = 8
    logits = torch.zeros(1, 2, v)
    logits[0, 1, 3] = 1e4  # all mass on token 3
    tokens = torch.tensor([[5, 3]])
    logp, ent = logprobs_and_entropy(logits, tokens)
    assert logp[0, 0].item() == pytest.approx(-math.log(v), abs=1e-6)
    assert ent[0, 0].item() == pytest.approx(math.log(v), abs=1e-6)
    assert logp[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_input_logits_untouched_for_float32():
    logits, tokens = random_batch()
    before = logits.clone()
    logprobs_and_entropy(logits, tokens, temperature=0.5, chunk_rows=4)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
def test_gradients_match_autograd_on_naive_formula(temperature, chunk_rows):
    logits, tokens = random_batch(dtype=torch.float64)
    w_logp = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w_ent = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    ours = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(
        ours, tokens, temperature=temperature, chunk_rows=chunk_rows, entropy_grad=True
    )
    ((w_logp * logp).sum() + (w_ent * ent).sum()).backward()

    ref = logits.clone().requires_grad_(True)
    ref_logp, ref_ent = naive_torch(ref, tokens, temperature)
    ((w_logp * ref_logp).sum() + (w_ent * ref_ent).sum()).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_logp_gradient_alone_and_entropy_detached_by_default():
    logits, tokens = random_batch(dtype=torch.float64)
    ours = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(ours, tokens, chunk_rows=4)
    assert logp.requires_grad and not ent.requires_grad
    logp.sum().backward()
    ref = logits.clone().requires_grad_(True)
    naive_torch(ref, tokens)[0].sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_no_graph_under_no_grad_or_without_requires_grad():
    logits, tokens = random_batch()
    with torch.no_grad():
        logp, ent = logprobs_and_entropy(logits.requires_grad_(True), tokens, entropy_grad=True)
    assert not logp.requires_grad and not ent.requires_grad
    logp, ent = logprobs_and_entropy(logits.detach(), tokens, entropy_grad=True)
    assert not logp.requires_grad and not ent.requires_grad


def test_gradients_match_finite_differences():
    logits, tokens = random_batch(b=2, t=2, v=6, dtype=torch.float64, scale=1.5)
    temperature, eps = 0.9, 1e-6

    def objective(z: torch.Tensor) -> torch.Tensor:
        logp, ent = logprobs_and_entropy(
            z, tokens, temperature=temperature, chunk_rows=3, entropy_grad=True
        )
        return (torch.arange(1.0, 5.0, dtype=torch.float64).view(2, 2) * logp).sum() - 2 * ent.sum()

    z = logits.clone().requires_grad_(True)
    objective(z).backward()
    fd = torch.zeros_like(logits)
    for idx in np.ndindex(*logits.shape):
        up, down = logits.clone(), logits.clone()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (objective(up) - objective(down)) / (2 * eps)
    torch.testing.assert_close(z.grad, fd, rtol=1e-6, atol=1e-8)


def test_bf16_gradient_has_input_dtype_and_is_close():
    logits, tokens = random_batch(dtype=torch.bfloat16, v=64)
    ours = logits.clone().requires_grad_(True)
    logp, ent = logprobs_and_entropy(ours, tokens, chunk_rows=5, entropy_grad=True)
    (logp.sum() + ent.sum()).backward()
    assert ours.grad.dtype == torch.bfloat16
    ref = logits.to(torch.float64).requires_grad_(True)
    ref_logp, ref_ent = naive_torch(ref, tokens)
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(ours.grad.to(torch.float64), ref.grad, rtol=1e-2, atol=1e-2)


def test_grad_path_saves_no_upcast_copies():
    """Autograd must not keep a float32 (B*T, V) copy alive until backward."""
    logits, tokens = random_batch(b=4, t=8, v=1000, dtype=torch.bfloat16)
    logits.requires_grad_(True)
    saved_bytes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != logits.data_ptr():
            saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs_and_entropy(logits, tokens, chunk_rows=4, entropy_grad=True)
    # Besides the logits themselves only (B*T,)-sized vectors are saved.
    assert sum(saved_bytes) <= 3 * 32 * 8


@pytest.mark.parametrize(
    ("logits", "tokens", "kwargs", "match"),
    [
        (torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), {}, "shape mismatch"),
        (torch.zeros(6, 5), torch.zeros(6, dtype=torch.long), {}, r"\(B, T, V\)"),
        (torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), {}, "float"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3), {}, "integer"),
        (torch.zeros(2, 3, 5), torch.full((2, 3), 5), {}, r"\[0, 5\)"),
        (torch.zeros(2, 3, 5), torch.full((2, 3), -1), {}, r"\[0, 5\)"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), {"temperature": 0.0}, "temp"),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), {"temperature": -1}, "temp"),
        (
            torch.zeros(2, 3, 5),
            torch.zeros(2, 3, dtype=torch.long),
            {"temperature": float("nan")},
            "temp",
        ),
        (torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), {"chunk_rows": 0}, "chunk"),
    ],
)
def test_bad_input_raises(logits, tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        logprobs_and_entropy(logits, tokens, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_raise(bad):
    logits, tokens = random_batch()
    logits[1, 2, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or inf .*\[1, 2\]"):
        logprobs_and_entropy(logits, tokens, chunk_rows=5)


# batch_entropy


def test_batch_entropy_hand_example_unequal_lengths_and_empty_row():
    pad = float("nan")  # padding values must be ignored, even NaN
    h = torch.tensor([[1.0, 2.0, 3.0, pad], [4.0, pad, pad, pad], [pad, pad, pad, pad]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    out = batch_entropy(h, mask)
    assert set(out) == {"seq_mean_token_mean", "token_mean"}
    assert out["seq_mean_token_mean"] == pytest.approx((2.0 + 4.0) / 2)  # rows mean 2 and 4
    assert out["token_mean"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    bool_mask = batch_entropy(h, mask.bool())
    assert bool_mask == out


def test_batch_entropy_bad_input():
    h = torch.ones(2, 3)
    with pytest.raises(ValueError, match="selects no token"):
        batch_entropy(h, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        batch_entropy(h, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        batch_entropy(torch.ones(6), torch.ones(6))
    h[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        batch_entropy(h, torch.ones(2, 3))


@st.composite
def entropy_and_mask(draw):
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 6))
    values = draw(st.lists(st.floats(0, 12, allow_nan=False), min_size=b * t, max_size=b * t))
    bits = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    if not any(bits):
        bits[draw(st.integers(0, b * t - 1))] = True
    return np.array(values).reshape(b, t), np.array(bits).reshape(b, t)


@settings(max_examples=60, deadline=None)
@given(entropy_and_mask())
def test_batch_entropy_property_matches_loops(data):
    h, m = data
    out = batch_entropy(torch.tensor(h), torch.tensor(m))
    row_means = [h[i][m[i]].mean() for i in range(h.shape[0]) if m[i].any()]
    assert out["seq_mean_token_mean"] == pytest.approx(np.mean(row_means), rel=1e-9, abs=1e-12)
    assert out["token_mean"] == pytest.approx(h[m].mean(), rel=1e-9, abs=1e-12)
    # Both are averages of valid entropies, and appending an empty response changes neither.
    for value in out.values():
        assert h[m].min() - 1e-9 <= value <= h[m].max() + 1e-9
    padded_h = np.vstack([h, np.full((1, h.shape[1]), 99.0)])
    padded_m = np.vstack([m, np.zeros((1, m.shape[1]), dtype=bool)])
    assert batch_entropy(torch.tensor(padded_h), torch.tensor(padded_m)) == pytest.approx(out)


def _batch_entropy_worker(rank, init_file, h, mask, expected):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = slice(0, 1) if rank == 0 else slice(1, None)
        assert batch_entropy(h[rows], mask[rows]) == pytest.approx(expected, rel=1e-12)
        distributed.shutdown()  # every rank at once: see distributed.shutdown
    finally:
        distributed.shutdown(wait_for_all=False)


@pytest.mark.distributed
def test_batch_entropy_is_global_across_ranks(tmp_path):
    # rank 0: one long response; rank 1: a short one and an empty one
    h = torch.tensor([[1.0, 1.0, 1.0, 5.0], [3.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    expected = {"seq_mean_token_mean": (2.0 + 3.0) / 2, "token_mean": 11.0 / 5}
    assert batch_entropy(h, mask) == pytest.approx(expected)
    mp.spawn(
        _batch_entropy_worker,
        args=(str(tmp_path / "init"), h, mask, expected),
        nprocs=2,
        join=True,
    )


# -- through the output layer (linear_logprobs_and_entropy) ----------------------------------------


def linear_batch(b=3, t=5, h=6, v=11, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype)
    b_ = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    tokens = torch.randint(0, v, (b, t), generator=g)
    return hidden, weight, b_, tokens


@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize(("temperature", "chunk_rows"), [(1.0, 4), (0.7, 1), (1.3, 1024)])
def test_linear_values_and_gradients_match_autograd_on_the_logits(
    entropy_grad, temperature, chunk_rows
):
    """Values and the gradients of hidden states, weight and bias equal plain autograd through
    `hidden @ weight.T + bias` and the naive formulas, in float64, chunks crossing rows."""
    hidden, weight, bias, tokens = linear_batch()
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent = torch.randn(2, *tokens.shape, generator=g, dtype=torch.float64)
    ours = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    logp, ent = linear_logprobs_and_entropy(
        ours[0],
        ours[1],
        tokens,
        bias=ours[2],
        temperature=temperature,
        chunk_rows=chunk_rows,
        entropy_grad=entropy_grad,
    )
    ((w_logp * logp).sum() + (w_ent * ent).sum() * entropy_grad).backward()
    ref = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_logp, ref_ent = naive_torch(ref[0] @ ref[1].T + ref[2], tokens, temperature)
    ((w_logp * ref_logp).sum() + (w_ent * ref_ent).sum() * entropy_grad).backward()
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-12, atol=1e-12)
    assert ent.requires_grad == entropy_grad
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_linear_gradients_match_finite_differences():
    hidden, weight, bias, tokens = linear_batch(b=2, t=2, h=3, v=5)

    def objective(h, w, b):
        logp, ent = linear_logprobs_and_entropy(
            h, w, tokens, bias=b, temperature=0.9, chunk_rows=3, entropy_grad=True
        )
        return (torch.arange(1.0, 5.0, dtype=torch.float64).view(2, 2) * logp).sum() - 2 * ent.sum()

    assert torch.autograd.gradcheck(
        objective, [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    )


def test_linear_tied_weight_and_no_bias():
    """An output layer without bias and only some inputs requiring gradient."""
    hidden, weight, _, tokens = linear_batch(bias=False)
    w = weight.clone().requires_grad_(True)
    logp, _ = linear_logprobs_and_entropy(hidden, w, tokens, chunk_rows=2)
    logp.sum().backward()
    ref = weight.clone().requires_grad_(True)
    naive_torch(hidden @ ref.T, tokens)[0].sum().backward()
    torch.testing.assert_close(w.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_linear_bfloat16_follows_the_logits_path():
    """In bfloat16 each chunk's logits are the output layer's bfloat16 product, as the model's own
    head computes them: the results equal the logits path's, and the gradients are close to
    float64 autograd's, in the inputs' dtype."""
    hidden, weight, bias, tokens = linear_batch(b=4, t=8, h=16, v=64, dtype=torch.bfloat16)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    want = logprobs_and_entropy(logits, tokens)
    ours = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    got = linear_logprobs_and_entropy(ours[0], ours[1], tokens, bias=ours[2], chunk_rows=5)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    got[0].sum().backward()
    ref = [x.to(torch.float64).requires_grad_(True) for x in (hidden, weight, bias)]
    naive_torch(ref[0] @ ref[1].T + ref[2], tokens)[0].sum().backward()
    for a, b in zip(ours, ref, strict=True):
        assert a.grad.dtype == torch.bfloat16
        scale = b.grad.abs().max()
        torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, rtol=0, atol=2e-2)


def test_linear_saves_nothing_of_the_vocabulary_size():
    """Autograd keeps the inputs and (N,)-sized vectors, no logits, their softmax or gradient."""
    hidden, weight, bias, tokens = linear_batch(b=4, t=8, h=8, v=1000, dtype=torch.float32)
    inputs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    pointers = {x.data_ptr() for x in inputs}
    saved_bytes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in pointers:
            saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_logprobs_and_entropy(*inputs[:2], tokens, bias=inputs[2], entropy_grad=True)
    # the flattened hidden states (a view, or one (N, H) copy), the tokens and the entropies
    assert sum(saved_bytes) <= 32 * 8 * 4 + 32 * 8 + 32 * 4


def test_linear_returns_tensors_that_are_not_views():
    """What the fused head's model forward returns: a view there makes FSDP2 warn that in-place
    ops on it would skip its backward hook, on every sharded forward."""
    hidden, weight, bias, tokens = linear_batch(b=2, t=5, h=8, v=50, dtype=torch.float32)
    logp, entropy = linear_logprobs_and_entropy(hidden, weight.requires_grad_(), tokens, bias=bias)
    assert logp.shape == entropy.shape == tokens.shape
    assert not logp._is_view() and not entropy._is_view()


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((2, 3, 4), (5, 4), (2, 4)), {}, "shape mismatch"),
        (((6, 4), (5, 4), (6,)), {}, r"\(B, T, H\)"),
        (((2, 3, 4), (5, 3), (2, 3)), {}, r"weight must be \(V, 4\)"),
        (((2, 3, 4), (5, 4), (2, 3)), {"bias": torch.zeros(4)}, r"bias must be \(5,\)"),
        (((2, 3, 4), (5, 4), (2, 3)), {"temperature": 0.0}, "temp"),
        (((2, 3, 4), (5, 4), (2, 3)), {"chunk_rows": 0}, "chunk"),
    ],
)
def test_linear_bad_input_raises(shapes, kwargs, match):
    hidden, weight, tokens = torch.zeros(shapes[0]), torch.zeros(shapes[1]), torch.zeros(shapes[2])
    with pytest.raises(ValueError, match=match):
        linear_logprobs_and_entropy(hidden, weight, tokens.long(), **kwargs)


def test_linear_token_out_of_range_and_non_finite_raise():
    hidden, weight, _, tokens = linear_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        linear_logprobs_and_entropy(hidden, weight, tokens + 11)
    hidden[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf .*\[1, 2\]"):
        linear_logprobs_and_entropy(hidden, weight, tokens)
