"""Math datasets: reading JSON lines / Parquet / `datasets` directories, the GSM8K and MATH formats,
rows left out and reported, prompt rendering, the file tasks of the registry, and the recipes."""

import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from entroprl.config import ConfigError, DataConfig, load_config
from entroprl.demo.tokenizer import build_char_tokenizer
from entroprl.tasks import math_problems
from entroprl.tasks.math_problems import (
    DataWarning,
    gsm8k_reference,
    load_examples,
    load_problems,
    read_rows,
    reference_answer,
    render_prompt,
    voted_answer,
)
from entroprl.tasks.registry import build_task
from entroprl.tasks.rewards import gsm8k_reward, math_reward

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data missing")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def left_out_lines(record) -> list[int]:
    message = str(record[0].message)
    return [
        int(x)
        for x in re.search(r"(?:lines|rows) ([\d, .]+)$", message)[1].split(", ")
        if x != "..."
    ]


# -- reading ---------------------------------------------------------------------------------------


def test_jsonl_rows_keep_their_line_numbers(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"a": 1}', "", "  ", '{"a": 2}'])
    assert read_rows(path) == [(1, {"a": 1}), (4, {"a": 2})]


@pytest.mark.parametrize(
    "bad, why",
    [('{"question": "x", ', "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    path = write_lines(tmp_path / "d.jsonl", ['{"question": "q", "answer": "1"}', "", bad])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: {why}")):
        load_problems(path, "jsonl")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unknown data file type '\.csv'"):
        read_rows(write_lines(tmp_path / "d.csv", ["a,b"]))
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{binary}:2: not UTF-8")):
        read_rows(binary)


ROWS = [
    {"question": "Q1", "answer": "work\n#### 1,234"},
    {"question": "Q2", "answer": "no final answer here"},
    {"question": "", "answer": "#### 5"},
    {"question": "Q4", "answer": "#### -3.5"},
    {"question": "Q5"},
    {"question": "Q6", "answer": 42},
]


def test_parquet_and_datasets_dir_read_like_jsonl(tmp_path):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": r["question"], "answer": str(r.get("answer", ""))} for r in ROWS]
    jsonl = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "one_split")
    )
    expected = read_rows(jsonl)
    assert expected[0][1] == rows[0]
    for path in (tmp_path / "d.parquet", tmp_path / "ds", tmp_path / "one_split"):
        assert read_rows(path) == expected, path
    two = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:2]),
            "test": datasets.Dataset.from_list(rows[2:]),
        }
    )
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\].*two/test"):
        read_rows(tmp_path / "two")


def test_optional_readers_missing_say_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"needs pyarrow: pip install 'entroprl\[data\]'"):
        read_rows(tmp_path / "d.parquet")
    with pytest.raises(ImportError, match=r"datasets package: pip install 'entroprl\[data\]'"):
        read_rows(tmp_path / "ds")


# -- formats ---------------------------------------------------------------------------------------


def test_gsm8k_rows_without_an_answer_are_reported_and_left_out(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps(r) for r in ROWS])
    with pytest.warns(DataWarning, match=r"left out 3 row\(s\)") as record:
        problems = load_problems(path, "gsm8k")
    assert left_out_lines(record) == [2, 3, 5]
    assert [(p.question, p.answer, p.line) for p in problems] == [
        ("Q1", "1234", 1),
        ("Q4", "-3.5", 4),
        ("Q6", "42", 6),
    ]


def test_report_lists_the_first_ten_lines(tmp_path):
    lines = [
        json.dumps({"question": f"Q{i}", "answer": "" if i % 2 else "#### 1"}) for i in range(30)
    ]
    with pytest.warns(DataWarning, match=r"left out 15 row\(s\)") as record:
        load_problems(write_lines(tmp_path / "g.jsonl", lines), "gsm8k")
    assert str(record[0].message).endswith("lines 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, ...")


def test_no_usable_row_is_an_error(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "Q", "answer": ""})])
    with warnings.catch_warnings(), pytest.raises(ValueError, match="none of its 1 rows"):
        warnings.simplefilter("ignore", DataWarning)
        load_problems(path, "gsm8k")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a\n#### 18", "18"),
        ("#### $1,000.", "1000"),
        ("x #### 1 #### 7", "7"),
        ("-2.50", "-2.50"),
        ("  42 ", "42"),
        ("#### 18 dollars", None),
        ("She has 3 apples", None),
        ("#### ", None),
    ],
)
def test_gsm8k_reference(text, expected):
    assert gsm8k_reference(text) == expected


