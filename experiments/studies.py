"""The paper's attention studies (Sec. 2: timesteps, Exp. B frequency, Exp. C objects) with statistics.

    python -m experiments.studies run_dir=outputs/capture/<stamp>     # analyse a capture run
    python -m experiments.studies seeds=0-63 steps=20                 # run_dir=null: capture first

Writes ``<run_dir>/tables/{attention_timesteps,frequency,frequency_surface,object_correlation,stats,claims}``
(analysis.schemas) and prints where, with the capture and analysis wall times.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from analysis.claims import claims_table
from analysis.correlation import highfreq_masks
from analysis.stats import stats_table
from analysis.studies import (
    MODES,
    RecordArrays,
    Settings,
    load_images,
    open_records,
    run_meta,
    scene_targets,
    study_correlation,
    study_frequency,
    study_timesteps,
)
from analysis.tables import TableError, write_table
from experiments.common import capture_run, user_errors
from sag.errors import SagConfigError
from sag.probe import MASKS_FILE, probe_scenes, write_sample_masks

STUDIES = ("timesteps", "frequency", "correlation")


def run_model(cfg: DictConfig, run_dir: Path):
    """The run's own model (run.json config) for the scenes probe; the studies config's when absent."""
    import json

    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    model_cfg = (info.get("config") or {}).get("model") or cfg.model
    return instantiate(model_cfg, device=cfg.get("device", "cpu"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="studies")
def main(cfg: DictConfig) -> None:
    with user_errors():
        settings = Settings(**OmegaConf.to_container(cfg.analysis, resolve=True))
        studies, modes = list(cfg.studies), list(cfg.correlation_modes)
        if bad := [s for s in studies if s not in STUDIES] + [m for m in modes if m not in MODES]:
            raise SagConfigError(f"studies/correlation_modes {bad}; accepted: {list(STUDIES)} / {list(MODES)}")
        if cfg.run_dir is None:
            run_dir = Path(HydraConfig.get().runtime.output_dir)
            capture_run(cfg, run_dir)
        else:
            run_dir = Path(cfg.run_dir)
            if not run_dir.is_dir():
                raise SagConfigError(f"run_dir={cfg.run_dir!r} is not a directory; accepted: a capture run dir")
        try:
            tables, times = analyse(cfg, run_dir, settings, studies, modes)
        except TableError as e:
            raise SagConfigError(str(e)) from None
    for name, df in tables.items():
        print(f"{name}: {write_table(df, run_dir, name)} ({len(df)} rows)")
    run, model, capture_s = run_meta(run_dir)
    n_seeds, n_steps = times.pop("n_seeds"), times.pop("n_steps")
    detail = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
    print(f"capture of {n_seeds} samples x {n_steps} steps: "
          f"{f'{capture_s:.2f} s' if capture_s is not None else 'unknown'} (run.json wall_s)")
    print(f"analysis of those samples: {times['samples_analysis']:.2f} s; all timings: {detail}")


def analyse(cfg: DictConfig, run_dir: Path, settings: Settings, studies: list[str], modes: list[str]):
    """Every requested study on ``run_dir``; returns (tables, timings in s). ``samples_analysis`` is the time
    spent analysing the captured samples (records + images -> tables + their share of stats), excluding the
    model passes (segmenter, scenes probe) and the scenes-mode analysis, which are timed apart."""
    reader = open_records(run_dir / "records")
    records = RecordArrays(reader, reader.seeds)
    run, model, _ = run_meta(run_dir)
    tables: dict[str, pd.DataFrame] = {}
    times = {"n_seeds": len(reader.seeds), "n_steps": len(reader.steps)}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock
        clock = now

    if "timesteps" in studies:
        tables["attention_timesteps"] = study_timesteps(records, settings.psis, run, model)
    seeds, images = load_images(run_dir, reader.seeds)
    lap("timesteps")
    freq, parts = None, []
    if "frequency" in studies:
        freq, surface = study_frequency(records, images, settings, run, model)
        tables["frequency"], tables["frequency_surface"] = freq, surface
        lap("frequency")
    if "correlation" in studies and "samples" in modes:
        path = write_sample_masks(run_dir / "studies" / "sample_masks.npz", seeds, images)
        lap("segmenter")
        targets = {"object": np.load(path)["object_mask"], "highfreq": highfreq_masks(images)}
        parts.append(study_correlation(records, targets, "samples", settings, run, model, images.shape[-2:],
                                       settings.steps))
        lap("correlation_samples")
    kw = dict(test=settings.test, n_boot=settings.n_boot, seed=settings.seed)
    if freq is not None or parts:
        stats_samples = stats_table(freq, parts[0] if parts else None, **kw)
        lap("stats_samples")
    if "correlation" in studies and "scenes" in modes:
        out = run_dir / "studies" / "scenes"
        shutil.rmtree(out, ignore_errors=True)  # this command's own output; rewritten whole
        sc = cfg.scenes
        probe_scenes(run_model(cfg, run_dir), out, layers=reader.layers, ts=list(sc.t), data_seed=sc.data_seed,
                     count=sc.count, batch_size=sc.batch_size, noise_seed=sc.noise_seed)
        lap("scenes_probe")
        masks = dict(np.load(out / MASKS_FILE))
        scene_records = RecordArrays(open_records(out / "records"), [int(s) for s in masks["seeds"]])
        parts.append(study_correlation(scene_records, scene_targets(masks), "scenes", settings, run, model,
                                       masks["object_mask"].shape[-2:]))
        lap("correlation_scenes")
    if parts:
        tables["object_correlation"] = pd.concat(parts, ignore_index=True)
    if freq is not None or parts:
        # Holm needs every comparison of a family at once, so the final table is computed on all rows
        tables["stats"] = stats_table(freq, tables.get("object_correlation"), **kw) if "scenes" in modes else \
            stats_samples
        tables["claims"] = claims_table(tables["stats"], alpha=settings.alpha, min_n=int(cfg.claims.min_n),
                                        step=cfg.claims.step)
        lap("stats_claims")
    times["samples_analysis"] = sum(times.get(k, 0.0) for k in
                                    ("timesteps", "frequency", "correlation_samples", "stats_samples"))
    return tables, times


if __name__ == "__main__":
    main()
