"""Per-head reporting (issue 15): the ``received_heads`` reduction (sag.reductions) against the full probabilities,
and Exp. B / Exp. C per head (analysis.heads) as exploratory rows of the stats and claims tables."""

import re

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.claims import main as claims_main
from analysis.driver import ClaimsSettings, run_studies
from analysis.findings import check_claims, findings_markdown, scope_label
from analysis.heads import HEADS, head_grids, head_tables, probe_reductions
from analysis.masks_source import ObjectMasks
from analysis.schemas import HEAD_MEAN, validate
from analysis.stats import FAMILY, holm, stats_table
from analysis.studies import Settings
from analysis.tables import write_table
from sag.attention import attention_layers
from sag.capture import CaptureSpec, capture_attention
from sag.probe import probe_scenes
from sag.records import RecordArrays, RecordReader
from sag.runs import run_sampling
from sag.sampling import sample
from sag.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = [0, 1, 2]
# small and fast: one psi, both image sets, few random draws and bootstrap resamples (as tests/test_domains.py)
SETTINGS = Settings(psis=[1.0], sources=["final", "x0"], random_draws=3, n_boot=20, progress=False)
CLAIMS = ClaimsSettings(primary={"layer": "mid_block.*", "mode": "samples", "t_band": [0, 1000]},
                        t_band_edges=(0, 500, 1000))


def _steps(model, reductions, **kw) -> list[dict]:
    """{layer: {reduction: tensor}} of every step of a 3-step DDIM run of seeds 0, 1 (classes 1, 3)."""
    got = []
    with capture_attention(model.net, "*", reductions, **kw) as store:
        sample(model, make_scheduler(model, "ddim"), steps=3, seeds=[0, 1], cond=torch.tensor([1, 3]), progress=False,
               callback=lambda s: got.append({r.layer: r.data for r in store.pop()}))
    return got


def test_received_heads_is_the_per_head_sum_of_the_full_probabilities(tiny_pixel_cond):
    ref = _steps(tiny_pixel_cond, ["full", "received", "received_heads"])
    chunked = _steps(tiny_pixel_cond, ["received", "received_heads"], chunk_bytes=1 << 14)  # 1 query row per chunk
    fused = _steps(tiny_pixel_cond, ["received", "received_heads"], lse_maps=True)  # from the kernel's log-sum-exp
    layers = attention_layers(tiny_pixel_cond.net)
    assert len(ref) == 3 and all(set(step) == set(layers) for step in ref)  # every step, every self-attention layer
    for i, step in enumerate(ref):
        for layer, d in step.items():
            full, heads = d["full"], d["received_heads"]
            b, n_heads, q, k = full.shape
            assert heads.shape == (b, n_heads, *d["received"].shape[1:])
            # one chunk: the same sum over queries of the same tensor, bit for bit
            assert torch.equal(heads, full.sum(2).reshape(heads.shape))
            # linear in the probabilities: received (head mean, then the query sum) is the head mean of the per-head
            # maps; float32 reassociation of q <= 256 terms: q x eps32 (1.2e-7) x the largest value
            tol = q * 1.2e-7 * float(heads.abs().max())
            assert torch.allclose(heads.mean(1), d["received"], atol=tol, rtol=0)
            assert torch.allclose(heads.sum((-2, -1)), torch.full((b, n_heads), float(k)), rtol=1e-5)  # rows sum to 1
            for other in (chunked, fused):  # partial sums per chunk / the fused kernel's passes: the same bound
                assert torch.allclose(other[i][layer]["received_heads"], heads, atol=tol, rtol=0)


@pytest.fixture(scope="module")
def heads_run(tiny_pixel, tmp_path_factory):
    """A tiny_pixel capture with received_heads (3 seeds x 2 steps; a 16x16 and the 8x8 layer), user mask files,
    the studies on it."""
    root = tmp_path_factory.mktemp("heads")
    run, masks = root / "run", root / "masks"
    spec = CaptureSpec(layers=["down_blocks.*", "mid_block.*"], reductions=["received", "row_entropy", HEADS])
    run_sampling(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), run, steps=2, seeds=SEEDS, capture=spec,
                 batch_size=3, progress=False)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for s in SEEDS:  # object blobs on the 8x8 grid of 4-pixel tokens: every token all object or all background
        np.savez(masks / f"{s}.npz", mask=(rng.random((8, 8)) < 0.4).repeat(4, 0).repeat(4, 1))
    result = run_studies(run, SETTINGS, studies=["frequency", "correlation"], modes=["samples"], claims=CLAIMS,
                         object_masks=ObjectMasks.parse("files", str(masks)))
    for name, df in result.tables.items():
        write_table(df, run, name)
    return run, result.tables


