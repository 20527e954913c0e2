"""Sample seeds and record self-attention of the selected layers at every step.

    python -m experiments.capture model=tiny_pixel scheduler=euler steps=20 seeds=0-15 capture=default

Writes ``samples/`` (PNGs, model-space tensors, grid) and ``records/`` (see sag.records) into the Hydra
run dir, and ``run.json`` last.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from experiments.common import build_model, conditions, run_inputs, user_errors
from sag.attention import select_layers
from sag.runs import run_sampling


@hydra.main(version_base="1.3", config_path="../conf", config_name="capture")
def main(cfg: DictConfig) -> None:
    with user_errors():
        # 1. Validate everything cheap before any work starts.
        run = run_inputs(cfg)
        spec = instantiate(cfg.capture, _convert_="all")
        # 2. Model, scheduler, and the layers the patterns select (fails here on a bad pattern).
        model = build_model(cfg)
        scheduler = instantiate(cfg.scheduler)(model)
        layers = select_layers(model.net, spec.layers, spec.include_cross)
        model.validate(run.size or model.sample_size)  # e.g. DiT needs square latents
        cond = conditions(cfg, model, run)
    out = Path(HydraConfig.get().runtime.output_dir)
    print(f"capturing {len(layers)} layer(s) of {model.name} over {run.steps} steps "
          f"for {len(run.seeds)} seeds -> {out}")
    manifest = run_sampling(model, scheduler, out, steps=run.steps, seeds=run.seeds, capture=spec,
                            batch_size=run.batch_size, cond=cond, size=run.size, progress=cfg.progress,
                            meta={"layers": layers, **run.meta(cfg)})
    print(f"samples: {manifest['samples']}")
    print(f"records: {manifest['records']} ({manifest['record_rows']} rows)")
    print(f"run: {out / 'run.json'}")


if __name__ == "__main__":
    main()
