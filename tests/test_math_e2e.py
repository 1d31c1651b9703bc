"""End to end on GSM8K: a project-built BPE tokenizer and tiny Qwen2 model saved to a directory,
loaded back from `model.path`, RL-trained for a few steps with `gsm8k_reward`, then evaluated with
the `entroprl eval` entry point on GSM8K and MATH-500. Checks the artifacts, not the accuracy."""

import argparse
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from entroprl.cli import add_eval_arguments, cmd_eval
from entroprl.config import config_from_dict
from entroprl.demo.models import build_model, save_model, tiny_config
from entroprl.tasks.math_problems import DEFAULT_INSTRUCTION
from entroprl.tasks.rewards import gsm8k_reward
from entroprl.train.rundir import read_metrics
from entroprl.train.trainer import Trainer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K, MATH500 = SHARED / "gsm8k", SHARED / "math500"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="../shared/data missing"),
]


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with <pad> <eos> <bos> <unk> and left padding."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


def test_gsm8k_train_then_eval(tmp_path):
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()[:1000]]
    tok = build_bpe_tokenizer(
        [r["question"] + "\n" + r["answer"] for r in rows] + [DEFAULT_INSTRUCTION]
    )
    config = tiny_config(
        len(tok),
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model_dir = save_model(build_model(config, seed=0), tok, tmp_path / "model")

    run = tmp_path / "run"
    cfg = config_from_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {
                "task": "gsm8k",
                "train_file": str(GSM8K / "train.jsonl"),
                "test_file": str(GSM8K / "test.jsonl"),
                "train_limit": 16,
                "test_limit": 2,
            },
            "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 8},
            "optim": {"lr": 1e-3, "mini_batch_size": 4, "micro_batch_size": 2},
            "trainer": {
                "steps": 2,
                "out_dir": str(run),
                "device": "cpu",
                "eval_every": 2,
                "eval_samples": 1,
                "save_every": 2,
                "progress": False,
                "report_to": [],
            },
        }
    )
    trainer = Trainer(cfg)
    assert trainer.task.reward_fn is gsm8k_reward
    assert trainer.task.train[0].prompt.startswith("Question: Natalia sold clips")
    trainer.train()

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "train/acc" in records[1] and "actor/entropy" in records[2]
    assert "val-core/gsm8k/acc/mean@1" in records[2]
    checkpoint = run / "checkpoints" / "step_000002" / "model"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "tokenizer.json").is_file()

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "eval"
    args = parser.parse_args(
        [
            "--model", str(checkpoint),
            "--bench", f"gsm8k:{GSM8K / 'test.jsonl'}",
            "--bench", f"math500=math:{MATH500 / 'test.jsonl'}",
            "--samples", "2",
            "--limit", "3",
            "--out", str(out),
            "rollout.max_new_tokens=8",
            "trainer.device=cpu",
        ]
    )  # fmt: skip
    report = cmd_eval(args)

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["model"] == str(checkpoint)
    assert list(saved["benchmarks"]) == ["gsm8k", "math500"]
    for name, result in saved["benchmarks"].items():
        assert result["problems"] == 3
        for key in ("greedy@1", "avg@2", "pass@1", "pass@2", "maj@2", "score"):
            assert 0.0 <= result[key] <= 1.0, (name, key)
        generations = (out / "generations" / f"{name}.jsonl").read_text().splitlines()
        assert len(generations) == 3
        assert len(json.loads(generations[0])["samples"]) == 2
    scores = [r["score"] for r in saved["benchmarks"].values()]
    assert saved["average"]["score"] == pytest.approx(sum(scores) / 2)
    table = (out / "results.md").read_text()
    assert "| gsm8k | 3 |" in table and "| math500 | 3 |" in table and "| average |" in table
