"""The claims layer (analysis.claims, analysis.findings) on synthetic per-image data with known answers: empty
masks left out, the position-matched baseline, primary / pooled / exploratory rows, the verdict check, power and
the findings paragraph. Everything is seeded; tolerances are float64 round-off unless a comment says otherwise."""

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.claims import PrimaryScope, claims_table, main, t_band_label, verdict
from analysis.correlation import correlate, ring_index
from analysis.driver import ClaimsSettings
from analysis.findings import BEGIN, END, check_claims, findings_markdown
from analysis.stats import images_for_power, stats_table
from analysis.tables import write_table
from sag.errors import SagConfigError

sys.path.insert(0, str(Path(__file__).parent))
import fixtures_report  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
LAYERS = ("mid_block.attentions.0", "up_blocks.1.attentions.0")


def scenes(n: int, seed: int, gain: float, grid: int = 8, size: int = 32):
    """n maps (grid x grid) whose object tokens receive ``gain`` x more mass, objects off the border."""
    rng = np.random.default_rng(seed)
    tok = rng.random((n, grid, grid)) < 0.3
    tok[:, [0, -1], :] = tok[:, :, [0, -1]] = False  # objects never touch the border (the scene generator's habit)
    tok[:, 3, 3] = True
    received = np.where(tok, gain, 1.0) * (1 + 0.3 * rng.random((n, grid, grid)))
    return received / received.mean((1, 2), keepdims=True), tok.repeat(size // grid, 1).repeat(size // grid, 2)


def corr_rows(n: int = 16) -> pd.DataFrame:
    """object_correlation-like rows: two layers x two t, scenes mode, object and texture targets."""
    parts = []
    for k, layer in enumerate(LAYERS):
        for step, t in enumerate((100.0, 500.0)):
            received, obj = scenes(n, seed=10 * k + step, gain=1.25 if layer == LAYERS[0] else 0.8)
            tex = np.random.default_rng(99).random(obj.shape) < 0.5
            df = correlate(received, {"object": obj, "texture": tex}, [1.0, 1.3], draws=10, seed=0)
            parts.append(df.assign(seed=df.image, layer=layer, patch=4, mode="scenes", step=step, t=t))
    return pd.concat(parts, ignore_index=True).drop(columns="image")


@pytest.fixture(scope="module")
def judged():
    corr = corr_rows()
    stats = stats_table(None, corr, n_boot=200)
    claims = claims_table(stats, None, corr, primary=PrimaryScope(layer="mid_block.*"), n_boot=200,
                          t_band_edges=[0, 10, 100, 300, 600, 1000])
    return corr, stats, claims


def test_empty_masks_are_left_out_and_counted():
    """The audit's reproduction: 63 of 64 maps have no token above 1.3 x mean; they used to count as (0, 0)
    pairs (n = 64, a degenerate CI); now they are NaN, n = 1 and n_empty = 63."""
    rng = np.random.default_rng(0)
    received = 1 + 0.2 * rng.random((64, 8, 8))  # max / mean < 1.2: empty at psi 1.3, not at psi 1.0
    received[0, 2, 2] = 20.0
    obj = np.zeros((64, 32, 32), bool)
    obj[:, 8:16, 8:16] = True
    df = correlate(received, {"object": obj}, [1.0, 1.3], draws=10).assign(seed=lambda d: d.image, layer="L",
                                                                          patch=4, mode="scenes", step=0, t=100.0)
    at = df[(df.psi == 1.3)].pivot(index="seed", columns="measure", values="value")
    assert at["iou_attention"].isna().sum() == 63 and at["iou_random"].isna().sum() == 63
    assert at["iou_random_position"].isna().sum() == 63 and (at["mask_area"].iloc[1:] == 0).all()
    stats = stats_table(None, df, n_boot=100)
    row = stats[(stats.comparison == "iou_attention_vs_random") & (stats.psi == 1.3) & (stats.target == "object")]
    assert row.n.item() == 1 and row.n_empty.item() == 63
    assert (stats[stats.psi == 1.0].n_empty == 0).all()


def test_position_only_attention_is_inverted_against_count_matched_and_null_against_position_matched():
    """Attention that depends on the ring alone (border tokens high) with objects off the border: the
    count-matched baseline calls it 'avoids objects'; the within-ring baseline and AUROC see no effect."""
    ring = ring_index(8, 8).reshape(8, 8)
    received = np.broadcast_to(np.where(ring == 0, 2.0, 0.5), (12, 8, 8))
    _, obj = scenes(12, seed=1, gain=1.0)
    df = correlate(received, {"object": obj}, [1.0], draws=10).pivot(index="image", columns="measure",
                                                                     values="value")
    assert (df["iou_attention"] == 0).all() and (df["iou_random"] > 0).all()
    np.testing.assert_array_equal(df["iou_random_position"], df["iou_attention"])  # ring 0 permuted in ring 0
    assert (df["auroc"] < 0.5).all()
    np.testing.assert_allclose(df["auroc_ring"], 0.5)  # every same-ring pair ties: U = n1 n0 / 2 exactly


def test_claims_rows_scopes_and_check(judged, tmp_path, capsys):
    corr, stats, claims = judged
    prim = claims[claims.scope == "primary"].set_index("claim_id")
    m = prim.p.notna().sum()
    assert m == 3 and set(prim.index) == {"B1", "B2", "B3", "C1", "C2", "C3"}
    assert (prim.loc[["C1", "C2", "C3"], "layer"] == LAYERS[0]).all() and (prim.loc[["C1", "C2"], "t"] == 100).all()
    np.testing.assert_allclose(prim.loc["C1", "ci_level"], 1 - 0.05 / 3)  # Bonferroni level of 3 primaries
    assert prim.loc["C1", "verdict"] == "supported"
    assert prim.loc["C1", "comparison"] == "iou_attention_vs_random_position"
    assert np.isfinite(prim.loc["C1", "effect_uncontrolled"]) and prim.loc["B1", "verdict"] == "not shown"
    ex = claims[claims.scope == "exploratory"]
    assert (ex.verdict == "").all() and not ex.adjusted.any() and set(ex.t_band) == {"10-100", "300-600"}
    assert check_claims(stats, claims) == []
    bad = claims.copy()
    bad.loc[bad.scope == "primary", "verdict"] = "supported"
    bad.loc[bad.index[-1], "p"] = 0.123456
    lines = check_claims(stats, bad)
    wrong = (prim.verdict != "supported").sum()
    assert sum("the rule gives" in x for x in lines) == wrong >= 3 and any("0.123456" in x for x in lines)
    write_table(stats, tmp_path, "stats")
    write_table(claims, tmp_path, "claims")
    assert main(["--check", str(tmp_path)]) == 0 and "ok:" in capsys.readouterr().out
    write_table(bad, tmp_path, "claims")
    assert main(["--check", str(tmp_path)]) == 1
    write_table(claims, tmp_path, "claims")
    assert main(["--findings", str(tmp_path)]) == 0 and "**C1**" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold numbers\n{END}\nrest\n")
    assert main(["--findings", str(tmp_path), "--readme", str(readme)]) == 0
    assert readme.read_text() == f"intro\n{BEGIN}\n{findings_markdown(claims)}\n{END}\nrest\n"


def test_pooled_row_is_one_image_level_statistic(judged):
    corr, _, claims = judged
    pooled = claims[(claims.scope == "pooled") & (claims.claim_id == "C1")].iloc[0]
    assert pooled.n == 16 and "2 layers" in pooled.pooled_over and "2 t" in pooled.pooled_over
    sel = corr[(corr.target == "object") & (corr.psi == 1.0)]
    wide = sel.pivot_table(index=["seed", "layer", "t"], columns="measure", values="value", observed=True)
    per_image = wide[["iou_attention", "iou_random_position"]].dropna().groupby("seed").mean()
    a, b = per_image["iou_attention"].mean(), per_image["iou_random_position"].mean()
    assert pooled.effect == pytest.approx(100 * (a - b) / b)  # the mean of per-image averages, one row
    assert pooled.verdict == "" and pooled.ci_level == 0.95


def test_primary_scope_settings_refuse_bad_input():
    assert PrimaryScope(layer="mid_block.*").resolve_layer(LAYERS) == LAYERS[0]
    with pytest.raises(SagConfigError, match="matches"):
        PrimaryScope(layer="*attentions*").resolve_layer(LAYERS)
    with pytest.raises(SagConfigError, match="t_band"):
        PrimaryScope(layer="x", t_band=(500, 100))
    with pytest.raises(SagConfigError, match="mode"):
        PrimaryScope(layer="x", mode="photos")
    s = ClaimsSettings(primary={"layer": "mid_block.*", "t_band": [0, 50]}, t_band_edges=[0, 10, 100])
    assert s.primary.t_band == (0.0, 50.0)
    with pytest.raises(SagConfigError, match="claims.primary keys"):
        ClaimsSettings(primary={"layer": "x", "step": "last"})
    with pytest.raises(SagConfigError, match="t_band_edges"):
        ClaimsSettings(primary={"layer": "x"}, t_band_edges=[0, 100, 50])


def test_power_and_bands_known_answers():
    # n = ((z_0.975 + z_0.8) sd / effect)^2 = (2.8016 * 2)^2 = 31.4 -> 32 (normal approximation)
    assert images_for_power(0.5, 1.0, 0.05) == 32
    assert np.isnan(images_for_power(0.0, 1.0, 0.05)) and np.isnan(images_for_power(0.5, np.nan, 0.05))
    edges = [0, 10, 100, 1000]
    assert [t_band_label(t, edges) for t in (0, 10, 10.5, 100, 999, 1001)] == ["0-10", "0-10", "10-100", "10-100",
                                                                              "100-1000", ""]
    assert verdict(0.1, 0.2, 0.01, 3, 0.05, 1) == "supported"


def test_findings_paragraph_from_a_table_and_in_the_readme():
    text = findings_markdown(fixtures_report.claims())
    assert "**B1**" in text and "**supported**" in text and "**not shown**" in text
    assert "without the position control -5.0 %" in text and "1 left out: empty attention mask" in text
    readme = README.read_text()
    block = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), readme, re.S)
    assert block and block.group(1).startswith("Primary scopes fixed in conf/studies.yaml")