@given(st.integers(-(10**12), 10**12), st.booleans(), st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_gsm8k_reference_reads_any_formatted_integer(value, commas, prefix):
    written = f"{value:,}" if commas else str(value)
    assert gsm8k_reference(f"{prefix}\n#### {written}") == str(value)


def test_math_answer_field_then_last_boxed_of_solution():
    solution = r"First \boxed{1}. Then $\boxed{\frac{a}{\sqrt{b}}}$ and done."
    assert reference_answer({"answer": " 7 ", "solution": solution}, "math") == "7"
    assert reference_answer({"answer": "", "solution": solution}, "math") == r"\frac{a}{\sqrt{b}}"
    assert reference_answer({"solution": solution}, "math") == r"\frac{a}{\sqrt{b}}"
    assert reference_answer({"solution": r"unclosed \boxed{3"}, "math") is None
    assert reference_answer({"solution": r"\boxed{ }"}, "math") is None
    assert reference_answer({"answer": None}, "math") is None


def test_custom_and_dotted_keys(tmp_path):
    rows = [
        {"prompt": "P1", "reward_model": {"ground_truth": 3.5}},
        {"prompt": "P2", "reward_model": {}},
        {"prompt": ["not", "text"], "reward_model": {"ground_truth": "1"}},
        {"prompt": "P4", "reward_model": {"ground_truth": True}},
        {"prompt": "P5", "reward_model": {"ground_truth": "x^2"}},
    ]
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(r) for r in rows])
    with pytest.warns(DataWarning) as record:
        problems = load_problems(
            path, "jsonl", prompt_key="prompt", answer_key="reward_model.ground_truth"
        )
    assert left_out_lines(record) == [2, 3, 4]
    assert [(p.question, p.answer) for p in problems] == [("P1", "3.5"), ("P5", "x^2")]
    assert (
        load_problems(
            path, "jsonl", prompt_key="prompt", answer_key="reward_model.ground_truth", limit=1
        )[0].question
        == "P1"
    )


@given(
    st.lists(
        st.tuples(st.text(max_size=20), st.one_of(st.text(max_size=10), st.integers())),
        min_size=1,
        max_size=15,
    )
)
@settings(max_examples=60, deadline=None)
def test_jsonl_format_keeps_exactly_the_rows_with_both_fields(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("h") / "h.jsonl"
    write_lines(path, [json.dumps({"question": q, "answer": a}) for q, a in rows])
    expected = []
    for line, (q, a) in enumerate(rows, 1):
        answer = a.strip() if isinstance(a, str) else str(a)
        if q.strip() and answer:
            expected.append((q.strip(), answer, line))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        if not expected:
            with pytest.raises(ValueError, match="none of its"):
                load_problems(path, "jsonl")
            return
        got = load_problems(path, "jsonl")
    assert [(p.question, p.answer, p.line) for p in got] == expected


# -- prompts ---------------------------------------------------------------------------------------

CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_plain_and_chat_rendering():
    assert render_prompt("What is {x}?", instruction="Box it.") == (
        "Question: What is {x}?\nBox it.\nAnswer:"
    )
    assert render_prompt("2+2", instruction="", plain_template="Q: {message} A:") == "Q: 2+2 A:"
    tok = build_char_tokenizer()
    assert tok.chat_template is None
    assert render_prompt("2+2", tok, instruction="Box it.") == "Question: 2+2\nBox it.\nAnswer:"
    tok.chat_template = CHAT
    assert render_prompt("2+2", tok, instruction="Box it.") == "<user>2+2\nBox it.\n<assistant>"
    assert render_prompt("2+2", tok, instruction="", use_chat_template=False) == (
        "Question: 2+2\nAnswer:"
    )
    with pytest.raises(ValueError, match="must contain"):
        render_prompt("2+2", plain_template="Q: A:")


def test_load_examples_renders_prompts(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"problem": "1+1?", "answer": "2"})])
    tok = build_char_tokenizer()
    tok.chat_template = CHAT
    [example] = load_examples(path, "math", tok, instruction="Box it.")
    assert (example.prompt, example.answer) == ("<user>1+1?\nBox it.\n<assistant>", "2")


@pytest.mark.parametrize(
    "text, reward, vote",
    [
        (r"so \boxed{ \frac{1}{2} }", "math", r"\frac{1}{2}"),
        (r"\boxed{}", "math", None),
        ("no box", "math", None),
        ("#### 18.00", "gsm8k", "18"),
        (r"\boxed{1,000}", "gsm8k", "1000"),
        ("it is -0.0", "gsm8k", "0"),
        ("1.50 then 2.500", "gsm8k", "2.5"),
        ("nothing", "gsm8k", None),
    ],
)
def test_voted_answer(text, reward, vote):
    assert voted_answer(text, reward) == vote


