"""Each figure builds from a small tidy frame (tests/fixtures_report.py) and plots the expected series."""

from __future__ import annotations

import fixtures_report as fx
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.lines import Line2D

from analysis.figures import (
    fig_attention_stats,
    fig_cost,
    fig_frequency,
    fig_masks,
    fig_objects,
    fig_qualitative,
    fig_quality,
    fig_timeline,
    save_figure,
)
from analysis.images import from_uint8
from analysis.tables import TableError
from sag.masks import high_frequency_mask


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def visible_axes(fig):
    return [ax for ax in fig.get_axes() if ax.get_visible() and ax.get_label() != "<colorbar>"]


def data_lines(ax):
    return [ln for ln in ax.get_lines() if isinstance(ln, Line2D) and len(ln.get_xdata()) > 1]


def test_frequency_curves_and_surface():
    freq, surf = fx.frequency(), fx.frequency_surface()
    d = fig_frequency.data(freq, surf)
    curves = d[d["panel"] == "curve"]
    # 2 patch sizes x 4 series (masked 1.0, masked 1.3, unmasked 1.0, all) x their frequency bins
    bins = {8: 5, 16: 11}
    assert len(curves) == sum(4 * n for n in bins.values())
    assert set(curves["series"]) == {"masked (ψ=1.0)", "masked (ψ=1.3)", "unmasked (ψ=1.0)", "all patches"}
    assert (curves["n"] == len(fx.SEEDS)).all() and (curves["ci_low"] <= curves["mean"]).all()
    assert len(d[d["panel"] == "surface"]) == 2 * 16 * 16
    fig = fig_frequency.plot(freq, surf)
    axes = visible_axes(fig)
    curve_axes = [ax for ax in axes if ax.get_yscale() == "log"]
    assert len(curve_axes) == 2 and all(len(data_lines(ax)) == 4 for ax in curve_axes)
    assert all(sum(isinstance(c, PolyCollection) for c in ax.collections) == 4 for ax in curve_axes)
    assert sum(bool(ax.collections) and ax.get_yscale() == "linear" for ax in axes) == 2  # two heatmaps


def test_frequency_without_surface_and_validation():
    fig = fig_frequency.plot(fx.frequency())
    assert len([ax for ax in visible_axes(fig) if ax.get_yscale() == "log"]) == 2
    with pytest.raises(TableError):
        fig_frequency.data(fx.frequency().drop(columns="magnitude"))


def test_objects_bars_and_pct_diff():
    t = fx.object_correlation()
    d = fig_objects.data(t)
    iou = d[d["panel"] == "iou"]
    assert len(iou) == 2 * 2 * 2  # patch x psi x (attention, random)
    assert len(d[d["panel"] == "auroc"]) == 2 * 2 * 2  # patch x psi x (object, texture)
    att = iou[iou["measure"] == "iou_attention"].iloc[0]
    rnd = iou[(iou["measure"] == "iou_random") & (iou["patch"] == att["patch"]) & (iou["psi"] == att["psi"])].iloc[0]
    assert att["pct_diff"] == pytest.approx(100 * (att["mean"] - rnd["mean"]) / rnd["mean"])  # rel 1e-6: float64
    fig = fig_objects.plot(t)
    axes = visible_axes(fig)
    assert len(axes) == 4 and all(len(ax.patches) == 4 for ax in axes)  # 2 patch sizes x 2 bars


def test_attention_stats_bands_per_layer():
    t = fx.attention_timesteps()
    d = fig_attention_stats.data(t)
    assert list(dict.fromkeys(d["metric"])) == ["entropy_norm", "mask_area", "mask_iou_last"]
    assert len(d) == 3 * len(fx.LAYERS) * fx.STEPS
    fig = fig_attention_stats.plot(t)
    axes = visible_axes(fig)
    assert len(axes) == 3 and all(len(data_lines(ax)) == len(fx.LAYERS) for ax in axes)


def _text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of non-empty texts (annotations, tick labels excluded) of one axes whose boxes intersect."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    bad = []
    for ax in fig.get_axes():
        texts = [t for t in ax.texts if t.get_visible() and t.get_text().strip()]
        boxes = [t.get_window_extent(r) for t in texts]
        bad += [(texts[i].get_text(), texts[j].get_text()) for i in range(len(boxes)) for j in range(i)
                if boxes[i].overlaps(boxes[j])]
    return bad


