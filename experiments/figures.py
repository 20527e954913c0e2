"""Regenerate the figures of a run dir from its stored tables, images and records (never samples).

    python -m experiments.figures run_dir=outputs/studies/<run> capture_dir=outputs/capture/<run> \
        sweep_dir=outputs/sample-multirun/<run>

Writes ``<run_dir>/figures/<name>.png|pdf`` and ``<name>.csv`` (the plotted numbers); figures whose inputs
are absent are skipped with the reason. Runs no model: figure 2's object masks are the ones the studies stored
(``studies/sample_masks.npz``); without them it is drawn without the object row and a ``note`` line says so.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from analysis.figures.build import build_figures


@hydra.main(version_base="1.3", config_path="../conf", config_name="figures")
def main(cfg: DictConfig) -> None:
    """Build the figures of ``cfg.run_dir`` and print what was written, noted and skipped."""
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise SystemExit("experiments.figures: give run_dir=<a run dir with tables/> (and capture_dir=, sweep_dir=)")
    for key in ("run_dir", "capture_dir", "sweep_dir"):
        if cfg[key] is not None and not Path(cfg[key]).is_dir():
            raise SystemExit(f"experiments.figures: {key}={cfg[key]} is not a directory")
    options = OmegaConf.to_container(cfg.options, resolve=True) or {}
    result = build_figures(cfg.run_dir, capture_dir=cfg.capture_dir, sweep_dir=cfg.sweep_dir, out_dir=cfg.out_dir,
                           only=list(cfg.only), formats=tuple(cfg.formats), options=options)
    print(result.report())
    if not result.written:
        print(f"no figure written: no inputs found for any figure in {cfg.run_dir}")


if __name__ == "__main__":
    main()
