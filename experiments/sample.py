"""Guided sampling to per-seed images and a grid; the same seeds across guidance settings pair every comparison.

    python -m experiments.sample guidance=sag_cfg guidance.sag_scale=0.5 seeds=0-63
    python -m experiments.sample --multirun guidance=none,sag,blur,cfg,sag_cfg seeds=0-31
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.cli import entry_point
from experiments.common import (
    build_model,
    build_scheduler,
    conditions,
    guidance_fn,
    plain,
    run_inputs,
    user_errors,
)


@entry_point("sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run = run_inputs(cfg)  # before the heavy imports below: a bad seed spec or steps answers at once
        from sag.guidance.base import as_guidance
        from sag.runs import run_sampling

        model = build_model(cfg)
        scheduler = build_scheduler(cfg, model)
        kind = cfg.guidance.kind
        guidance = guidance_fn(cfg, model)  # with the noise-aware classifier where the kind has a cg term
        as_guidance(guidance).validate(run.size or model.sample_size)
        cond = conditions(cfg, model, run)
    out = Path(HydraConfig.get().runtime.output_dir)
    print(f"sampling {len(run.seeds)} seeds from {model.name} with guidance={kind} over {run.steps} steps -> {out}")
    manifest = run_sampling(model, scheduler, out, steps=run.steps, seeds=run.seeds, model_fn=guidance,
                            batch_size=run.batch_size, cond=cond, size=run.size, progress=cfg.progress,
                            meta={"guidance": plain(cfg.guidance), **run.meta(plain(cfg))})
    print(f"samples: {manifest['samples']} (grid: {Path(manifest['samples']) / 'grid.png'})")
    print(f"run: {out / 'run.json'}")


if __name__ == "__main__":
    main()
