"""Regenerate the figures of a run dir from its stored tables, images and records (never samples).

    python -m experiments.figures run_dir=outputs/studies/<run> capture_dir=outputs/capture/<run> \
        sweep_dir=outputs/sample-multirun/<run>

Writes ``<run_dir>/figures/<name>.png|pdf`` and ``<name>.csv`` (the plotted numbers); figures whose inputs
are absent are skipped with the reason. Runs no model: figure 2's object masks are the ones the studies stored
(``studies/sample_masks.npz``); without them it is drawn without the object row and a ``note`` line says so.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry_point
from sag.errors import SagConfigError


@entry_point("figures", save_config=False)
def main(cfg: DictConfig) -> None:
    """Build the figures of ``cfg.run_dir`` and print what was written, noted and skipped. Unknown figure names
    or formats and missing dirs are refused (exit 2) before anything is read."""
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise SagConfigError("run_dir is missing; accepted: run_dir=<a run dir with tables/> (and capture_dir=, "
                             "sweep_dir=)")
    for key in ("run_dir", "capture_dir", "sweep_dir"):
        if cfg[key] is not None and not Path(cfg[key]).is_dir():
            raise SagConfigError(f"{key}={cfg[key]!r} is not a directory; accepted: an existing run dir")
    from matplotlib.backend_bases import FigureCanvasBase

    from analysis.figures.build import build_figures, figure_names  # matplotlib, pandas: after the cheap checks

    only, formats = [str(n) for n in cfg.only], [str(f) for f in cfg.formats]
    if bad := [n for n in only if n not in figure_names()]:
        raise SagConfigError(f"only={bad}: no such figure; accepted: names from {figure_names()}, or [] for all")
    supported = sorted(FigureCanvasBase.get_supported_filetypes())  # what matplotlib's savefig writes
    if [f for f in formats if f not in supported]:
        raise SagConfigError(f"formats={formats}; accepted: a list of {supported}")
    options = OmegaConf.to_container(cfg.options, resolve=True) or {}
    result = build_figures(cfg.run_dir, capture_dir=cfg.capture_dir, sweep_dir=cfg.sweep_dir, out_dir=cfg.out_dir,
                           only=only, formats=tuple(formats), options=options)
    print(result.report())
    if folders := sorted({str(p.parent) for paths in result.written.values() for p in paths}):
        print(f"figures: {', '.join(folders)}")  # the report names files only: the folder they are in
    if not result.written:
        print(f"no figure written: no inputs found for any figure in {cfg.run_dir}")

if __name__ == "__main__":
    main()
