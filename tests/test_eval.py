"""Benchmark evaluation (greedy pass@1, avg@k, unbiased pass@k, maj@k, tables and JSON), the
`entroprl eval` entry point, and the generation backends' shared contract (HF, and vLLM through a
stand-in engine: vLLM itself cannot run here)."""

import argparse
import json
import os
import sys
import types
from functools import partial
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from entroprl.cli import add_eval_arguments, cmd_eval
from entroprl.config import ConfigError, DataConfig, config_from_dict
from entroprl.demo.models import save_model
from entroprl.rollout.backend import make_backend
from entroprl.rollout.hf import HFBackend
from entroprl.rollout.vllm import VLLMBackend, assemble_batch
from entroprl.tasks.evaluation import (
    Benchmark,
    Protocol,
    evaluate_benchmark,
    format_table,
    load_benchmark,
    majority_correct,
    parse_benchmark_spec,
    pass_ks,
    run_benchmarks,
    write_report,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data missing")


class ScriptedBackend:
    """Completions from `script(prompt, temperature, j)` for the j-th sample of each prompt."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens):
        self.calls.append((len(prompts), n, temperature))
        texts = [self.script(p, temperature, j) for p in prompts for j in range(n)]
        return SimpleNamespace(
            texts=texts, group_ids=torch.arange(len(prompts)).repeat_interleave(n)
        )

    def sync_weights(self, model):
        pass


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- the protocol on a toy benchmark ---------------------------------------------------------------

# Three GSM8K-style problems with answers 1, 2, 3; four samples each. Problem 0: two correct, and
# its wrong answer 7 ties with the right one but comes first (maj: wrong). Problem 1: none correct
# (one sample has no answer at all). Problem 2: all correct. Greedy: only problem 0 is right.
SAMPLES = {"Q0": ["7", "1", "7", "1"], "Q1": ["5", "5", "6", "no idea"], "Q2": ["3"] * 4}
GREEDY = {"Q0": "1", "Q1": "4", "Q2": "4"}
CORRECT = [[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]


def toy_script(prompt, temperature, j):
    question = prompt.split("Question: ")[1][:2]
    answer = GREEDY[question] if temperature == 0 else SAMPLES[question][j]
    return f"so the answer is \\boxed{{{answer}}}" if answer[0].isdigit() else answer


@pytest.fixture
def toy(tmp_path):
    path = write_jsonl(
        tmp_path / "toy.jsonl", [{"question": f"Q{i}", "answer": f"#### {i + 1}"} for i in range(3)]
    )
    return load_benchmark(f"toy=gsm8k:{path}", DataConfig())


def brute_pass_at_k(correct: list[int], k: int) -> float:
    """Fraction of the k-subsets of the samples holding a correct one (enumerated)."""
    subsets = list(combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_sampled_metrics_match_hand_computation(toy):
    backend = ScriptedBackend(toy_script)
    metrics, records = evaluate_benchmark(backend, toy, Protocol(samples=4, temperature=0.7))
    assert backend.calls == [(3, 1, 0.0), (3, 4, 0.7)]
    assert metrics["problems"] == 3
    assert metrics["greedy@1"] == pytest.approx(1 / 3)
    assert metrics["avg@4"] == pytest.approx(6 / 12)
    for k in (1, 2, 4):
        expected = sum(brute_pass_at_k(c, k) for c in CORRECT) / 3
        assert metrics[f"pass@{k}"] == pytest.approx(expected), k
    assert metrics["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert metrics["maj@4"] == pytest.approx(1 / 3)
    assert metrics["score"] == metrics["avg@4"]
    assert [r["correct"] for r in records] == [[bool(c) for c in row] for row in CORRECT]
    assert [r["greedy_correct"] for r in records] == [True, False, False]
    assert records[1]["samples"][3] == "no idea" and records[2]["answer"] == "3"


def test_large_benchmark_is_greedy_only_and_chunking_changes_nothing(toy):
    backend = ScriptedBackend(toy_script)
    metrics, records = evaluate_benchmark(backend, toy, Protocol(samples=4, small_max=2))
    assert backend.calls == [(3, 1, 0.0)]
    assert metrics == {
        "problems": 3,
        "greedy@1": pytest.approx(1 / 3),
        "score": metrics["greedy@1"],
    }
    assert "samples" not in records[0]
    whole, _ = evaluate_benchmark(ScriptedBackend(toy_script), toy, Protocol(samples=4))
    chunked = ScriptedBackend(toy_script)
    pieces, _ = evaluate_benchmark(chunked, toy, Protocol(samples=4, prompts_per_call=2))
    assert pieces == whole
    assert chunked.calls == [(2, 1, 0.0), (1, 1, 0.0), (1, 4, 0.6), (1, 4, 0.6), (1, 4, 0.6)]


def test_report_averages_table_and_files(toy, tmp_path):
    second = Benchmark("toy2", toy.task, toy.reward, "elsewhere")
    report, records = run_benchmarks(
        ScriptedBackend(toy_script), [toy, second], Protocol(samples=4, small_max=3)
    )
    assert report["benchmarks"]["toy"]["score"] == pytest.approx(0.5)
    assert report["average"] == {"score": pytest.approx(0.5), "greedy@1": pytest.approx(1 / 3)}
    assert report["protocol"]["samples"] == 4
    assert format_table(report).splitlines() == [
        "| benchmark | problems | greedy@1 | avg@4 | pass@4 | maj@4 | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| toy | 3 | 33.3 | 50.0 | 66.7 | 33.3 | 50.0 |",
        "| toy2 | 3 | 33.3 | 50.0 | 66.7 | 33.3 | 50.0 |",
        "| average | | 33.3 |  |  |  | 50.0 |",
    ]
    out = write_report(report, records, tmp_path / "out")
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "results.md").read_text() == format_table(report) + "\n"
    lines = (out / "generations" / "toy2.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct names"):
        run_benchmarks(ScriptedBackend(toy_script), [toy, toy], Protocol())
    greedy_only, _ = run_benchmarks(ScriptedBackend(toy_script), [toy], Protocol(samples=0))
    assert (
        format_table(greedy_only).splitlines()[0] == "| benchmark | problems | greedy@1 | score |"
    )
    assert format_table(greedy_only).splitlines()[2] == "| toy | 3 | 33.3 | 33.3 |"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("math:data/math500/test.jsonl", ("math500", "math", "data/math500/test.jsonl")),
        ("aime=jsonl:/x/aime.jsonl", ("aime", "jsonl", "/x/aime.jsonl")),
        ("gsm8k:/d/gsm8k/test.parquet", ("gsm8k", "gsm8k", "/d/gsm8k/test.parquet")),
        ("gsm8k:/d/a=b:c.jsonl", ("a=b:c", "gsm8k", "/d/a=b:c.jsonl")),
    ],
)
def test_benchmark_spec(spec, expected):
    assert parse_benchmark_spec(spec) == expected


@pytest.mark.parametrize("spec", ["data/x.jsonl", "csv:x.csv", "math:", "n=x"])
def test_bad_benchmark_spec(spec):
    with pytest.raises(ValueError, match=r"\[NAME=\]FORMAT:PATH"):
        parse_benchmark_spec(spec)


def test_pass_ks_and_majority():
    assert pass_ks(1) == [1]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(32) == [1, 2, 4, 8, 16, 32]
    assert majority_correct(["a", None, "b", "b"], [True, True, False, False]) == 0.0
    assert majority_correct([None, "a", "b"], [False, True, False]) == 1.0
    assert majority_correct([None, None], [True, True]) == 0.0


def test_protocol_rejects_bad_settings():
    for bad in ({"samples": -1}, {"temperature": 0.0}, {"top_p": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            Protocol(**bad)


# -- the shared benchmark files --------------------------------------------------------------------


@needs_shared
def test_math500_gold_solutions_score_through_the_pipeline():
    """Twelve MATH-500 problems with distinct answers: the gold solution for even ones, the next
    problem's solution for odd ones -> greedy pass@1 is exactly 1/2 (math_reward in workers)."""
    path = SHARED / "math500" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:12]]
    bench = load_benchmark(f"math:{path}", DataConfig(), limit=12)
    assert bench.name == "math500" and bench.reward == "math"
    index = {e.prompt: i for i, e in enumerate(bench.task.test)}

    def script(prompt, temperature, j):
        i = index[prompt]
        return rows[i if i % 2 == 0 else (i + 1) % 12]["solution"]

    metrics, _ = evaluate_benchmark(ScriptedBackend(script), bench, Protocol(samples=0))
    assert metrics["greedy@1"] == 0.5