# -- the shared data files -------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_row_loads_with_its_final_number(split):
    path = SHARED / "gsm8k" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        problems = load_problems(path, "gsm8k")
    assert len(problems) == len(rows)
    for problem, row in zip(problems, rows, strict=True):
        assert problem.answer == row["answer"].split("####")[-1].strip().replace(",", "")
        assert problem.question == row["question"].strip()


@needs_shared
def test_every_math500_row_loads_with_its_answer_field():
    path = SHARED / "math500" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        problems = load_problems(path, "math")
    assert [p.answer for p in problems] == [r["answer"].strip() for r in rows]
    assert [p.question for p in problems] == [r["problem"].strip() for r in rows]


# -- tasks in the registry -------------------------------------------------------------------------


@pytest.fixture
def gsm8k_files(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(r) for r in ROWS])
    test = write_lines(
        tmp_path / "test.jsonl", [json.dumps({"question": "T", "answer": "#### 18"})] * 3
    )
    return str(train), str(test)


def test_gsm8k_task(gsm8k_files):
    train, test = gsm8k_files
    tok = build_char_tokenizer()
    tok.chat_template = CHAT
    cfg = DataConfig(
        task="gsm8k", train_file=train, test_file=test, test_limit=2, instruction="Box it."
    )
    with pytest.warns(DataWarning, match="train.jsonl: left out 3"):
        task = build_task(cfg, tok)
    assert task.name == "gsm8k" and task.reward_fn is gsm8k_reward
    assert [e.answer for e in task.train] == ["1234", "-3.5", "42"]
    assert task.train[0].prompt == "<user>Q1\nBox it.\n<assistant>"
    assert len(task.test) == 2
    assert task.score([r"so \boxed{18}", "17", "#### 18.0"], ["18"] * 3) == [1.0, 0.0, 1.0]


def test_math_task_scores_in_worker_processes(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"problem": "P", "answer": r"\frac12"})])
    task = build_task(DataConfig(task="math", train_file=str(path)))
    assert task.reward_fn is math_reward and task.test == []
    assert task.train[0].prompt.startswith("Question: P\nPlease reason step by step")
    assert task.score([r"\boxed{0.5}", r"\boxed{1/3}", "0.5"], [r"\frac12"] * 3) == [1.0, 0.0, 0.0]


def test_jsonl_task_with_gsm8k_reward(gsm8k_files):
    train, _ = gsm8k_files
    cfg = DataConfig(task="jsonl", train_file=train, reward="gsm8k")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        task = build_task(cfg)
    assert task.reward_fn is gsm8k_reward
    assert task.train[0].answer == "work\n#### 1,234"


