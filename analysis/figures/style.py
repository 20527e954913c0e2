"""One place for the look of every figure: seaborn theme, colour-blind palette, font sizes, layout.

Figure modules call :func:`apply_style` (idempotent) and create figures through :func:`new_figure`, so a
change here changes every figure. They also share :func:`mean_ci` (95 % t-interval over seeds) and
:func:`band` (mean line with a shaded CI).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window (safe before pyplot import)

import matplotlib.pyplot as plt  # noqa: E402  (re-exported for figure modules)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

PALETTE = "colorblind"
FONT_SCALE = 1.0
BASE_FONT = 10
PANEL_W = 3.6  # inches per panel column
PANEL_H = 3.0  # inches per panel row
IMAGE_CELL = 1.35  # inches per image cell in image grids
DPI = 150
DIVERGING = "RdBu_r"  # signed values centred at 0 (percentage differences)
MASK_COLOUR = (0.84, 0.15, 0.16)  # red overlays, as in the paper's mask figures

_applied = False


def apply_style() -> None:
    """Seaborn "whitegrid" theme, colour-blind palette, readable fonts (idempotent)."""
    global _applied
    if _applied:
        return
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=FONT_SCALE)
    plt.rcParams.update({
        "font.size": BASE_FONT, "axes.titlesize": BASE_FONT + 1, "axes.labelsize": BASE_FONT,
        "xtick.labelsize": BASE_FONT - 1, "ytick.labelsize": BASE_FONT - 1, "legend.fontsize": BASE_FONT - 1,
        "legend.title_fontsize": BASE_FONT - 1, "figure.titlesize": BASE_FONT + 2, "figure.dpi": DPI,
        "savefig.dpi": DPI, "savefig.bbox": "tight", "axes.titleweight": "bold", "pdf.fonttype": 42,
    })
    _applied = True


def colours(n: int) -> list:
    """``n`` colours of the colour-blind palette (cycled when n > 10)."""
    return sns.color_palette(PALETTE, max(n, 1))[:max(n, 1)] if n <= 10 else sns.color_palette("husl", n)


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float | None = None, height: float | None = None,
               squeeze: bool = False, **kw) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure sized per panel; ``axes`` is always a 2-D array unless ``squeeze``."""
    apply_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width or PANEL_W * ncols, height or PANEL_H * nrows),
                             squeeze=squeeze, layout="constrained", **kw)
    return fig, axes


def image_grid(nrows: int, ncols: int, *, cell: float = IMAGE_CELL,
               title_space: float = 0.5) -> tuple[Figure, np.ndarray]:
    """A grid of image cells without ticks or grid lines (2-D array of axes)."""
    fig, axes = new_figure(nrows, ncols, width=cell * ncols + 0.9, height=cell * nrows + title_space)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
        for s in ax.spines.values():
            s.set_visible(False)
    return fig, axes


def show_image(ax: Axes, image: np.ndarray) -> None:
    """(H, W), (H, W, 1) or (H, W, 3) image in [0, 1] or uint8, shown without interpolation."""
    im = np.asarray(image)
    if im.ndim == 3 and im.shape[-1] == 1:
        im = im[..., 0]
    if im.dtype != np.uint8:
        im = np.clip(im, 0, 1)
    ax.imshow(im, cmap="gray" if im.ndim == 2 else None, interpolation="nearest",
              vmin=0 if im.ndim == 2 and im.dtype != np.uint8 else None,
              vmax=1 if im.ndim == 2 and im.dtype != np.uint8 else None)


def overlay_mask(ax: Axes, image: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> None:
    """The image with ``mask`` (H, W bool, any resolution: nearest-upsampled) painted red."""
    show_image(ax, image)
    m = np.asarray(mask, dtype=bool)
    h, w = np.asarray(image).shape[:2]
    if m.shape != (h, w):
        m = np.kron(m, np.ones((h // m.shape[0], w // m.shape[1]), bool)) if h % m.shape[0] == 0 == w % m.shape[1] \
            else np.asarray(m[np.arange(h) * m.shape[0] // h][:, np.arange(w) * m.shape[1] // w])
    rgba = np.zeros((h, w, 4))
    rgba[..., :3] = MASK_COLOUR
    rgba[..., 3] = alpha * m
    ax.imshow(rgba, interpolation="nearest")


def mean_ci(df: pd.DataFrame, by: Sequence[str], value: str = "value", level: float = 0.95) -> pd.DataFrame:
    """Mean of ``value`` per group with a t-interval (over the rows of the group, e.g. seeds).

    Columns: ``by`` + mean, ci_low, ci_high, n. A group of one row has its mean as both CI ends.
    """
    g = df.groupby(list(by), sort=True, dropna=False)[value]
    out = g.agg(mean="mean", sd="std", n="count").reset_index()
    half = stats.t.ppf(0.5 + level / 2, np.maximum(out["n"] - 1, 1)) * out["sd"] / np.sqrt(out["n"])
    half = half.where(out["n"] > 1, 0.0).fillna(0.0)
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out.drop(columns="sd")[list(by) + ["mean", "ci_low", "ci_high", "n"]]


def band(ax: Axes, x, mean, low, high, *, label: str, colour, marker: str | None = "o", alpha: float = 0.2,
         linestyle: str = "-") -> None:
    """A mean line with a shaded CI band (one Line2D and one PolyCollection per series). A series of one point
    (e.g. a single frequency bin) also gets an error bar, since a band of zero width is invisible."""
    ax.plot(x, mean, marker=marker or ("o" if len(np.atleast_1d(x)) == 1 else None), markersize=3.5, color=colour,
            label=label, linestyle=linestyle, lw=1.6)
    ax.fill_between(x, low, high, color=colour, alpha=alpha, lw=0)
    if len(np.atleast_1d(x)) == 1:
        m, lo, hi = (float(np.asarray(v, dtype=float).ravel()[0]) for v in (mean, low, high))
        ax.errorbar(np.asarray(x, dtype=float).ravel(), [m], yerr=[[max(m - lo, 0.0)], [max(hi - m, 0.0)]],
                    fmt="none", ecolor=colour, capsize=3, lw=1.2)


def short_layer(name: str, width: int = 28) -> str:
    """A layer name short enough for a legend (keeps the tail, where the block index is)."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def empty_panel(ax: Axes, message: str) -> None:
    """Say why a panel has no data instead of leaving it blank."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=BASE_FONT - 1,
            color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def fmt_psi(psi: float) -> str:
    """1.0 -> "1.0", 1.25 -> "1.25" (the paper writes ψ=1.0, ψ=1.3)."""
    return f"{psi:.1f}" if round(psi, 1) == psi else f"{psi:g}"


def log_y(ax: Axes) -> None:
    """Log y axis with plain-number tick labels (20, 50, 100 rather than 2x10^1)."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def integer_x(ax: Axes) -> None:
    """Integer x ticks (frequency bins, sampler steps), also when the view holds a single integer
    (``min_n_ticks=1``: with the default 2, matplotlib falls back to fractional ticks 0.5 ... 1.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def bin_axis(ax: Axes, bins) -> None:
    """An x axis of integer bins: integer ticks and the range [min - 0.5, max + 0.5] (one bin: 0.5 to 1.5 with
    the single tick 1)."""
    b = np.asarray(bins, dtype=float)
    b = b[np.isfinite(b)]
    integer_x(ax)
    if b.size:
        ax.set_xlim(float(b.min()) - 0.5, float(b.max()) + 0.5)
