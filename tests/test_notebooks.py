"""The report notebooks: parameters, the default run dir, and the pages the tiny main job's report stage rendered
(its seeded run dir: tables, capture run, evaluate sweep; tests/main_job_run.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import fixtures_report as fx
import jupytext
import pytest

from analysis.report import NOTEBOOKS, _parameter_cell, available_tables, default_run_dir
from analysis.tables import read_table

SCRIPTS = ["attention_studies.py", "sag_report.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse_with_a_parameters_cell(name):
    nb = jupytext.read(NOTEBOOKS / name)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "RUN_DIR = None" in tagged[0].source


def test_default_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SAG_RUN_DIR", raising=False)
    assert default_run_dir(tmp_path / "absent") is None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.utime(tmp_path / "a", (1, 1))
    assert default_run_dir(tmp_path) == tmp_path / "b"
    monkeypatch.setenv("SAG_RUN_DIR", str(tmp_path / "a"))
    assert default_run_dir(tmp_path) == tmp_path / "a"
    fx.write_run(tmp_path / "r", names=["bench"])
    assert available_tables(tmp_path / "r") == ["bench"] and available_tables(None) == []
    assert _parameter_cell({"RUN_DIR": "/x", "SWEEP_DIR": None}).splitlines()[1:] == ["RUN_DIR = '/x'",
                                                                                     "SWEEP_DIR = None"]


@pytest.fixture(scope="module")
def rendered(tiny_main_job) -> dict[str, Path]:
    """Both reports as the tiny main job's report stage rendered them (analysis.report.render_reports, on its run dir
    with its capture run and its evaluate sweep; tests/main_job_run.py), shared by the content and browser checks."""
    return {name: tiny_main_job.out / "report" / f"{name}.html" for name in ("attention_studies", "sag_report")}


@pytest.fixture(scope="module")
def claims(tiny_main_job):
    """The main job's claims table (what the summaries on both pages show)."""
    return read_table(tiny_main_job.out, "claims")


def body(path: Path) -> str:
    """The HTML after <body> (the template's CSS above it names code editors and stderr)."""
    return path.read_text(encoding="utf-8").split("<body", 1)[1]


def check_page(html: str, n_figures: int, run_dir: Path, claims) -> None:
    """No code, no warnings, no absolute paths; the summary table with one row per claim and each claim's primary
    verdict; every figure embedded with a caption."""
    code_cells = re.findall(r'class="jp-Cell jp-CodeCell[^"]*"', html)
    assert code_cells and all("jp-mod-noInput" in c for c in code_cells)  # every code cell without its input
    assert "highlight" not in html and "import " not in html
    text = re.sub(r"data:image/png;base64,[^\"]+", "", html)  # base64 may spell anything
    assert not re.search(r"warn|stderr|Traceback", text, re.IGNORECASE)
    assert str(run_dir.resolve()) not in html and str(run_dir.parent.resolve()) not in html  # relative paths
    table = html.split('id="sag-summary"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr") - 1 == claims["claim_id"].nunique()  # header + one row per claim
    assert all(v in table for v in claims.loc[claims["scope"] == "primary", "verdict"])
    figures = re.findall(r'<figure class="sag-fig"><img [^>]*src="data:image/png;base64,[^"]+"[^>]*>\s*'
                         r"<figcaption>([^<]+)", html)  # nbconvert may reorder the img attributes
    assert len(figures) == n_figures  # each caption says on what n (seeds, images, or the benchmark's batch)
    assert all(re.search(r"n = \d+|\d+ (generated )?(seeds|images)|batch \d+", c) for c in figures), figures


# The pages' pieces on the synthetic tables of fixtures_report (a "supported" verdict, position-controlled effects,
# "better"/"worse" deltas, the "sag s=0.5" row labels) are checked without a kernel in tests/test_report_page.py.
@pytest.mark.slow
def test_attention_studies_notebook(rendered, tiny_main_job, claims):
    html = body(rendered["attention_studies"])
    check_page(html, 6, tiny_main_job.out, claims)  # claims, masks, timeline, frequency, objects, attention stats
    assert "object masks from" in html and "sample_masks.npz" in html  # stored masks, no segmenter run
    assert all(c in html for c in claims["claim"].unique())  # the claims table, each claim in words
    assert "position-controlled" in html and "C1: attention masks" in html


@pytest.mark.slow
def test_sag_report_notebook(rendered, tiny_main_job, claims):
    html = body(rendered["sag_report"])
    check_page(html, 4, tiny_main_job.out, claims)  # claims, qualitative, quality, cost
    assert "sag_cfg" in html and "Δ Fréchet distance ↓" in html  # the quality table's combos, paired deltas
    # the main job's seeded evaluate stage: SAG at s = 0.5 lowers FD with a paired CI that excludes 0
    assert re.search(r"<td>sag_s0\.5</td>\s*<td>6</td>\s*<td>[^<]*</td>\s*<td>-[^<]*better</td>", html)


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
PROBE = """<script>window.addEventListener('load', function () {
  var t = document.getElementById('sag-summary'), r = t.getBoundingClientRect();
  var hit = document.elementFromPoint((r.left + r.right) / 2, (r.top + r.bottom) / 2);
  parent.postMessage([location.pathname.split('/').pop(), r.top, r.bottom, r.left, r.right, window.innerWidth,
                      window.innerHeight, hit !== null && t.contains(hit)].join(','), '*');
});</script>"""
FRAMES = """<html><body style="margin:0"><script>window.addEventListener('message', function (e) {
  document.body.setAttribute('data-' + e.data.split(',')[0].replace('.html', ''), e.data); });</script>
{frames}</body></html>"""


@pytest.mark.slow
def test_summary_visible_without_scrolling(rendered, tmp_path):
    """A real headless Chromium: in a 1400x900 viewport the claims summary of each report lies entirely in the first
    screen and is not covered by anything. Each report (a copy with a script that posts the table's bounding box
    after load) sits in a 1400x900 iframe of one page, so one browser start checks both and the viewport is exactly
    1400x900 (a headless window's own viewport is smaller than --window-size by its frame); --dump-dom returns the
    boxes the browser's layout gave (no image analysis)."""
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (apt-get install -y chromium)")
    frames = []
    for name, path in rendered.items():
        (tmp_path / f"{name}.html").write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                                               encoding="utf-8")
        frames.append(f'<iframe src="{name}.html" width="1400" height="900" style="border:0;display:block"></iframe>')
    page = tmp_path / "frames.html"
    page.write_text(FRAMES.replace("{frames}", "".join(frames)), encoding="utf-8")
    res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--allow-file-access-from-files", "--window-size=1400,1900", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    for name in rendered:
        probe = re.search(rf'data-{name}="([^"]+)"', res.stdout)
        assert probe, f"{name}: no probe in the DOM; " + res.stderr[-2000:]
        top, bottom, left, right, width, height = (float(v) for v in probe.group(1).split(",")[1:7])
        assert (width, height) == (1400, 900), probe.group(1)
        assert 0 <= top < bottom <= height and 0 <= left < right <= width, probe.group(1)  # all of it on screen
        assert probe.group(1).endswith("true"), probe.group(1)  # the table itself is at its centre (not covered)