def test_task_file_errors_name_the_config_key(tmp_path, gsm8k_files):
    train, _ = gsm8k_files
    with pytest.raises(ConfigError, match=r"data\.train_file: task 'math' reads"):
        build_task(DataConfig(task="math"))
    bad = write_lines(tmp_path / "bad.jsonl", ["{"])
    cfg = DataConfig(task="gsm8k", train_file=train, test_file=str(bad))
    with (
        pytest.raises(ConfigError, match=rf"data\.test_file: {re.escape(str(bad))}:1"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", DataWarning)
        build_task(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.reward=exact", "data.reward"),
        ("data.plain_template=Q", "data.plain_template"),
        ("data.test_limit=0", "data.test_limit"),
    ],
)
def test_data_config_validation(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_file_task_that_evaluates_needs_a_test_file():
    with pytest.raises(ConfigError, match=r"data\.test_file"):
        load_config(None, ["data.task=gsm8k", "data.train_file=x.jsonl"])
    load_config(None, ["data.task=gsm8k", "data.train_file=x.jsonl", "trainer.eval_every=0"])


def test_config_defaults_match_the_library():
    cfg = DataConfig()
    assert (cfg.instruction, cfg.plain_template) == (
        math_problems.DEFAULT_INSTRUCTION,
        math_problems.DEFAULT_PLAIN_TEMPLATE,
    )


# -- recipes ---------------------------------------------------------------------------------------

# The papers' settings (algorithms.md §10), written out here independently of the recipe files.
CUI = {
    "rollout.prompts_per_step": 256,
    "rollout.n": 8,
    "rollout.temperature": 1.0,
    "rollout.max_new_tokens": 8192,
    "algorithm.loss_agg_mode": "token-mean",
    "algorithm.kl_coef": 0.0,
    "algorithm.entropy_coef": 0.0,
    "algorithm.dynamic_sampling": True,
    "algorithm.dynamic_sampling_metric": "score",
    "algorithm.dynamic_sampling_max_batches": 10,
    "algorithm.dynamic_sampling_gen_prompts": None,  # the current scripts sample 1 x
    "optim.epochs": 1,
}
DENG = {
    "rollout.prompts_per_step": 512,
    "rollout.n": 8,
    "rollout.max_new_tokens": 8192,
    "algorithm.loss.ppo.clip_low": 0.2,
    "algorithm.loss.ppo.clip_high": 0.28,
    "algorithm.loss.ppo.clip_ratio_c": 10.0,
    "optim.lr": 1e-6,
    "algorithm.loss_agg_mode": "token-mean",
    "algorithm.dynamic_sampling": True,
    "algorithm.dynamic_sampling_metric": "score",
    "algorithm.dynamic_sampling_max_batches": 10,
    "algorithm.dynamic_sampling_gen_prompts": 3 * 512,
}
RECIPES = {
    "qwen2.5-7b-grpo": CUI
    | {
        "algorithm.policy_loss": "ppo",
        "algorithm.loss.ppo.clip_high": 0.2,
        "algorithm.loss.ppo.clip_ratio_c": 10.0,
    },
    "qwen2.5-7b-clip-cov": CUI
    | {
        "algorithm.policy_loss": "clip_cov",
        "algorithm.loss.clip_cov.ratio": 2e-4,
        "algorithm.loss.clip_cov.lb": 1.0,
        "algorithm.loss.clip_cov.ub": 5.0,
        "algorithm.loss.clip_cov.clip_low": 1.0,
        "algorithm.loss.clip_cov.clip_high": 1.0,
    },
    "qwen2.5-7b-kl-cov": CUI
    | {
        "algorithm.policy_loss": "kl_cov",
        "algorithm.loss.kl_cov.ratio": 2e-3,
        "algorithm.loss.kl_cov.coef": 1.0,
    },
    "qwen2.5-7b-grpo-ppl": DENG
    | {"algorithm.ppl_shaping_alpha": 0.01, "algorithm.position_shaping_alpha": 0.0},
    "qwen2.5-7b-grpo-position": DENG
    | {"algorithm.position_shaping_alpha": 0.05, "algorithm.ppl_shaping_alpha": 0.0},
}


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads_with_the_papers_settings(name):
    config = load_config(REPO / "recipes" / f"{name}.yaml")
    for dotted, value in RECIPES[name].items():
        node = config
        for part in dotted.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value, dotted
    # 32 prompts x 8 responses per update on 8 GPUs: 32 responses per GPU
    assert config.optim.mini_batch_size * 8 == 32 * config.rollout.n
    assert 5e-7 <= config.optim.lr <= 1e-6
    assert config.model.path and config.data.task == "math"
    assert config.rollout.backend == "vllm" and config.model.dtype == "float32"
    assert config.trainer.strategy == "fsdp" and config.model.compute_dtype == "bfloat16"


def test_overlong_questions_are_left_out_and_reported(tmp_path):
    """A 10 MB question once aborted the process inside the tokenizer: questions over
    max_chars are dropped before any tokenizer sees them, and their lines reported."""
    rows = [{"question": "q" * n, "answer": "1"} for n in (10, 10_000_000, 50, 201)]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    with pytest.warns(DataWarning, match=r"2 question\(s\) over 200 characters.*lines 2, 4"):
        problems = load_problems(path, "jsonl", max_chars=200)
    assert [p.line for p in problems] == [1, 3]
    assert DataConfig().max_prompt_chars == math_problems.MAX_PROMPT_CHARS


def test_the_prompt_length_limit_is_a_config_key(tmp_path):
    rows = [{"question": "q" * n, "answer": "1"} for n in (10, 300)]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    cfg = DataConfig(task="jsonl", train_file=str(path), max_prompt_chars=100)
    with pytest.warns(DataWarning, match="over 100 characters"):
        task = build_task(cfg)
    assert len(task.train) == 1


def test_a_json_array_file_says_which_formats_are_read(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "q", "answer": "1"}], indent=2))
    with pytest.raises(ValueError, match="JSON array") as caught:
        read_rows(path)
    message = str(caught.value)
    assert str(path) in message and "JSON lines" in message and "Parquet" in message