@needs_shared
def test_gsm8k_and_aime_files_load_as_benchmarks():
    gsm8k = load_benchmark(f"gsm8k:{SHARED / 'gsm8k' / 'test.jsonl'}", DataConfig(), limit=40)
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "test.jsonl").open()][:40]

    def script(prompt, temperature, j):
        return rows[[e.prompt for e in gsm8k.task.test].index(prompt)]["answer"]

    metrics, _ = evaluate_benchmark(ScriptedBackend(script), gsm8k, Protocol(samples=0))
    assert metrics["greedy@1"] == 1.0
    aime = load_benchmark(
        f"aime24=jsonl:{SHARED / 'aime24' / 'test.jsonl'}", DataConfig(prompt_key="problem")
    )
    assert len(aime.task.test) == 30 and aime.task.test[0].answer == "204"


# -- the entroprl eval entry point -----------------------------------------------------------------


def eval_args(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def saved_policy(tiny_policy, tmp_path):
    model, tok = tiny_policy
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_run_eval_on_a_benchmark_file(saved_policy, tmp_path, capsys):
    (tmp_path / "toy").mkdir()
    path = write_jsonl(
        tmp_path / "toy" / "test.jsonl",
        [{"question": "1+2", "answer": "#### 3"}, {"question": "2*4", "answer": "#### 8"}],
    )
    args = eval_args(
        "--model", str(saved_policy), "--bench", f"gsm8k:{path}", "--samples", "3",
        "--out", str(tmp_path / "out"), "rollout.max_new_tokens=4", "trainer.device=cpu",
    )  # fmt: skip
    report = cmd_eval(args)
    assert list(report["benchmarks"]) == ["toy"]
    result = report["benchmarks"]["toy"]
    assert result["problems"] == 2 and set(result) >= {"greedy@1", "avg@3", "pass@3", "maj@3"}
    assert report["protocol"]["max_new_tokens"] == 4 and report["model"] == str(saved_policy)
    printed = capsys.readouterr().out
    assert "| toy | 2 |" in printed and "results written to" in printed
    generations = (tmp_path / "out" / "generations" / "toy.jsonl").read_text().splitlines()
    assert len(json.loads(generations[1])["samples"]) == 3


def test_run_eval_on_the_configured_task(saved_policy, tmp_path):
    args = eval_args(
        "--model", str(saved_policy), "--task", "countdown", "--samples", "2", "--limit", "3",
        "--out", str(tmp_path / "out"),
        "data.train_size=8", "data.test_size=5", "rollout.max_new_tokens=4", "trainer.device=cpu",
    )  # fmt: skip
    report = cmd_eval(args)
    assert report["benchmarks"]["countdown"]["problems"] == 3
    assert report["benchmarks"]["countdown"]["source"] == "task:countdown"
    # a Countdown answer (a dataclass) is written as its fields
    first = json.loads(
        (tmp_path / "out" / "generations" / "countdown.jsonl").read_text().split("\n")[0]
    )
    assert set(first["answer"]) == {"numbers", "target"}
    with pytest.raises(ConfigError, match=r"data\.test_file"):
        cmd_eval(eval_args("--model", str(saved_policy), "--task", "gsm8k"))
    with pytest.raises(ConfigError, match=r"model\.path"):
        cmd_eval(eval_args("--task", "countdown", "--backend", "vllm"))


# -- generation backends ---------------------------------------------------------------------------


def check_rollout_contract(batch, prompts, n, tok, max_new_tokens):
    """The `RolloutBatch` layout every backend returns (see `entroprl.rollout`)."""
    rows = len(prompts) * n
    R = batch.response_mask.shape[1]
    P = batch.input_ids.shape[1] - R
    assert batch.input_ids.shape == batch.attention_mask.shape == (rows, P + R)
    assert 1 <= R <= max_new_tokens and len(batch.texts) == rows
    assert batch.group_ids.tolist() == [i // n for i in range(rows)]
    for i in range(rows):
        ids = tok(prompts[i // n], add_special_tokens=False)["input_ids"]
        L = len(ids)
        assert batch.input_ids[i, P - L : P].tolist() == ids
        assert (batch.input_ids[i, : P - L] == tok.pad_token_id).all()
        assert batch.attention_mask[i, :P].tolist() == [0] * (P - L) + [1] * L
        mask = batch.response_mask[i]
        length = int(mask.sum())
        assert mask.tolist() == [1.0] * length + [0.0] * (R - length)
        response = batch.input_ids[i, P : P + length].tolist()
        assert tok.eos_token_id not in response[:-1]
        if length < R:
            assert response[-1] == tok.eos_token_id
        assert (batch.input_ids[i, P + length :] == tok.pad_token_id).all()
        assert torch.equal(batch.attention_mask[i, P:], mask.long())
        assert batch.texts[i] == tok.decode(response, skip_special_tokens=True)


PROMPTS = ["1 2>3=", "12 3 4>9="]


@pytest.mark.parametrize("n, temperature", [(4, 1.0), (1, 0.0)])
def test_hf_backend_meets_the_contract(tiny_policy, n, temperature):
    model, tok = tiny_policy
    torch.manual_seed(0)
    batch = HFBackend(model, tok).generate(
        PROMPTS, n=n, temperature=temperature, top_p=1.0, max_new_tokens=6
    )
    check_rollout_contract(batch, PROMPTS, n, tok, 6)
    if temperature > 0:  # the seed gives rows that stop on EOS and rows that run to the limit
        assert set(batch.response_mask.sum(-1).tolist()) >= {2.0, 6.0}


class FakeLLM:
    """Stands in for `vllm.LLM`: records its arguments, replays scripted token lists (each token's
    log-prob -0.1 times its position), and takes weights through an in-place reload."""

    script: ClassVar[list[list[int]]] = []

    def __init__(self, **kwargs):
        self.kwargs, self.resets, self.loaded = kwargs, 0, None

        def reload_weights(weights_iterator=None, weights_path=None, is_checkpoint_format=True):
            self.loaded = list(weights_iterator)

        runner = SimpleNamespace(reload_weights=reload_weights)
        self.worker = SimpleNamespace(model_runner=runner, reload_weights=reload_weights)

    def generate(self, prompts, params, use_tqdm=True):
        self.request = (prompts, params)
        n = params.n

        def sample(tokens):
            logprobs = [{t: SimpleNamespace(logprob=-0.1 * i)} for i, t in enumerate(tokens)]
            return SimpleNamespace(token_ids=tuple(tokens), logprobs=logprobs)

        return [
            SimpleNamespace(outputs=[sample(t) for t in self.script[i * n : (i + 1) * n]])
            for i in range(len(prompts))
        ]

    def collective_rpc(self, method, args=(), kwargs=None):
        call = (
            getattr(self.worker, method)
            if isinstance(method, str)
            else partial(method, self.worker)
        )
        return [call(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return module


def test_vllm_backend_rebuilds_the_hf_batch_from_token_lists(tiny_policy, fake_vllm):
    """Given the tokens the HF backend sampled, the vLLM backend's batch is the HF batch."""
    model, tok = tiny_policy
    torch.manual_seed(0)
    hf = HFBackend(model, tok).generate(PROMPTS, n=4, temperature=1.0, top_p=0.9, max_new_tokens=6)
    lengths = hf.response_mask.sum(-1).long().tolist()
    FakeLLM.script = [hf.response_ids[i, :L].tolist() for i, L in enumerate(lengths)]
    backend = VLLMBackend("/ckpt", tok, dtype="float32", seed=5, device="cpu")
    batch = backend.generate(PROMPTS, n=4, temperature=1.0, top_p=0.9, max_new_tokens=6)
    check_rollout_contract(batch, PROMPTS, 4, tok, 6)
    for field in ("input_ids", "attention_mask", "response_mask", "group_ids"):
        assert torch.equal(getattr(batch, field), getattr(hf, field)), field
    assert batch.texts == hf.texts
    # the engine's log-prob of each sampled token, 0 on padding
    position = torch.arange(batch.response_mask.shape[1], dtype=torch.float32)
    assert torch.equal(batch.rollout_log_probs, -0.1 * position * batch.response_mask)
    prompts, params = backend.llm.request
    assert prompts == [
        {"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in PROMPTS
    ]
    assert (params.n, params.temperature, params.top_p, params.max_tokens) == (4, 1.0, 0.9, 6)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (-1, 0.0, 1.0)
    assert params.logprobs == 0 and params.detokenize is False
    kwargs = backend.llm.kwargs
    assert (kwargs["model"], kwargs["dtype"], kwargs["seed"]) == ("/ckpt", "float32", 5)
    assert kwargs["logprobs_mode"] == "processed_logprobs"  # the distribution sampled from
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_assemble_batch_by_hand(tiny_policy):
    _, tok = tiny_policy  # pad 0, eos 1
    batch = assemble_batch([[5, 6], [7]], [[8, 1, 9], [8], [9, 9, 9, 9], [1]], 2, tok)
    assert batch.input_ids.tolist() == [
        [5, 6, 8, 1, 0, 0],
        [5, 6, 8, 0, 0, 0],
        [0, 7, 9, 9, 9, 9],
        [0, 7, 1, 0, 0, 0],
    ]
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.attention_mask[:, :2].tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]
    assert batch.group_ids.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="2 prompts x n=2"):
        assemble_batch([[5], [7]], [[8]], 2, tok)
    with pytest.raises(ValueError, match="empty response"):
        assemble_batch([[5]], [[]], 1, tok)
    batch = assemble_batch([[5]], [[8, 1, 9], [9]], 2, tok, log_probs=[[-1.0, -2.0, -3.0], [-4.0]])
    assert batch.rollout_log_probs.tolist() == [[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]]  # 0 past EOS
    with pytest.raises(ValueError, match="one value per response token"):
        assemble_batch([[5]], [[8, 1], [9]], 2, tok, log_probs=[[-1.0], [-4.0]])


def test_vllm_sync_weights_hands_over_every_tensor(tiny_policy, fake_vllm):
    model, tok = tiny_policy
    backend = VLLMBackend("/ckpt", tok, device="cpu")
    backend.sync_weights(SimpleNamespace(module=model))  # unwraps DistributedDataParallel
    state = model.state_dict()
    assert [name for name, _ in backend.llm.loaded] == list(state)
    assert all(torch.equal(t, state[name]) for name, t in backend.llm.loaded)
    assert backend.llm.resets == 1


def test_vllm_without_in_place_reload_gives_a_clear_error(tiny_policy, fake_vllm, monkeypatch):
    """An engine whose model runner cannot reload from tensors could not follow the policy."""
    _, tok = tiny_policy
    monkeypatch.setattr(
        FakeLLM, "collective_rpc", lambda self, method, args=(), kwargs=None: [False]
    )
    with pytest.raises(ImportError, match="cannot reload weights in place"):
        VLLMBackend("/ckpt", tok)


def test_vllm_missing_gives_a_clear_error(tiny_policy, monkeypatch):
    _, tok = tiny_policy
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'entroprl\[vllm\]'"):
        VLLMBackend("/ckpt", tok)


def test_make_backend_follows_the_config(tiny_policy, fake_vllm, tmp_path):
    model, tok = tiny_policy
    path = str(save_model(model, tok, tmp_path / "m"))
    hf = make_backend(config_from_dict({"rollout": {"generation_batch_size": 7}}), model, tok)
    assert isinstance(hf, HFBackend) and hf.batch_size == 7
    vllm_cfg = {"rollout": {"backend": "vllm"}, "trainer": {"seed": 3}}
    with pytest.raises(ConfigError, match=r"model\.path"):
        make_backend(config_from_dict(vllm_cfg), model, tok)
    vllm = make_backend(config_from_dict({**vllm_cfg, "model": {"path": path}}), model, tok)
    assert isinstance(vllm, VLLMBackend)
    assert (vllm.llm.kwargs["model"], vllm.llm.kwargs["seed"]) == (path, 3)
    assert vllm.llm.kwargs["dtype"] == "float32"
    assert vllm.llm.kwargs["gpu_memory_utilization"] == 0.5
    assert vllm.llm.kwargs["enforce_eager"] is False
    assert vllm.device == torch.device("cpu")
    # samples in the dtype the policy's forward runs in, on the share of the GPU it is given
    mixed = {
        "rollout": {"backend": "vllm", "gpu_memory_utilization": 0.3},
        "model": {"path": path, "compute_dtype": "bfloat16"},
        "trainer": {"strategy": "fsdp"},
    }
    vllm = make_backend(config_from_dict(mixed), model, tok)
    assert vllm.llm.kwargs["dtype"] == "bfloat16"
    assert vllm.llm.kwargs["gpu_memory_utilization"] == 0.3
