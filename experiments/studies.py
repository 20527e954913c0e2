"""The paper's attention studies (Sec. 2: timesteps, Exp. B frequency, Exp. C objects) with statistics.

    python -m experiments.studies run_dir=outputs/capture/<stamp>     # analyse a capture run
    python -m experiments.studies seeds=0-63 steps=20                 # run_dir=null: capture first
    python -m experiments.studies run_dir=<run> studies=[timesteps,frequency]   # no Exp. C: its inputs are not read
    python -m experiments.studies run_dir=<run> correlation_modes=[samples] object_masks=files object_masks_dir=<dir>
                                                                      # Exp. C with your own masks (any model)
    python -m experiments.studies run_dir=<run> correlation_modes=[samples] object_masks=segmentation \
        object_masks_model=<local transformers segmentation folder>   # Exp. C with a segmentation model's masks

Writes ``<run_dir>/tables/{attention_timesteps,frequency,frequency_surface,object_correlation,stats,claims}``
(analysis.schemas) and prints where, with the capture and analysis wall times. The work is
:func:`analysis.driver.run_studies`; this script turns the config into its arguments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry_point
from experiments.common import capture_run, run_inputs, user_errors
from sag.errors import SagConfigError


def run_model(cfg: DictConfig, run_dir: Path):
    """The run's own model (run.json config) for the scenes probe; the studies config's when absent."""
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    model_cfg = (info.get("config") or {}).get("model") or cfg.model
    return instantiate(model_cfg, device=cfg.get("device", "cpu"))


def check_before_capture(cfg: DictConfig, run_dir: Path, studies, modes, masks) -> None:
    """What run_studies checks on a run, before capturing one: the model's domain (the model is built once more
    for it, only when Exp. C needs a helper of the embedded domain), one mask file per seed, and that a
    segmentation model loads."""
    from analysis.driver import check_sources
    from analysis.segmentation_masks import check_loads

    if "correlation" in studies and ("scenes" in modes or masks.needs_domain):
        check_sources(run_model(cfg, run_dir), studies, modes, masks)
    if "correlation" in studies and "samples" in modes and not masks.needs_domain:
        masks.check_seeds(run_inputs(cfg).seeds)
    if "correlation" in studies and "samples" in modes and masks.kind == "segmentation":
        check_loads(masks.segmentation)  # the segmentation model loads (it runs after the capture)


def exp_c_only(overrides: list[str]) -> list[str]:
    """The command-line overrides (Hydra's task overrides) of keys only Exp. C reads: object_masks*,
    correlation_modes and scenes.* (values an experiment overlay sets are defaults, not inputs: not listed)."""
    keys = [(o, o.lstrip("+~").split("=", 1)[0].split(".")[0]) for o in overrides]
    return [o for o, k in keys if k.startswith("object_masks") or k in ("correlation_modes", "scenes")]


def plain(node) -> dict:
    """A config section as a plain dict (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True)


@entry_point("studies")
def main(cfg: DictConfig) -> None:
    from analysis.driver import ClaimsSettings, ScenesSettings, check_studies, run_studies  # after --help/parsing
    from analysis.masks_source import ObjectMasks
    from analysis.segmentation_masks import config_keys as segmentation  # object_masks=segmentation
    from analysis.studies import Settings
    from analysis.tables import TableError, write_table
    from analysis.word_masks import config_keys as word_masks  # object_masks=cross_attention

    with user_errors():
        settings = Settings(**plain(cfg.analysis))
        studies, modes = check_studies(cfg.studies, cfg.correlation_modes)
        claims, exp_c = ClaimsSettings(**plain(cfg.claims)), "correlation" in studies
        if not exp_c and (given := exp_c_only(list(HydraConfig.get().overrides.task))):
            raise SagConfigError(f"{given[0]} is only used by the correlation study (Exp. C); add correlation to "
                                 "studies or drop it")
        scenes = ScenesSettings(**plain(cfg.scenes)) if exp_c else None  # read and checked only for Exp. C
        masks = ObjectMasks.parse(cfg.object_masks, cfg.object_masks_dir, segmentation(cfg),
                                  word_masks(cfg)) if exp_c else None
        if cfg.run_dir is None:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            check_before_capture(cfg, run_dir, studies, modes, masks)
            capture_run(cfg, run_dir)
        else:
            run_dir = Path(cfg.run_dir)
            if not run_dir.is_dir():
                raise SagConfigError(f"run_dir={cfg.run_dir!r} is not a directory; accepted: a capture run dir")
        try:
            result = run_studies(run_dir, settings, studies=studies, modes=modes, scenes=scenes, claims=claims,
                                 model=lambda: run_model(cfg, run_dir), object_masks=masks)
        except TableError as e:
            raise SagConfigError(str(e)) from None
    for name, df in result.tables.items():
        print(f"{name}: {write_table(df, run_dir, name)} ({len(df)} rows)")
    for line in result.timing_lines():
        print(line)
    print(f"tables: {run_dir / 'tables'}")


def own_dir_inside(argv: list[str]) -> list[str]:
    """``argv`` plus ``hydra.run.dir=<run_dir>/studies`` when it analyses an existing run (``run_dir=<dir>``) and
    names no run dir of its own: the job's config and log then go inside the analysed run, as the main job sets
    them, and nothing is created in the current directory (Hydra would make ``outputs/studies/<time>/``)."""
    given = {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in argv[1:] if "=" in a}
    if given.get("run_dir") in (None, "null", "") or "hydra.run.dir" in given or "--multirun" in argv or "-m" in argv:
        return argv
    return [argv[0], f"hydra.run.dir={Path(given['run_dir']) / 'studies'}", *argv[1:]]  # before any --flag


if __name__ == "__main__":
    sys.argv = own_dir_inside(sys.argv)
    main()
