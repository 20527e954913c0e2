"""The reports' summaries (analysis.summary), the forest plot (fig_claims), the HTML pieces and the run's index page.

Fast: pure functions on the synthetic tables of fixtures_report; the rendered-report checks (no code, no warnings,
one row per claim, every figure, the headless-browser check) are in test_notebooks.py, which renders once.
"""

from __future__ import annotations

import re
from pathlib import Path

import fixtures_report as fx
import numpy as np
import pandas as pd
import pytest

from analysis import report_html, summary
from analysis.figures import captions, fig_claims, fig_cost, fig_objects, style
from analysis.index_page import write_index
from sag.errors import SagConfigError


def claims_frame() -> pd.DataFrame:
    """The fixture claims plus a pooled row for C1 and exploratory rows in two t bands."""
    c = fx.claims()
    pooled = c.iloc[[1]].assign(scope="pooled", adjusted=False, verdict="", effect=7.0, ci_low=3.0, ci_high=11.0,
                                layer="(pooled)")
    ex = c.iloc[[2, 2, 2]].assign(t=[50.0, 500.0, 500.0], t_band=["10-100", "300-600", "300-600"], psi=[1.0, 1.0, 1.3],
                                  effect=[-3.0, 8.0, 12.0], ci_low=[-5.0, 2.0, -1.0], ci_high=[-1.0, 14.0, 25.0],
                                  direction=["opposite", "paper", "neither"])
    return pd.concat([c.iloc[:2], pooled, ex], ignore_index=True)


def test_claims_summary_one_row_per_claim_in_words():
    s = summary.claims_summary(claims_frame())
    assert list(s["claim"]) == ["B1", "C1"] and list(s["verdict"]) == ["supported", "not shown"]
    b1, c1 = s.iloc[0], s.iloc[1]
    assert b1["ours"] == "+21.0 % (relative)" and b1["CI"] == "97.5 % [12.0, 30.0]" and b1["paper"] == "+18 %"
    assert "position-controlled (uncontrolled -5.0 %)" in c1["ours"] and "position" not in b1["ours"]
    assert c1["n"] == "4 (+1 left out)" and b1["why"] == "too few images (n = 4 < 10)"
    row = fx.claims().iloc[0].copy()
    row[["n", "p_adj"]] = 40, 0.003
    assert summary.verdict_reason(row) == "CI above 0, Holm p = 0.003 < α = 0.05"
    row[["verdict", "ci_low"]] = "not shown", -1.0
    assert summary.verdict_reason(row) == "the CI includes 0 (Holm p = 0.003)"


def test_forest_data_plot_and_caption():
    claims = claims_frame()
    d = fig_claims.data(claims)
    assert list(d["claim_id"]) == ["B1", "C1"] and list(d["paper_effect"]) == [17.7, 39.0]  # analysis.claims
    assert np.isnan(d.loc[0, "pooled_effect"]) and list(d.loc[1, ["pooled_effect", "pooled_ci_low"]]) == [7.0, 3.0]
    fig = fig_claims.plot(claims)
    assert len(fig.axes) == 2 and all(ax.get_lines()[0].get_xdata()[0] == 0 for ax in fig.axes)  # zero lines
    colours = fig_claims.verdict_colours()
    assert fig.axes[0].texts[-1].get_text().startswith("supported") and \
        fig.axes[0].texts[-1].get_color() == colours["supported"]
    style.plt.close(fig)
    text = fig_claims.caption(claims)
    assert "n = 4 images" in text and "97.5 %" in text and "supported 1" in text
    with pytest.raises(ValueError, match="no primary rows"):
        fig_claims.plot(claims[claims["scope"] != "primary"])


def test_exploratory_compact_tables():
    claims = claims_frame()
    over = summary.exploratory_overview(claims, "C1")
    assert list(over.columns) == ["10-100", "300-600"]  # ascending t
    assert over.loc[fx.LAYERS[16], "10-100"] == "-3.0 % (0↑ 1↓ of 1)"
    assert over.loc[fx.LAYERS[16], "300-600"] == "+10.0 % (1↑ 0↓ of 2)"  # median of 8 and 12
    rows = summary.exploratory_rows(claims, "C1")
    assert list(rows["effect"]) == [12.0, 8.0, -3.0] and {"psi", "t"} <= set(rows.columns)
    assert "layer" not in rows.columns  # constant columns are left out
    assert summary.exploratory_overview(claims, "B1").empty
    html = report_html.exploratory(claims)
    assert html.count("<h4>") == 1 and 'class="dataframe sag-table sag-sortable"' in html and "<details" in html