def test_quality_delta_panels_and_frontier():
    q, f = fx.quality(), fx.frontier()
    d = fig_quality.data(q, f)
    assert len(d[d["panel"] == "quality"]) == len(q)
    front = d[(d["panel"] == "frontier")]
    assert len(front) == len(f) and front["pareto"].any()
    fig = fig_quality.plot(q, f)
    axes = visible_axes(fig)
    assert len(axes) == 5  # 4 metrics + frontier
    for ax, metric in zip(axes[:4], ["fd", "precision", "recall", "class_accuracy"]):
        lines = data_lines(ax)  # the zero line (unguided) + sag + blur
        assert len(lines) == 3 and list(lines[0].get_ydata()) == [0, 0]
        sag = q[(q.guidance == "sag") & (q.metric == metric)].sort_values("scale")
        assert np.allclose(lines[1].get_ydata(), sag["delta"])  # the deltas are plotted, not absolute values
        assert "unguided" in ax.get_xlabel() and "n=64" in ax.get_xlabel()
    assert len(visible_axes(fig_quality.plot(q))) == 4 and len(visible_axes(fig_quality.plot(None, f))) == 1
    with pytest.raises(ValueError):
        fig_quality.data(None, None)


def test_frontier_names_points_in_a_legend_without_overlap():
    """Issue 22: "window 0-0.5" and "every 2" land on the same (calls, value); they are legend entries (no text
    labels on the axes) and their markers are dodged apart."""
    f = fx.frontier()
    fig = fig_quality.plot(None, f)
    (ax,) = visible_axes(fig)
    assert not ax.texts and not _text_overlaps(fig)
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert len(labels) == len(set(labels)) and {"sag · window 0.0-0.5", "sag · every 2"} <= set(labels)
    xs = {c.get_label(): c.lines[0].get_xdata()[0] for c in ax.containers}
    assert xs["sag · window 0.0-0.5"] != xs["sag · every 2"]
    assert "network evaluations per image" in ax.get_xlabel()


def test_quality_caption_says_what_n_and_how_to_read():
    text = fig_quality.caption(fx.quality(), fx.frontier())
    assert "n = 64 seeds" in text and "paired" in text and "excludes 0" in text
    assert "fd: 7 of 10 settings differ from unguided" in text and "fd: 8 of 8 settings" in text
    assert "Pareto" in fig_quality.caption(None, fx.frontier()) and "Frontier" not in fig_quality.caption(fx.quality())
    assert "ms per image" not in text and "ratio to the same run's unguided" in fig_cost.caption(fx.bench())


def test_frequency_single_bin_has_integer_ticks():
    """Issue 22: 2x2 px patches have one radial bin; its axis shows the bin 1, not 0.5 ... 1.5."""
    freq = fx.frequency()
    freq = freq[(freq["patch"] == 16) | (freq["freq"] == 1)]
    fig = fig_frequency.plot(freq)
    fig.canvas.draw()
    for ax in [ax for ax in visible_axes(fig) if ax.get_yscale() == "log"]:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    one = [ax for ax in visible_axes(fig) if ax.get_title(loc="left").startswith("(a)")][0]
    assert one.get_xlim() == (0.5, 1.5) and [t for t in one.get_xticks() if 0.5 <= t <= 1.5] == [1.0]


def test_pareto_front():
    f = pd.DataFrame({"calls_per_image": [1, 2, 2, 3], "value": [5.0, 4.0, 6.0, 4.5]})
    assert list(fig_quality.pareto(f, lower_is_better=True)["value"]) == [5.0, 4.0]


def test_cost_bars_with_ratio_labels():
    b = fx.bench()
    d = fig_cost.data(b)
    assert list(d["setting"]) == ["none", "sag", "blur", "cfg", "sag_cfg", "cg", "sag_cg"]
    fig = fig_cost.plot(b)
    ax, ax2 = visible_axes(fig)
    assert len(ax.patches) == len(b) and len(ax2.patches) == len(b)
    labels = [t.get_text() for t in ax.texts]
    assert "×2.40\n×1.20 CFG" in labels


