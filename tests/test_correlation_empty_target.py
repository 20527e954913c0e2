"""Exp. C with an image whose target mask is empty (no object of the chosen classes): no IoU, left out of n."""

import numpy as np
import pandas as pd

from analysis.correlation import correlate
from analysis.stats import stats_table


def scene(n: int, seed: int = 0):
    """Objects aligned to an 8x8 token grid of 32x32 images; received mass 3 on object tokens, 0.5 elsewhere."""
    rng = np.random.default_rng(seed)
    tok = rng.random((n, 8, 8)) < 0.3
    tok[:, 0, 0] = True
    received = np.where(tok, 3.0, 0.5) + 0.1 * rng.random((n, 8, 8))  # jitter: some IoU below 1, a spread
    return received / received.mean((1, 2), keepdims=True), tok.repeat(4, 1).repeat(4, 2)


def frame(received: np.ndarray, pix: np.ndarray) -> pd.DataFrame:
    return correlate(received, {"object": pix}, [1.0], draws=20).assign(
        seed=lambda d: d.image, layer="L", patch=4, mode="scenes", step=0, t=100.0)


def test_empty_target_has_no_iou_and_leaves_the_effect_unchanged():
    received, pix = scene(7)
    pix[6] = False  # image 6: no object; its attention mask is not empty (received mass is not uniform)
    base = frame(received[:6], pix[:6])
    df = frame(received, pix)
    last = df[df.image == 6].set_index("measure")["value"]
    assert last[["iou_attention", "iou_random", "iou_random_position", "auroc", "auroc_ring",
                 "pointbiserial_r"]].isna().all()
    assert last["mask_area"] > 0  # NaN because of the target, not of the attention mask
    # the other images' rows are unchanged: the random draws of image i do not depend on n (one C-order stream)
    pd.testing.assert_frame_equal(df[df.image < 6].reset_index(drop=True), base)
    cols = ["comparison", "psi", "n", "effect", "ci_low", "ci_high", "p"]
    with_empty, without = stats_table(None, df, n_boot=200), stats_table(None, base, n_boot=200)
    iou = with_empty.comparison.str.startswith("iou_")
    assert (with_empty[iou].n == 6).all() and (with_empty[iou].n_empty == 1).all()
    assert (without.n_empty == 0).all()
    # same 6 pairs, same cached resamples (resample_weights(6, ...)): identical numbers, no tolerance needed
    pd.testing.assert_frame_equal(with_empty[iou][cols].reset_index(drop=True),
                                  without[without.comparison.str.startswith("iou_")][cols].reset_index(drop=True))
