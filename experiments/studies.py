"""The paper's attention studies (Sec. 2: timesteps, Exp. B frequency, Exp. C objects) with statistics.

    python -m experiments.studies run_dir=outputs/capture/<stamp>     # analyse a capture run
    python -m experiments.studies seeds=0-63 steps=20                 # run_dir=null: capture first

Writes ``<run_dir>/tables/{attention_timesteps,frequency,frequency_surface,object_correlation,stats,claims}``
(analysis.schemas) and prints where, with the capture and analysis wall times. The work is
:func:`analysis.driver.run_studies`; this script turns the config into its arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from analysis.driver import ClaimsSettings, ScenesSettings, check_studies, run_studies
from analysis.studies import Settings
from analysis.tables import TableError, write_table
from experiments.common import capture_run, user_errors
from sag.errors import SagConfigError


def run_model(cfg: DictConfig, run_dir: Path):
    """The run's own model (run.json config) for the scenes probe; the studies config's when absent."""
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    model_cfg = (info.get("config") or {}).get("model") or cfg.model
    return instantiate(model_cfg, device=cfg.get("device", "cpu"))


def plain(node) -> dict:
    """A config section as a plain dict (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="studies")
def main(cfg: DictConfig) -> None:
    with user_errors():
        settings = Settings(**plain(cfg.analysis))
        studies, modes = check_studies(cfg.studies, cfg.correlation_modes)
        scenes, claims = ScenesSettings(**plain(cfg.scenes)), ClaimsSettings(**plain(cfg.claims))
        if cfg.run_dir is None:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            capture_run(cfg, run_dir)
        else:
            run_dir = Path(cfg.run_dir)
            if not run_dir.is_dir():
                raise SagConfigError(f"run_dir={cfg.run_dir!r} is not a directory; accepted: a capture run dir")
        try:
            result = run_studies(run_dir, settings, studies=studies, modes=modes, scenes=scenes, claims=claims,
                                 model=lambda: run_model(cfg, run_dir))
        except TableError as e:
            raise SagConfigError(str(e)) from None
    for name, df in result.tables.items():
        print(f"{name}: {write_table(df, run_dir, name)} ({len(df)} rows)")
    for line in result.timing_lines():
        print(line)


if __name__ == "__main__":
    main()