def test_timeline_grid():
    seeds, steps = [0, 1], [0, 2, 4]
    panels = pd.DataFrame([(s, k, 900.0 - 200 * k, "up.0") for s in seeds for k in steps],
                          columns=["seed", "step", "t", "layer"])
    rng = np.random.default_rng(0)
    maps = {(s, k): rng.gamma(1.0, size=(4, 4)) for s in seeds for k in steps}
    x0 = {(s, k): rng.random((32, 32, 3)) for s in seeds for k in steps}
    images = {s: fx.random_image(s) for s in seeds}
    d = fig_timeline.data(panels, maps, psi=1.0)
    assert len(d) == 6 and d["mask_area"].between(0, 1).all()
    assert d.loc[0, "mask_area"] == pytest.approx((maps[(0, 0)] > 1.0).mean())  # rel 1e-6: the same 16-token mean
    fig = fig_timeline.plot(panels, images, x0, maps)
    assert len(fig.get_axes()) == 2 * len(seeds) * (1 + len(steps))
    assert all(ax.images for ax in fig.get_axes())  # no empty cell


def test_high_frequency_mask():
    def hf(image):  # (H, W, C) -> (H, W): figure 2 shows Exp. C's mask (sag.masks)
        return high_frequency_mask(image.transpose(2, 0, 1)[None])[0]

    flat = np.full((32, 32, 3), 0.5)
    assert not hf(flat).any()
    im = flat.copy()
    im[8:16, 8:16] = np.indices((8, 8)).sum(0)[..., None] % 2  # a checkerboard patch
    m = hf(im)
    assert m[8:16, 8:16].mean() > 0.8 and m[24:, 24:].sum() == 0
    images = {s: fx.random_image(s) for s in (0, 1)}
    want = high_frequency_mask(from_uint8(np.stack([images[0], images[1]])))  # as the studies load the PNGs
    got = fig_masks.high_frequency_masks(images)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


def test_masks_grid_and_ious():
    seeds = [0, 1, 2]
    images = {s: fx.random_image(s) for s in seeds}
    maps = {s: np.kron(np.eye(2), np.ones((2, 2))) * 2 for s in seeds}  # diagonal 16 px quadrants > 1
    objs = {s: fig_masks.upsample(maps[s] > 1, (32, 32)) for s in seeds}
    d = fig_masks.data(images, maps, objs)
    assert list(d["seed"]) == seeds and (d["iou_attention_object"] == 1.0).all()
    fig = fig_masks.plot(images, maps, objs)
    assert len(fig.get_axes()) == 4 * len(seeds)
    bare = fig_masks.plot(images, maps, note="no object masks")
    assert len(bare.get_axes()) == 3 * len(seeds)  # no object row without masks
    assert "no object masks" in bare.get_suptitle()


def test_qualitative_grid(tmp_path):
    seeds = [0, 1]
    imgs = {k: {s: fx.random_image(s + i) for s in seeds} for i, k in enumerate(["none", "sag", "blur"])}
    del imgs["blur"][1]
    d = fig_qualitative.data(imgs, seeds)
    assert len(d) == 6 and d["present"].sum() == 5
    assert (d[d["setting"] == "none"]["mad_vs_none"] == 0).all()
    fig = fig_qualitative.plot(imgs, seeds)
    assert len(fig.get_axes()) == 6 and sum(bool(ax.images) for ax in fig.get_axes()) == 5
    paths = save_figure(fig, d, tmp_path, "q")
    assert sorted(p.name for p in paths) == ["q.csv", "q.pdf", "q.png"]
    assert len(pd.read_csv(tmp_path / "q.csv")) == 6


def test_frequency_leaves_out_a_psi_without_surface():
    surf = fx.frequency_surface()
    high = surf["psi"] == surf["psi"].max()
    surf.loc[high, "pct_diff"] = float("nan")  # e.g. psi 1.3 masks no patch at the plotted step
    fig = fig_frequency.plot(fx.frequency(), surf)
    titles = [ax.get_title(loc="left") for ax in fig.get_axes()]
    assert sum("PD" in t for t in titles) == surf["psi"].nunique() - 1
