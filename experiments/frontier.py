"""The quality-cost frontier of SAG: guidance windows and every-k schedules at a fixed scale, on paired seeds.

    python -m experiments.frontier                                   # the embedded model, s from model_guidance
    python -m experiments.frontier scale=0.5 'windows=[[0,0.5],[0.5,1]]' 'every=[2,4]' kinds=[sag]
    python -m experiments.frontier debug=tiny model=tiny_pixel_cond seeds=0-7      # seconds

For each kind in ``kinds`` (sag, blur, sag_cfg) at ``scale`` (:func:`sag.sweep.frontier_settings`): the full
window, every window [start, stop) of ``windows`` (fractions of the trajectory, as Guidance's start/stop) and
every-k schedules (``every``: guided on every k-th step, one plain call otherwise; sag.guidance.Window), next to
the unguided run (and CFG alone for sag_cfg). ``calls_per_image`` is counted with a forward hook on the network
(sag.guidance.base.CallCounter); the metrics are those of experiments.evaluate. Writes
``tables/frontier.parquet`` (column ``window``: "full", "window a-b", "every k"); the figure is drawn from it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from experiments.cli import entry_point
from experiments.common import run_inputs

SETTINGS_KEYS = ("kinds", "scale", "cfg_scale", "windows", "every", "family", "family_options", "cg_scale")


@entry_point("frontier")
def main(cfg: DictConfig) -> None:
    run_inputs(cfg)  # seeds, steps, batch size, size: refused before the heavy imports (run_sweep checks again)
    from experiments.sweeps import run_sweep  # heavy (torch, evaluators): after --help and config errors
    from sag.sweep import frontier_settings

    run_sweep(cfg, frontier_settings, SETTINGS_KEYS, "frontier", "frontier")


if __name__ == "__main__":
    main()
