"""The quality-cost frontier of SAG: guidance windows and every-k schedules at a fixed scale, on paired seeds.

    python -m experiments.frontier                                   # the embedded model, s from model_guidance
    python -m experiments.frontier scale=0.5 'windows=[[0,0.5],[0.5,1]]' 'every=[2,4]' kinds=[sag]
    python -m experiments.frontier debug=tiny model=tiny_pixel_cond seeds=0-7      # seconds

For each kind in ``kinds`` (sag, blur, sag_cfg) at ``scale``: the full schedule, every window [start, stop)
of ``windows`` (fractions of the trajectory, as Guidance's start/stop) and every-k schedules (``every``:
guided on every k-th step, one plain call otherwise; sag.guidance.Window), next to the unguided run (and
CFG alone for sag_cfg). ``calls_per_image`` is counted with a counting model (network evaluations per
image, with sag.guidance.base.CallCounter); the metrics are those of experiments.evaluate. Writes
``tables/frontier.parquet``; someone else draws the figure from it.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.common import user_errors
from experiments.evaluate import Setting, evaluate_settings, prepare
from sag.errors import SagConfigError

FRONTIER_KINDS = ("sag", "blur", "sag_cfg")


def frontier_settings(cfg: DictConfig, conditional: bool) -> list[Setting]:
    s, w = float(cfg.scale), float(cfg.cfg_scale)
    out = [Setting("none")]
    for kind in cfg.kinds:
        if kind not in FRONTIER_KINDS:
            raise SagConfigError(f"kinds has {kind!r}; accepted: {list(FRONTIER_KINDS)}")
        if kind == "sag_cfg" and not conditional:
            print("skipping sag_cfg: the model is unconditional")
            continue
        base = {"sag_scale": s, "cfg_scale": w if kind == "sag_cfg" else 0.0}
        if kind == "sag_cfg":
            out.append(Setting("cfg", w, cfg_scale=w))
        out.append(Setting(kind, s, **base))
        for window in cfg.windows:
            if len(window) != 2:
                raise SagConfigError(f"windows has {list(window)}; accepted: [start, stop] pairs of fractions")
            out.append(Setting(kind, s, start=float(window[0]), stop=float(window[1]), **base))
        for k in cfg.every:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise SagConfigError(f"every has {k!r}; accepted: positive integers")
            out.append(Setting(kind, s, every=k, **base))
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="frontier")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        prep = prepare(cfg)
        settings = frontier_settings(cfg, prep[1].conditioning == "class")
        print(f"frontier: {len(settings)} schedules x {len(prep[0].seeds)} paired seeds on {prep[1].name} "
              f"({prep[0].steps} steps) -> {out}")
        evaluate_settings(cfg, out, settings, prep, "frontier")


if __name__ == "__main__":
    main()
