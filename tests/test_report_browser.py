"""The HTML reports in a real headless browser (Debian's chromium): they load with no console
error and every figure is decoded and displayed (naturalWidth > 0).

No extra Python dependency: a copy of the page gets a small script that records errors (uncaught
exceptions, resources that fail to load, console.error) and, once the page has loaded, writes the
state of every <img> into the DOM, which `--dump-dom` prints. Any console message at all in
chromium's log also fails the check: the reports have no script of their own.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from entroprl.analysis.comparison import compare_runs
from entroprl.analysis.report import analyze_run
from tests.test_analysis import make_run

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_RECORD_ERRORS = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push(
  e.message ? String(e.message) : "failed to load " + String(e.target && e.target.src).slice(-120)
), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push("console.error: " + args.join(" "));
                               __consoleError(...args); };
</script>"""

_REPORT_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const pre = document.createElement("pre");
  pre.id = "entroprl-check";
  pre.textContent = JSON.stringify({
    widths: images.map((i) => (i.complete ? i.naturalWidth : 0)),
    errors: window.__errors,
  });
  document.body.appendChild(pre);
});
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def browser_check(page: Path, tmp: Path) -> dict:
    """Load an instrumented copy of `page` (beside it, so relative paths resolve the same) and
    return {"images": naturalWidth of each <img>, "errors": [...], "console": [log lines]}."""
    text = page.read_text()
    probe = page.with_name(f"{page.stem}.check.html")
    probe.write_text(
        text.replace("<head>", "<head>" + _RECORD_ERRORS, 1).replace(
            "</body>", _REPORT_IMAGES + "</body>", 1
        )
    )
    done = _chromium(
        tmp,
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="entroprl-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the check script did not run; stderr: {done.stderr[-2000:]}"
    state = json.loads(html.unescape(found.group(1)))
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return {"images": state["widths"], "errors": state["errors"], "console": console}


def test_the_checker_catches_broken_pages(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="missing.png" alt="x"><img src="data:image/png;base64,AAAA" alt="y">'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>'
    )
    result = browser_check(page, tmp_path)
    assert result["images"] == [0, 0]
    assert any("missing.png" in e for e in result["errors"])
    assert any("boom" in e for e in result["errors"])
    assert any("undefinedFunction" in e for e in result["errors"])
    assert result["console"]


def _assert_clean(report: Path, tmp: Path, figures: int) -> None:
    result = browser_check(report, tmp)
    assert result["errors"] == []
    assert result["console"] == []
    assert len(result["images"]) == figures == report.read_text().count("<img")
    assert all(width > 0 for width in result["images"]), result["images"]


def test_analysis_report_loads_and_shows_every_figure(tmp_path):
    make_run(tmp_path / "run")
    report = analyze_run(tmp_path / "run")
    _assert_clean(report, tmp_path, figures=6)
    shot = tmp_path / "screenshot.png"
    done = _chromium(
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        "--hide-scrollbars",
        report.as_uri(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    # figures drawn, not a blank page: many distinct colours, much of the page not white
    assert np.unique(pixels.reshape(-1, pixels.shape[-1])[::97], axis=0).shape[0] > 50
    assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.02


def test_report_with_omitted_sections_loads(tmp_path):
    make_run(tmp_path / "run", dynamics=False, rollout_steps=())
    report = analyze_run(tmp_path / "run")
    _assert_clean(report, tmp_path, figures=3)  # curves, law, covariance


def test_comparison_report_loads(tmp_path):
    make_run(tmp_path / "grpo", rollout_steps=())
    make_run(tmp_path / "clip_cov", a=0.2, b=0.7, seed=3, rollout_steps=())
    report = compare_runs([tmp_path / "grpo", tmp_path / "clip_cov"], tmp_path / "cmp")
    _assert_clean(report, tmp_path, figures=2)  # by method, covariance groups


def test_method_comparison_with_pooled_laws_loads(tmp_path):
    """The demo's layout, METHOD/seed_K: the comparison by method, its covariance groups, and the
    pooled laws with their verdicts."""
    runs = []
    for i, method in enumerate(("grpo", "clip_cov")):
        for seed in range(2):
            path = tmp_path / method / f"seed_{seed}"
            make_run(path, a=0.2 + 0.1 * i, eval_every=5, seed=seed + 10 * i, rollout_steps=())
            runs.append(path)
    report = compare_runs(runs, tmp_path / "cmp", pool=True)
    _assert_clean(report, tmp_path, figures=3)
    assert "grpo: The law describes its pooled points: a = " in report.read_text()
