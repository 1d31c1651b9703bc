"""Warm start: SFT loss, evaluation, data, caching (hit, rebuild of a partial directory)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

import entroprl.demo.warmstart as ws
from entroprl.demo.models import build_model, load_model, tiny_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.demo.warmstart import (
    INFO_FILE,
    WarmStartConfig,
    build_sft_pairs,
    default_cache_dir,
    evaluate_accuracy,
    read_info,
    sft_loss,
    warm_start,
)
from entroprl.tasks.countdown import CountdownProblem, verify
from entroprl.train.schedule import learning_rate

TINY = WarmStartConfig(
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    max_target=20,
    num_problems=12,
    solutions_per_problem=2,
    steps=3,
    batch_size=4,
    warmup_steps=1,
    eval_problems=4,
    eval_samples=2,
    max_new_tokens=8,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# ---------------------------------------------------------------- pieces


def test_encode_pairs_left_pads_and_marks_the_answer(tok):
    ids, attn, resp = ws._encode_pairs([("1>1=", "1"), ("12 3>4=", "1+3")], tok)

    def c(ch):
        return tok(ch)["input_ids"][0]

    row1 = [c(x) for x in "12 3>4=1+3"] + [1]  # the space is a token of its own
    row0 = [0] * 5 + [c("1"), c(">"), c("1"), c("="), c("1"), 1]
    assert ids.tolist() == [row0, row1]
    assert attn.tolist() == [[0] * 5 + [1] * 6, [1] * 11]
    assert resp.tolist() == [[False] * 9 + [True] * 2, [False] * 7 + [True] * 4]


def test_sft_loss_equals_per_sequence_unpadded_nll(tok):
    model = build_model(tiny_config(len(tok), hidden_size=16, num_heads=2), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = [("3 5 7>22=", "3*5+7"), ("1 2>3=", "1+2"), ("12 1>4=", "(12)/3")]
    ids, attn, resp = ws._encode_pairs(pairs, tok)
    got = sft_loss(model, ids, attn, resp)
    # Independent: each sequence alone (no padding), sum of -log p over answer and EOS tokens.
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            p = tok(prompt)["input_ids"]
            a = [*tok(answer)["input_ids"], tok.eos_token_id]
            seq = torch.tensor([p + a])
            logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), dim=-1)
            for j, token in enumerate(a):
                total -= float(logp[len(p) + j - 1, token])
                count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_lr_schedule_warmup_then_cosine():
    """The warm start's factor of the peak (`schedule.learning_rate` at lr 1, cosine)."""
    f = [
        learning_rate(s, lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine")
        for s in range(111)
    ]
    assert f[0] == pytest.approx(0.1)
    assert f[4] == pytest.approx(0.5)
    assert f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5)
    assert f[35] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f[110] == pytest.approx(0.0, abs=1e-12)


def _parse_prompt(prompt: str) -> CountdownProblem:
    nums, target = prompt.removesuffix("=").split(">")
    return CountdownProblem(tuple(map(int, nums.split())), int(target))


def test_build_sft_pairs_correct_and_wrong_answers():
    cfg = dataclasses.replace(TINY, solutions_per_problem=3, wrong_fraction=0.3)
    per_problem = build_sft_pairs(cfg, random.Random(0))
    assert len(per_problem) == cfg.num_problems
    orders_seen = set()
    for good, bad in per_problem:
        assert 1 <= len(good) <= 3
        assert len(bad) == 3
        assert len({a for _, a in good}) == len(good)
        assert len({a for _, a in bad}) == len(bad)
        first = _parse_prompt(good[0][0])
        for prompt, answer in good + bad:
            problem = _parse_prompt(prompt)
            # Same problem, numbers in some order.
            assert problem.target == first.target
            assert sorted(problem.numbers) == sorted(first.numbers)
            orders_seen.add(len({_parse_prompt(p).numbers for p, _ in good + bad}) > 1)
            if (prompt, answer) in good:
                assert verify(answer, problem)
            else:
                assert not verify(answer, problem)
                # A wrong answer uses every (one-digit) number once: it answers another target.
                digits = sorted("".join(map(str, problem.numbers)))
                assert sorted(c for c in answer if c.isdigit()) == digits
    assert True in orders_seen  # the numbers are shown in more than one order
    no_wrong = build_sft_pairs(dataclasses.replace(cfg, wrong_fraction=0.0), random.Random(0))
    assert all(not bad for _, bad in no_wrong)


