import json

import pytest

from entroprl.demo import format_table, run_demo
from entroprl.warmstart import WarmStartConfig


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """The whole demo path on a small budget: warm start, three methods, table, summary, reports."""
    monkeypatch.setenv("ENTROPRL_CACHE_DIR", str(tmp_path / "cache"))
    small = WarmStartConfig(steps=30, num_problems=100, eval_problems=20)
    summary = run_demo(tmp_path / "demo", steps=3, warm_start_config=small)
    assert list(summary) == ["grpo", "clip_cov", "kl_cov"]
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for method, s in written.items():
        for key in (
            "entropy_start",
            "entropy_end",
            "accuracy_start",
            "accuracy_end",
            "pass_at_k_end",
        ):
            assert isinstance(s[key], float), (method, key)
        assert set(s["law"]) >= {"a", "b", "r2", "ceiling"}
        assert s["steps"] == 3
        assert (tmp_path / "demo" / method / "analysis" / "report.html").is_file()
    assert (tmp_path / "demo" / "analysis" / "report.html").is_file()
    out = capsys.readouterr().out
    assert format_table(summary) in out
    assert "analysis report:" in out
