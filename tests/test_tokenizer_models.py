"""Character tokenizer and tiny models: round trips, save/load, left-padded generation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from entroprl.demo.models import build_model, load_model, save_model, tiny_config
from entroprl.demo.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _model(tok, arch="qwen2", seed=0):
    cfg = tiny_config(len(tok), hidden_size=32, num_layers=2, num_heads=2, arch=arch)
    return build_model(cfg, seed=seed).eval()


# ---------------------------------------------------------------- tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=DEFAULT_ALPHABET, max_size=40))
def test_decode_encode_round_trip_one_token_per_char(s):
    t = build_char_tokenizer()
    ids = t(s)["input_ids"]
    assert len(ids) == len(s)
    assert t.decode(ids) == s
    assert [t.decode([i]) for i in ids] == list(s)


def test_vocabulary_and_special_tokens(tok):
    assert len(tok) == 4 + len(DEFAULT_ALPHABET)
    assert (tok.pad_token, tok.eos_token, tok.bos_token, tok.unk_token) == (
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    # Every alphabet character has its own id, distinct from the special ones.
    ids = [tok(c)["input_ids"] for c in DEFAULT_ALPHABET]
    assert all(len(i) == 1 for i in ids)
    assert sorted(i[0] for i in ids) == list(range(4, 4 + len(DEFAULT_ALPHABET)))
    # No special token is added on encoding; EOS is spelled out in decoding.
    assert tok("12")["input_ids"] == [
        tok.convert_tokens_to_ids("1"),
        tok.convert_tokens_to_ids("2"),
    ]
    assert tok.decode([*tok("1+2")["input_ids"], 1, 0]) == "1+2<eos><pad>"
    assert tok.decode([*tok("1+2")["input_ids"], 1, 0], skip_special_tokens=True) == "1+2"
    assert tok("1a")["input_ids"][1] == tok.unk_token_id


def test_left_padding(tok):
    enc = tok(["1 2", "3 4 5"], padding=True)
    assert enc["input_ids"][0][:2] == [0, 0]
    assert enc["attention_mask"] == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_custom_alphabet_and_bad_alphabets():
    t = build_char_tokenizer("ab ")
    assert len(t) == 7
    assert t.decode(t("ab ba")["input_ids"]) == "ab ba"
    with pytest.raises(ValueError, match="empty"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match="printable ASCII"):
        build_char_tokenizer("ab\n")
    with pytest.raises(ValueError, match="printable ASCII"):
        build_char_tokenizer("aé")


STRINGS = ["3 5 7>22=", "3*5+7", "  1 + 22 >(3*4)/5=,.", ""]


def test_tokenizer_save_and_auto_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for s in STRINGS:
        assert loaded(s)["input_ids"] == tok(s)["input_ids"]
        assert loaded.decode(loaded(s)["input_ids"]) == s
    assert loaded.padding_side == "left"
    assert (loaded.pad_token_id, loaded.eos_token_id) == (0, 1)


# ---------------------------------------------------------------- configs and models


def test_tiny_config_fields(tok):
    cfg = tiny_config(len(tok), hidden_size=48, num_layers=3, num_heads=4, max_position=80)
    assert isinstance(cfg, Qwen2Config)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (len(tok), 48, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 4, 192)
    assert cfg.max_position_embeddings == 80
    assert cfg.tie_word_embeddings
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)
    assert isinstance(tiny_config(len(tok), arch="llama"), LlamaConfig)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "gpt2"}, "arch"),
        ({"hidden_size": 30, "num_heads": 4}, "divisible"),
        ({"num_layers": 0}, ">= 1"),
        ({"eos_token_id": 99}, "eos_token_id"),
    ],
)
def test_tiny_config_rejects(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(len(tok), **kwargs)


def test_build_model_is_seeded_tied_and_leaves_the_global_rng_alone(tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = _model(tok, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b = _model(tok, seed=5)
    c = _model(tok, seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    assert a.generation_config.pad_token_id == 0
    assert a.generation_config.eos_token_id == 1


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_load_round_trip_identical_logits(tok, tmp_path, arch):
    model = _model(tok, arch=arch)
    with torch.no_grad():
        for p in model.parameters():  # move off the init so a reload of fresh weights would differ
            p.add_(0.01 * torch.randn_like(p))
    path = save_model(model, tok, tmp_path / "m")
    assert (path / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left

    enc = tok(STRINGS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**enc).logits
        auto_model = AutoModelForCausalLM.from_pretrained(path).eval()
        auto_tok = AutoTokenizer.from_pretrained(path)
        assert torch.equal(auto_model(**enc).logits, expected)
        for s in STRINGS:
            assert auto_tok(s)["input_ids"] == tok(s)["input_ids"]
            assert auto_tok.decode(auto_tok(s)["input_ids"]) == s
        loaded, loaded_tok = load_model(path)
        assert torch.equal(loaded.eval()(**enc).logits, expected)
        assert loaded_tok(STRINGS[2])["input_ids"] == tok(STRINGS[2])["input_ids"]


def test_save_model_replaces_an_existing_directory(tok, tmp_path):
    target = tmp_path / "m"
    save_model(_model(tok, seed=1), tok, target)
    (target / "stale.txt").write_text("old")
    second = _model(tok, seed=2)
    save_model(second, tok, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded, _ = load_model(target)
    assert torch.equal(loaded.model.embed_tokens.weight, second.model.embed_tokens.weight)


def test_load_model_rejects_a_non_model_directory(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        load_model(tmp_path)


def test_left_padded_generation_matches_unpadded(tok):
    model = _model(tok)
    prompts = ["3 5 7>22=", "1 2>3="]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0  # the second prompt is padded
    greedy = {
        "do_sample": False,
        "max_new_tokens": 6,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    single = tok(prompts[1:], return_tensors="pt")
    with torch.no_grad():
        batch = model.generate(**enc, **greedy)
        alone = model.generate(**single, **greedy)
    width = enc["input_ids"].shape[1]
    # Same first-step logits and the same greedy continuation, whatever the padding.
    torch.testing.assert_close(batch.logits[0][1], alone.logits[0][0], atol=1e-5, rtol=1e-5)
    n = alone.sequences.shape[1] - single["input_ids"].shape[1]
    assert torch.equal(batch.sequences[1, width : width + n], alone.sequences[0, -n:])


def test_sampled_generation_with_left_padding(tok):
    model = _model(tok)
    prompts = ["3 5 7>22=", "1 2>3=", "9 9 9>81="]
    enc = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            max_new_tokens=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    width = enc["input_ids"].shape[1]
    assert out.shape[0] == 3
    assert 0 < out.shape[1] - width <= 8
    assert torch.equal(out[:, :width], enc["input_ids"])
    for row, prompt in zip(out, prompts, strict=True):
        assert tok.decode(row[:width], skip_special_tokens=True) == prompt