def test_config_validation_and_cache_key():
    assert WarmStartConfig().cache_key() == WarmStartConfig().cache_key()
    assert WarmStartConfig(seed=1).cache_key() != WarmStartConfig().cache_key()
    assert WarmStartConfig(lr=2e-2).cache_key() != WarmStartConfig().cache_key()
    for bad in ({"steps": -1}, {"wrong_fraction": 1.0}, {"lr": 0.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            WarmStartConfig(**bad)


# ---------------------------------------------------------------- evaluation


class ScriptedCache:
    """The token history of each row, in the batch order of the sampler's cache."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def batch_select_indices(self, index):
        self.rows = [list(self.rows[i]) for i in index.tolist()]


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM that answers each prompt with a fixed text, with chosen logits.

    At a valid response step the logits are near-flat over `k_valid[prompt]` ids, the answer's
    next token 1e-3 above the others (greedy decoding picks it; the entropy is log k to 1e-6),
    and -1e4 elsewhere; after EOS they are flat over 7 ids, which must not count.
    """

    def __init__(self, tok, answers: dict[str, str], k_valid: dict[str, int]):
        super().__init__()
        self.tok, self.answers, self.k_valid = tok, answers, k_valid
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))
        self.prefills = 0

    def next_logits(self, history: list[int]) -> torch.Tensor:
        logits = torch.full((len(self.tok),), -1e4)
        history = [t for t in history if t != self.tok.pad_token_id]
        text = self.tok.decode(history, skip_special_tokens=True)
        prompt, _, response = text.partition("=")
        prompt += "="
        if self.tok.eos_token_id in history:
            logits[:7] = 0.0
            return logits
        answer = [*self.tok(self.answers[prompt])["input_ids"], self.tok.eos_token_id]
        k = self.k_valid[prompt]
        token = answer[len(response)]
        others = [i for i in range(len(logits)) if i != token][: k - 1]
        logits[others] = -1e-3
        logits[token] = 0.0
        return logits

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        use_cache,
        logits_to_keep=0,
        past_key_values=None,
    ):
        if past_key_values is None:
            self.prefills += use_cache
            past_key_values = ScriptedCache([[] for _ in range(len(input_ids))])
        keep = logits_to_keep or input_ids.shape[1]
        logits = []
        for row, ids in zip(past_key_values.rows, input_ids.tolist(), strict=True):
            row += ids
            ends = range(len(row) - keep + 1, len(row) + 1)
            logits.append(torch.stack([self.next_logits(row[:end]) for end in ends]))
        return SimpleNamespace(logits=torch.stack(logits), past_key_values=past_key_values)


def test_evaluate_accuracy_against_hand_values(tok):
    problems = [
        CountdownProblem((3, 5, 7), 22),
        CountdownProblem((1, 2, 9), 3),
        CountdownProblem((4, 4, 8), 2),
    ]
    answers = {"3 5 7>22=": "3*5+7", "1 2 9>3=": "1+2", "4 4 8>2=": "8-4-4"}
    k_valid = {"3 5 7>22=": 2, "1 2 9>3=": 4, "4 4 8>2=": 3}
    model = ScriptedModel(tok, answers, k_valid)
    res = evaluate_accuracy(model, tok, problems, num_samples=2, greedy=True, batch_size=4)
    # Lengths with EOS: 6, 4, 6. Third answer is 0, not 2.
    lengths = [6, 4, 6]
    ent = [math.log(2), math.log(4), math.log(3)]
    assert res.accuracy == pytest.approx(2 / 3)
    assert res.num_responses == 6
    assert res.mean_length == pytest.approx(sum(lengths) / 3)
    assert res.mean_entropy == pytest.approx(sum(ent) / 3, rel=1e-5)
    token_mean = sum(n * h for n, h in zip(lengths, ent, strict=True)) / sum(lengths)
    assert res.token_mean_entropy == pytest.approx(token_mean, rel=1e-5)
    assert model.prefills == 2  # 6 responses in batches of 4
    assert model.training  # mode restored