def test_quality_deltas_and_summary():
    q, f, b = fx.quality(), fx.frontier(), fx.bench()
    d = summary.quality_deltas(q, b, f)
    assert set(d["guidance"]) == {"sag", "blur"} and len(d) == len(q) - 4  # the unguided rows are the reference
    r = d[(d["setting"] == "sag s=0.5") & (d["metric"] == "fd")].iloc[0]
    src = q[(q["guidance"] == "sag") & (q["scale"] == 0.5) & (q["metric"] == "fd")].iloc[0]
    assert r["delta"] == src["delta"] and r["delta_ci_low"] == src["delta_ci_low"] and r["differs"] == src["differs"]
    assert r["calls_per_image"] == 2.0 and r["time_vs_unguided"] == pytest.approx(2.4)  # bench: 0.024 / 0.010
    wide = summary.quality_summary(d)
    assert list(wide.index[:2]) == ["sag s=0", "sag s=0.25"] and wide.loc["sag s=0.5", "calls / image"] == "2"
    cell = wide.loc["sag s=1", "Δ Fréchet distance ↓"]
    assert cell.endswith("better") and cell.startswith("-")  # FD fell, and its paired CI excludes 0
    assert wide.loc["sag s=1", "Δ recall ↑"].endswith("worse")
    # without the quality table's calls: the frontier's "full" row of the same guidance and scale
    d2 = summary.quality_deltas(q.drop(columns="calls_per_image"), None, f)
    assert d2.loc[d2["scale"] == 0.75, "calls_per_image"].eq(2.0).all() and d2["time_vs_unguided"].isna().all()
    assert d2.loc[d2["scale"] == 0.5, "calls_per_image"].isna().all()
    assert summary.unguided_line(q).startswith("unguided (n = 64 seeds): Fréchet distance 20 [19, 21]")


def test_report_html_pieces(tmp_path):
    assert report_html.rel(tmp_path / "run" / "capture", tmp_path / "run") == "capture"
    assert report_html.rel(tmp_path / "sweep", tmp_path / "run") == "../sweep"
    html = report_html.claims_table(fx.claims())
    table = html.split("</table>")[0]
    assert 'id="sag-summary"' in table and table.count("<tr") == 3  # header + one row per claim
    assert "Primary scopes: B1: mid_block.attentions.0" in html
    page = report_html.quality(fx.quality(), fx.bench(), fx.frontier())
    assert "sag-sortable" in page and "unguided (n = 64 seeds)" in page


def test_captions_say_what_and_n():
    assert "n = 4 images" in captions.caption(fig_objects, fx.object_correlation())
    assert captions.caption(fig_cost, fx.bench()) == fig_cost.caption(fx.bench())  # the module's own wins
    assert "n = 4 seeds" in captions.attention_stats(fx.attention_timesteps())
    assert "n = 4 images" in captions.frequency(fx.frequency(), fx.frequency_surface())


def test_index_page_links_everything(tmp_path):
    run = fx.write_run(tmp_path / "run", names=["claims", "bench"])
    fx.write_run(run / "capture", names=["stats"])
    figs = run / "figures"
    figs.mkdir()
    for ext in ("png", "pdf", "csv"):
        (figs / f"quality.{ext}").write_bytes(b"x")
    (figs / "quality.caption.txt").write_text("Top: paired difference, n = 64 seeds.\n")
    (run / "report").mkdir()
    (run / "report" / "sag_report.html").write_text("<html></html>")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seeds: 0-39\nmodel: embedded\n")
    (run / "main.json").write_text('{"stages": {"capture": 24.3, "report": 28.6}}')
    page = write_index(run)
    assert page == run / "index.html"
    html = page.read_text()
    links = re.findall(r'href="([^"]+)"', html)
    for want in ["report/sag_report.html", "figures/quality.png", "figures/quality.pdf", "figures/quality.csv",
                 "tables/claims.parquet", "tables/bench.parquet", "capture/tables/stats.parquet",
                 ".hydra/config.yaml", "main.json"]:
        assert want in links
    assert all(not Path(link).is_absolute() and (run / link).is_file() for link in links)  # relative, resolving
    assert "seeds: 0-39" in html and "n = 64 seeds" in html and "24 s" in html
    assert f"{len(fx.claims())} rows x" in html  # the parquet footer's size
    assert write_index(run).read_text() == html  # rewriting gives the same page (no index.html in Reports)
    with pytest.raises(SagConfigError, match="not a directory"):
        write_index(tmp_path / "absent")
