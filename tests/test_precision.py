"""Mixed precision without FSDP (`entroprl.train.precision`): the bfloat16 compute copy and the
float32 attention inside it."""

import copy
import math

import pytest
import torch

from entroprl.demo.models import build_model, tiny_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.errors import ConfigError
from entroprl.tasks.base import Example, Task
from entroprl.train import distributed, parallel
from entroprl.train.forward import forward_log_probs
from entroprl.train.precision import ComputeCopy, float32_attention, sdpa_float32
from entroprl.train.trainer import Trainer
from tests.policies import make_tiny_policy, needs_native_bfloat16
from tests.test_trainer import small_config


def _batch(tok, rows=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tok), (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: rows // 2, :3] = 0  # left padding
    return ids, mask


def test_float32_attention_changes_nothing_in_float32():
    model, tok = make_tiny_policy()
    ids, mask = _batch(tok)
    before = forward_log_probs(model, ids, mask, 6)
    assert float32_attention(model)
    assert model.config._attn_implementation == "sdpa_float32"
    after = forward_log_probs(model, ids, mask, 6)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_sdpa_float32_is_float32_attention_of_the_bfloat16_inputs(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False  # a left-padded row
    mask[0, :, 0, 0] = True  # whose padded query still attends somewhere
    module = torch.nn.Module()
    module.is_causal = True
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append(args[0].dtype)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out, _ = sdpa_float32(module, q, k, v, mask, scaling=8**-0.5)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    # by hand, in float64: softmax(q k^T / sqrt(d) masked) v, heads moved after the positions
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(~mask, -math.inf)
    expected = (s.softmax(-1) @ v.double()).transpose(1, 2)
    # within the final rounding to bfloat16 (8 bits of mantissa)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-6)


def test_compute_copy_gradients_reach_the_float32_master():
    model, tok = make_tiny_policy()
    reference = copy.deepcopy(model)
    ids, mask = _batch(tok)
    advantages = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    wrapped = ComputeCopy(model, torch.bfloat16)
    assert list(wrapped.parameters()) == list(model.parameters())  # what the optimizer steps
    for m in (wrapped, reference):
        log_prob, _ = forward_log_probs(m, ids, mask, 6)
        (log_prob.float() * advantages).mean().backward()
    for (name, master), low, full in zip(
        model.named_parameters(),
        wrapped.module.parameters(),
        reference.parameters(),
        strict=True,
    ):
        assert master.dtype == torch.float32 and master.grad.dtype == torch.float32, name
        assert low.dtype == torch.bfloat16 and low.grad is None, name
        # bfloat16 rounding: an 8-bit mantissa
        cos = torch.nn.functional.cosine_similarity(master.grad.flatten(), full.grad.flatten(), 0)
        assert cos > 0.99, name


def test_compute_copy_sums_micro_batches_in_float32():
    model, tok = make_tiny_policy()
    ids, mask = _batch(tok)
    wrapped = ComputeCopy(model, torch.bfloat16)
    # each half's gradient, as the copy computes it
    halves = []
    for rows in (slice(0, 3), slice(3, 6)):
        probe = copy.deepcopy(wrapped.module)
        forward_log_probs(probe, ids[rows], mask[rows], 6)[0].float().sum().backward()
        halves.append([p.grad.float() for p in probe.parameters()])
    for rows in (slice(0, 3), slice(3, 6)):
        forward_log_probs(wrapped, ids[rows], mask[rows], 6)[0].float().sum().backward()
    for master, first, second in zip(model.parameters(), *halves, strict=True):
        assert torch.equal(master.grad, first + second)


def _long_context_policy():
    """A tiny policy with rotary embeddings over 4096 positions (head_dim 32)."""
    tok = build_char_tokenizer()
    config = tiny_config(
        len(tok),
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        max_position=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return build_model(config, seed=0), tok


def test_compute_copy_casts_the_parameters_and_keeps_the_buffers():
    """As FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16): the parameters are cast, the rotary
    inv_freq buffer stays float32, so the RoPE angles of far positions are float32's."""
    model, tok = _long_context_policy()
    low = ComputeCopy(model, torch.bfloat16).module
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    buffers = dict(low.named_buffers())
    assert "model.rotary_emb.inv_freq" in buffers
    assert {b.dtype for b in buffers.values()} == {torch.float32}
    # cos and sin up to position 2047: float32's, rounded once to the activations' bfloat16
    positions = torch.arange(2048)[None]
    x = torch.zeros(1, 2048, 64)
    cos32, sin32 = model.model.rotary_emb(x, positions)
    cos, sin = low.model.rotary_emb(x.bfloat16(), positions)
    assert torch.equal(cos, cos32.bfloat16()) and torch.equal(sin, sin32.bfloat16())
    # what a bfloat16 inv_freq would do: angles off by tenths of a radian there
    rounded = copy.deepcopy(model).to(torch.bfloat16)
    cos16, _ = rounded.model.rotary_emb(x.bfloat16(), positions)
    assert (cos16.float() - cos32).abs().max() > 0.1
    # the log-probs of positions 1024-2048: those of the model with its parameters alone rounded
    by_hand = copy.deepcopy(model).to(torch.bfloat16)
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        by_hand.get_submodule(owner)._buffers[leaf] = buffer.clone()
    ids = torch.randint(3, len(tok), (1, 2049), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got, _ = forward_log_probs(low, ids, mask, 1024)
        want, _ = forward_log_probs(by_hand, ids, mask, 1024)
        all_rounded, _ = forward_log_probs(rounded, ids, mask, 1024)
    assert torch.equal(got, want)
    assert not torch.equal(all_rounded, want)  # the buffers' precision reaches the log-probs


@needs_native_bfloat16
def test_reference_model_casts_the_parameters_and_keeps_the_buffers(tmp_path):
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path, model={"compute_dtype": "bfloat16"}, algorithm={"kl_coef": 0.05}
    )
    ref = Trainer(config, model=model, tokenizer=tok).actor.ref_model
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert "model.rotary_emb.inv_freq" in dict(ref.named_buffers())
    assert {b.dtype for b in ref.buffers()} == {torch.float32}


def test_compute_copy_needs_one_process_without_fsdp(monkeypatch):
    model, _ = make_tiny_policy()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"model\.compute_dtype.*trainer\.strategy=fsdp"):
        parallel.wrap(model, "ddp", compute_dtype=torch.bfloat16)


def _has_a_one(completion, answer):
    return float("1" in completion)


def _copy_follows_master(trainer):
    for master, low in zip(
        trainer.actor.model.parameters(), trainer.actor.wrapped.module.parameters(), strict=True
    ):
        assert master.dtype == torch.float32
        assert torch.equal(low, master.detach().bfloat16())


@needs_native_bfloat16
def test_trainer_in_bfloat16_keeps_the_copy_in_step_and_resumes(tmp_path):
    model, tok = make_tiny_policy()
    config = small_config(
        tmp_path / "run", model={"compute_dtype": "bfloat16"}, trainer={"steps": 2}
    )
    # a reward that differs within groups, so that every step moves the weights
    task = Task("ones", [Example("1 2>3=", None)] * 8, [Example("1 2>3=", None)], _has_a_one)
    trainer = Trainer(config, task=task, model=model, tokenizer=tok)
    assert isinstance(trainer.actor.wrapped, ComputeCopy)
    assert model.config._attn_implementation == "sdpa_float32"
    start = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
    _copy_follows_master(trainer)
    # a new process resumes the master weights and refreshes its copy from them
    fresh, _ = make_tiny_policy(seed=1)
    config = small_config(
        tmp_path / "run", model={"compute_dtype": "bfloat16"}, trainer={"steps": 3}
    )
    resumed = Trainer(config, task=task, model=fresh, tokenizer=tok)
    assert resumed.resume()
    for saved, loaded in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(saved, loaded)
    _copy_follows_master(resumed)


@needs_native_bfloat16
def test_bfloat16_log_probs_stay_near_float32(tmp_path):
    """The update's log-probs in bfloat16 against float32, on the same weights: the gap is the
    bfloat16 rounding of the logits (8-bit mantissa: about 0.4% of a logit), far below the
    differences that move a policy-gradient step."""
    model, tok = make_tiny_policy()
    ids, mask = _batch(tok, rows=16, length=20)
    full, full_entropy = forward_log_probs(model, ids, mask, 10)
    config = small_config(tmp_path / "run", model={"compute_dtype": "bfloat16"})
    trainer = Trainer(config, model=model, tokenizer=tok)
    low, low_entropy = forward_log_probs(trainer.actor.forward_model, ids, mask, 10)
    assert low.dtype == torch.float32  # the log-softmax upcasts the bfloat16 logits
    assert (low - full).abs().max() < 0.02
    assert (low_entropy - full_entropy).abs().max() < 0.02
    assert not torch.equal(low, full)  # it did run in bfloat16


@pytest.mark.parametrize(
    "capability, bf16_hardware, refused",
    [("AVX2", True, True), ("AVX512", False, True), ("AVX512", True, False)],
)
def test_bfloat16_is_refused_on_a_cpu_without_it(
    tmp_path, monkeypatch, capability, bf16_hardware, refused
):
    """Under AVX2 kernels a bfloat16 step was 11x slower than float32 (9.3 s against 0.83 s at
    hidden 128): the trainer says so at start-up instead."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_hardware)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model, tok = make_tiny_policy()
    config = small_config(tmp_path / "run", model={"compute_dtype": "bfloat16"})
    if refused:
        with pytest.raises(ConfigError, match=r"model\.compute_dtype.*11x slower"):
            Trainer(config, model=model, tokenizer=tok)
    else:
        assert isinstance(Trainer(config, model=model, tokenizer=tok).actor.wrapped, ComputeCopy)
    # float32 is never refused
    Trainer(small_config(tmp_path / "f32"), model=model, tokenizer=tok)
