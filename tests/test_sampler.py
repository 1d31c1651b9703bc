"""The sampler (`entroprl.rollout.sampler`) draws what `model.generate` draws: the same tokens
under the same seed, with prompts prefilled once and finished rows dropped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from entroprl.rollout import sampler
from entroprl.rollout.batch import response_mask_from_ids
from entroprl.rollout.hf import HFBackend
from entroprl.rollout.sampler import exponential_race, sample, sampling_scores
from entroprl.train.forward import forward_log_probs
from tests.policies import make_tiny_policy

PROMPTS = ["1 2>3=", "12 3 4>9=", "5>5="]


def generate_reference(model, tok, prompts, n, batch_size, temperature, top_p, max_new_tokens):
    """Today's draw: `model.generate` on every prompt repeated n times, in chunks of rows."""
    tok.padding_side = "left"
    enc = tok(
        [p for p in prompts for _ in range(n)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    ).to(model.device)
    sampling = (
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
    P, chunks = enc["input_ids"].shape[1], []
    for start in range(0, len(enc["input_ids"]), batch_size):
        rows = slice(start, start + batch_size)
        out = model.generate(
            input_ids=enc["input_ids"][rows],
            attention_mask=enc["attention_mask"][rows],
            generation_config=config,
        )
        chunks.append(out[:, P:])
    width = max(c.shape[1] for c in chunks)
    pad = tok.pad_token_id
    response = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad) for c in chunks])
    mask = response_mask_from_ids(response, tok.eos_token_id)
    return torch.where(mask.bool(), response, tok.pad_token_id)


@pytest.mark.parametrize(
    "temperature, top_p, batch_size",
    [(1.0, 1.0, 256), (0.7, 0.9, 7), (1.3, 0.5, 5), (0.0, 1.0, 7)],
)
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("compact_at", [0.0, sampler.COMPACT_AT, 1.0])
def test_same_seed_same_tokens_as_generate(
    tiny_policy, temperature, top_p, batch_size, seed, compact_at, monkeypatch
):
    """Chunks that split a prompt's group, rows that stop early and rows that run to the limit,
    finished rows dropped at once, in groups, or never: token for token what `model.generate`
    samples."""
    monkeypatch.setattr(sampler, "COMPACT_AT", compact_at)
    model, tok = tiny_policy
    torch.manual_seed(seed)
    batch = HFBackend(model, tok, batch_size=batch_size).generate(
        PROMPTS, n=4, temperature=temperature, top_p=top_p, max_new_tokens=12
    )
    after = torch.rand(1)
    model.eval()
    torch.manual_seed(seed)
    expected = generate_reference(model, tok, PROMPTS, 4, batch_size, temperature, top_p, 12)
    assert torch.equal(batch.response_ids, expected)
    assert torch.equal(torch.rand(1), after)  # the same random numbers consumed
    if temperature > 0 and seed == 0:
        assert set(batch.response_lengths.tolist()) >= {12.0} and batch.response_lengths.min() < 12


def test_sampling_scores_are_transformers_warpers():
    """Temperature then top-p, as transformers processes the scores it samples from (ties
    included: equal logits at the top-p boundary)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    logits[:8, :10] = 1.5  # ties
    for temperature, top_p in [(1.0, 1.0), (0.6, 0.95), (1.7, 0.3), (1.0, 0.01)]:
        expected = logits.clone()
        if temperature != 1.0:
            expected = TemperatureLogitsWarper(temperature)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        assert torch.equal(sampling_scores(logits, temperature, top_p), expected)


def test_exponential_race_is_torch_multinomial():
    """One sample per row with the noise drawn as `torch.multinomial` draws it: the same tokens,
    hence the same distribution (P(argmax p_i / E_i = i) = p_i)."""
    scores = torch.randn(300, 40)
    scores[:, 7] = -float("inf")  # filtered tokens are never drawn
    torch.manual_seed(5)
    expected = torch.multinomial(scores.softmax(-1), 1).squeeze(-1)
    torch.manual_seed(5)
    drawn = exponential_race(scores, torch.empty(300, 40).exponential_())
    assert torch.equal(drawn, expected)
    assert (drawn != 7).all()


def test_sampled_tokens_can_be_trained_on(tiny_policy):
    """The sampler decodes in inference mode; what it returns is an ordinary tensor, which a
    differentiated forward (the update's) may take."""
    model, tok = tiny_policy
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tokens = sample(
        model,
        ids,
        mask,
        torch.full((len(PROMPTS),), 2),
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert not tokens.is_inference()
    tokens[0, 0] = tok.pad_token_id  # in place, outside inference mode: an ordinary tensor
    batch = HFBackend(model, tok).generate(
        PROMPTS, n=2, temperature=1.0, top_p=1.0, max_new_tokens=6
    )
    R = batch.response_mask.shape[1]
    log_prob, _ = forward_log_probs(model, batch.input_ids, batch.attention_mask, R)
    log_prob.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def grouped_policy(seed: int = 0):
    """A tiny grouped-query policy: 4 query heads sharing 2 key/value heads."""
    return make_tiny_policy(seed, hidden=64, layers=2, heads=4, kv_heads=2)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_static_cache_draws_what_generate_draws(tiny_policy, grouped, temperature, top_p):
    """The fixed-shape decode (a GPU's, here without the graph): every row to the end in a
    static cache with a prepared mask, grouped-query heads as rows; `model.generate`'s tokens."""
    model, tok = grouped_policy() if grouped else tiny_policy
    torch.manual_seed(0)
    batch = HFBackend(model, tok, static_cache=True).generate(
        PROMPTS, n=4, temperature=temperature, top_p=top_p, max_new_tokens=12
    )
    model.eval()
    torch.manual_seed(0)
    expected = generate_reference(model, tok, PROMPTS, 4, 256, temperature, top_p, 12)
    assert torch.equal(batch.response_ids, expected)
    assert model.config._attn_implementation == "sdpa"  # the grouped attention is put back


def test_grouped_attention_is_transformers_sdpa():
    """Query heads as rows of their key/value head's attention: transformers' SDPA (which
    repeats the keys and values per query head), number for number."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, _ = grouped_policy()
    attention = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 16, generator=g) for h, n in ((4, 1), (2, 10), (2, 10)))
    mask = torch.zeros(3, 1, 1, 10)
    mask[0, ..., 6:] = mask[2, ..., :3] = torch.finfo(torch.float32).min
    ours, _ = sampler.sdpa_grouped(attention, q, k, v, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(attention, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