def test_exp_b_and_c_per_head(heads_run, tiny_pixel):
    run, tables = heads_run
    reader = RecordReader(run / "records")
    n_heads = {n: m.heads for n, m in tiny_pixel.net.named_modules() if n in head_grids(reader)}
    assert set(n_heads) == {"down_blocks.1.attentions.0", "mid_block.attentions.0"} and set(n_heads.values()) == {4}
    fh, ch = validate(tables["frequency_heads"], "frequency_heads"), tables["object_correlation_heads"]
    for df, base in ((fh, tables["frequency"]), (ch, tables["object_correlation"])):
        assert {ly: sorted(g["head"].unique()) for ly, g in df.groupby("layer")} == {
            ly: list(range(h)) for ly, h in n_heads.items()}
        sizes = df.groupby(["layer", "head"]).size()  # every head: as many rows as the layer's head-mean study
        assert (sizes.to_numpy() == base.groupby("layer").size()[sizes.index.get_level_values("layer")]).all()
    # linear: the head mean of the stored per-head maps is the stored head-mean map (float32 records, 64 or 256
    # queries summed in two orders: q x eps32 x the largest value)
    arrays = RecordArrays(reader, SEEDS, reductions=("received", HEADS))
    for layer in n_heads:
        heads, mean = arrays.get(layer, HEADS, 1), arrays.get(layer, "received", 1)
        assert np.allclose(heads.mean(1), mean, atol=256 * 1.2e-7 * np.abs(heads).max(), rtol=0)
    # region "all" ignores the mask: every head's rows equal the head-mean rows (the same spectra, same arithmetic)
    keys = ["layer", "patch", "psi", "source", "step", "seed", "freq"]
    base_all = tables["frequency"].query("region == 'all'").set_index(keys)["magnitude"]
    for _, g in fh.query("region == 'all'").groupby("head"):
        got = g.set_index(keys)["magnitude"]
        assert np.allclose(got, base_all.reindex(got.index), rtol=1e-12, atol=0)
    # thresholded / ranked measures are not linear: only finite where the head-mean ones are
    assert np.isfinite(fh.query("region == 'masked'")["magnitude"]).mean() > 0.5
    auroc = ch[ch["measure"] == "auroc"]["value"]
    assert len(auroc) and np.isfinite(auroc).all() and auroc.between(0, 1).all()


def test_head_rows_are_exploratory_and_the_head_mean_rows_unchanged(heads_run):
    run, tables = heads_run
    stats, claims = tables["stats"], tables["claims"]
    assert set(stats["head"]) == {HEAD_MEAN, 0, 1, 2, 3}
    plain = stats_table(tables["frequency"], tables["object_correlation"], test=SETTINGS.test, n_boot=SETTINGS.n_boot,
                        seed=SETTINGS.seed)
    mean_rows = stats[stats["head"] == HEAD_MEAN].drop(columns=["head", "object_masks"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(mean_rows, plain)  # per-head rows leave every head-mean row (and its Holm p) as is
    for _, g in stats[stats["head"] >= 0].groupby(FAMILY):  # per-head rows: one Holm family over heads and layers
        assert np.allclose(g["p_holm"], holm(g["p"].to_numpy()), rtol=1e-12, equal_nan=True)  # the same products
    per_head = claims[claims["head"] >= 0]
    assert len(per_head) and set(per_head["scope"]) == {"exploratory"} and set(per_head["verdict"]) == {""}
    assert set(claims.loc[claims["scope"] != "exploratory", "head"]) == {HEAD_MEAN}  # primaries, pooled: head mean
    row = per_head.iloc[0]
    assert scope_label(row).endswith(f"head {int(row['head'])}")
    assert "head" not in scope_label(claims[claims["head"] == HEAD_MEAN].iloc[0])
    assert claims_main(["--check", str(run)]) == 0 and check_claims(stats, claims) == []
    text = findings_markdown(claims)  # the per-head scopes summed up apart from the (layer, t band) groups
    assert text.count("Per head (") == claims.loc[claims["head"] >= 0, "claim_id"].nunique()
    assert findings_markdown(claims[claims["head"] == HEAD_MEAN]) == re.sub(r" Per head \([^\n]*", "", text)
    # tables written before the head column: the check reads them as head-mean rows
    old = [t[t["head"] == HEAD_MEAN].drop(columns="head") for t in (stats, claims)]
    assert check_claims(*old) == []


def test_runs_without_heads_give_no_head_rows(tiny_pixel, tmp_path):
    run = tmp_path / "run"
    run_sampling(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), run, steps=1, seeds=[0, 1], batch_size=2,
                 capture=CaptureSpec(layers=["mid_block.*"]), progress=False)
    result = run_studies(run, Settings(psis=[1.0], sources=["final"], n_boot=20, progress=False),
                         studies=["frequency"])
    assert not {"frequency_heads", "object_correlation_heads"} & set(result.tables)
    assert set(result.tables["stats"]["head"]) == {HEAD_MEAN}


def test_scenes_mode_per_head(heads_run, tiny_pixel_cond, tmp_path):
    reader = RecordReader(heads_run[0] / "records")
    assert probe_reductions(reader) == ("received", HEADS)  # what analysis.driver.scene_correlation probes
    probe_scenes(tiny_pixel_cond, tmp_path / "studies" / "scenes", layers=reader.layers, ts=[100.0], count=3,
                 batch_size=3, reductions=probe_reductions(reader))
    tables = head_tables(tmp_path, reader, np.zeros((3, 3, 32, 32)), SETTINGS, "run", "tiny", ["correlation"],
                         ["scenes"])
    ch = tables["object_correlation_heads"]
    assert set(ch["mode"]) == {"scenes"} and set(ch["head"]) == {0, 1, 2, 3}
    assert set(ch["target"]) >= {"object", "texture"} and set(ch["seed"]) == {0, 1, 2}  # seed = scene index