def test_evaluate_accuracy_real_model_is_reproducible_and_restores_the_rng(tok):
    model = build_model(tiny_config(len(tok), hidden_size=16, num_heads=2), seed=0)
    problems = [CountdownProblem((3, 5, 7), 22), CountdownProblem((1, 2, 9), 3)]
    torch.manual_seed(1)
    expected_next = torch.rand(2)
    torch.manual_seed(1)
    a = evaluate_accuracy(model, tok, problems, num_samples=3, seed=4, max_new_tokens=5)
    assert torch.equal(torch.rand(2), expected_next)
    b = evaluate_accuracy(model, tok, problems, num_samples=3, seed=4, max_new_tokens=5)
    assert a == b
    assert a.num_responses == 6
    assert 1.0 <= a.mean_length <= 5.0
    # An untrained model is close to uniform over the vocabulary.
    assert 0.5 * math.log(len(tok)) < a.mean_entropy <= math.log(len(tok)) + 1e-5
    g = evaluate_accuracy(model, tok, problems, greedy=True, max_new_tokens=5)
    assert g.num_responses == 2


def test_evaluate_accuracy_rejects_bad_arguments(tok):
    model = build_model(tiny_config(len(tok), hidden_size=16, num_heads=2), seed=0)
    p = [CountdownProblem((1, 2), 3)]
    with pytest.raises(ValueError, match="no problems"):
        evaluate_accuracy(model, tok, [])
    with pytest.raises(ValueError, match="temperature"):
        evaluate_accuracy(model, tok, p, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_accuracy(model, tok, p, num_samples=0)


# ---------------------------------------------------------------- warm start and cache


def test_warm_start_builds_a_loadable_directory(tmp_path):
    path = warm_start(TINY, tmp_path)
    assert path == tmp_path / TINY.cache_key()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", INFO_FILE} <= names
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left
    info = json.loads((path / INFO_FILE).read_text())
    assert info["config"] == dataclasses.asdict(TINY)
    assert info["cache_key"] == TINY.cache_key()
    assert set(info["metrics"]) == {
        "heldout_greedy_accuracy",
        "heldout_sampled_accuracy",
        "heldout_mean_entropy",
        "heldout_token_mean_entropy",
        "heldout_mean_length",
    }
    model, tok = load_model(path)
    assert model.config.hidden_size == 16
    assert model.config.vocab_size == len(tok)
    fresh = build_model(model.config, seed=TINY.seed)
    assert not torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_second_call_hits_the_cache(tmp_path, monkeypatch):
    path = warm_start(TINY, tmp_path)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cache was missed: training ran again")

    monkeypatch.setattr(ws, "_train", must_not_train)
    assert warm_start(TINY, tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_partial_cache_directory_is_rebuilt(tmp_path, monkeypatch, damage):
    path = tmp_path / TINY.cache_key()
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half written")
    if damage == "garbled":
        (path / INFO_FILE).write_text("{not json")
    calls = []
    real_train = ws._train
    monkeypatch.setattr(ws, "_train", lambda *a: calls.append(1) or real_train(*a))
    assert warm_start(TINY, tmp_path) == path
    assert calls == [1]
    assert read_info(path)["cache_key"] == TINY.cache_key()
    load_model(path)  # the half-written weights were replaced


def test_warm_start_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    warm_start(dataclasses.replace(TINY, steps=1, eval_problems=0), tmp_path)
    assert torch.get_num_threads() == before


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ENTROPRL_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ENTROPRL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "entroprl" / "warmstart"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "entroprl" / "warmstart"


@pytest.mark.slow
def test_default_warm_start_meets_the_demo_targets(tmp_path):
    info = read_info(warm_start(WarmStartConfig(), tmp_path))
    m = info["metrics"]
    # some accuracy, and room below the greedy accuracy for RL to gain ten points (measured:
    # sampled 0.1475, greedy 0.31 with the default 30% wrong supervised answers)
    assert 0.10 <= m["heldout_sampled_accuracy"] <= 0.4
    assert m["heldout_greedy_accuracy"] >= m["heldout_sampled_accuracy"]
    assert m["heldout_mean_entropy"] >= 0.3
