"""The report notebooks execute on a fixture run dir (synthetic tables, a sweep, a tiny capture run)."""

from __future__ import annotations

import os
from pathlib import Path

import fixtures_report as fx
import jupytext
import pytest

from analysis.report import NOTEBOOKS, _parameter_cell, available_tables, default_run_dir, render_notebook

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
def report_dirs(tmp_path_factory) -> dict[str, Path]:
    return fx.write_fixture_report(tmp_path_factory.mktemp("report"))


@pytest.mark.slow
def test_attention_studies_notebook(report_dirs, tmp_path):
    out = render_notebook(NOTEBOOKS / "attention_studies.py", report_dirs["run"], tmp_path / "a.html",
                          params={"CAPTURE_DIR": report_dirs["capture"]}, ipynb=tmp_path / "a.ipynb")
    html = out.read_text()
    assert html.count("data:image/png") >= 5  # masks, timeline, frequency, objects, attention stats
    assert "object masks from" in html and "sample_masks.npz" in html  # stored masks, no segmenter run
    assert "masked patches have more high-frequency energy" in html  # the claims table


@pytest.mark.slow
def test_sag_report_notebook(report_dirs, tmp_path):
    out = render_notebook(NOTEBOOKS / "sag_report.py", report_dirs["run"], tmp_path / "r.html",
                          params={"SWEEP_DIR": report_dirs["sweep"]})
    html = out.read_text()
    assert html.count("data:image/png") >= 3  # qualitative, quality, cost
    assert "inconclusive" in html and "sag_cfg" in html
