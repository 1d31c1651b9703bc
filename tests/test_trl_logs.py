"""`entroprl analyze` on the logs TRL itself writes (in .venv-trl: scripts/test.sh): a GRPOTrainer
run's trainer_state.json and its TensorBoard events (`report_to="tensorboard"`), read alike, and
its log history saved as JSON lines under a name that says nothing."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.trl
pytest.importorskip(
    "trl",
    reason="TRL is not installed in this environment; scripts/test.sh runs these in .venv-trl",
)

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from entroprl import cli  # noqa: E402
from entroprl.analysis.foreign import detect_format  # noqa: E402
from entroprl.analysis.runs import load_run  # noqa: E402
from tests.policies import make_tiny_policy  # noqa: E402

PROMPTS = ["1+2=", "3*4=", "5-1=", "7+7=", "2*2=", "9-3=", "8+1=", "6*0="]


def accuracy_reward(completions, **kwargs):
    return [float("1" in c) for c in completions]


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    """Ten steps of TRL's GRPOTrainer on a tiny model, evaluated every 2 steps."""
    out = tmp_path_factory.mktemp("trl") / "out"
    model, tok = make_tiny_policy()
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        report_to="tensorboard",
        use_cpu=True,
        seed=0,
        max_steps=10,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=10,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=accuracy_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}),
        processing_class=tok,
    )
    trainer.train()
    return out


def test_trainer_state_and_tensorboard_read_alike(trl_run):
    state, events = trl_run / "checkpoint-10", trl_run  # the events are in out/runs/<date>/
    assert detect_format(state) == "trl" and detect_format(events) == "tensorboard"
    from_state, from_events = load_run(state), load_run(events)
    assert "trainer_state.json" in from_state.table.reader
    assert "TensorBoard" in from_events.table.reader
    assert from_state.keys.entropy == "entropy"
    assert from_events.keys.entropy == "train/entropy"  # the Trainer's TensorBoard callback
    assert from_state.keys.accuracy == ("eval_rewards/accuracy_reward/mean",)
    assert from_events.keys.accuracy == ("eval/rewards/accuracy_reward/mean",)
    assert from_state.steps.tolist() == from_events.steps.tolist() == list(range(1, 11))
    for key in ("entropy", "accuracy", "reward"):
        a, b = from_state.series[key], from_events.series[key]
        assert (np.isnan(a) == np.isnan(b)).all(), key
        np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], rtol=1e-6)  # float32
    assert np.count_nonzero(~np.isnan(from_state.series["accuracy"])) == 5


def test_log_history_as_json_lines_under_any_name(trl_run, tmp_path):
    history = json.loads((trl_run / "checkpoint-10" / "trainer_state.json").read_text())
    lines = tmp_path / "history.log"
    lines.write_text("".join(json.dumps(r) + "\n" for r in history["log_history"]))
    assert detect_format(lines) == "jsonl"
    reference = load_run(trl_run / "checkpoint-10")
    run = load_run(lines)
    for key in ("entropy", "accuracy", "reward"):
        np.testing.assert_array_equal(run.series[key], reference.series[key])
    cli.main(["compare", str(lines), str(trl_run), "--out", str(tmp_path / "cmp")])
    runs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]
    assert [r["format"] for r in runs] == ["jsonl", "tensorboard"]
    assert all(r["law"]["n"] == 5 for r in runs)
