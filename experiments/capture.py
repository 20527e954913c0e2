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
from omegaconf import DictConfig, OmegaConf

from experiments.common import build_model, check_positive, class_labels, text_cond, user_errors
from sag.attention import select_layers
from sag.errors import SagConfigError
from sag.runs import run_sampling
from sag.seeds import format_seeds, parse_seeds
from sag.shards import parse_shard, shard_cond, shard_seeds


@hydra.main(version_base="1.3", config_path="../conf", config_name="capture")
def main(cfg: DictConfig) -> None:
    with user_errors():
        # 1. Validate everything cheap before any work starts.
        all_seeds = parse_seeds(cfg.seeds)
        shard = parse_shard(cfg.shard)
        seeds = shard_seeds(all_seeds, shard)
        steps = check_positive("steps", cfg.steps)
        batch_size = check_positive("batch_size", cfg.batch_size)
        size = tuple(cfg.size) if cfg.size is not None else None
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise SagConfigError(f"size={list(size)}; accepted: [H, W] with positive H, W, or null")
        spec = instantiate(cfg.capture, _convert_="all")
        # 2. Model, scheduler, and the layers the patterns select (fails here on a bad pattern).
        model = build_model(cfg)
        scheduler = instantiate(cfg.scheduler)(model)
        layers = select_layers(model.net, spec.layers, spec.include_cross)
        model.validate(size or model.sample_size)  # e.g. DiT needs square latents
        # per-seed labels/prompts are given for all seeds: build the condition for all, keep the shard's rows
        cond = (class_labels(cfg, model, all_seeds) if model.conditioning == "class"
                else text_cond(cfg, model, all_seeds))
        cond = shard_cond(cond, len(all_seeds), shard)
    out = Path(HydraConfig.get().runtime.output_dir)
    print(f"capturing {len(layers)} layer(s) of {model.name} over {steps} steps for {len(seeds)} seeds -> {out}")
    manifest = run_sampling(model, scheduler, out, steps=steps, seeds=seeds, capture=spec,
                           batch_size=batch_size, cond=cond, size=size, progress=cfg.progress,
                           meta={"layers": layers, "config": OmegaConf.to_container(cfg, resolve=True),
                                 "all_seeds": format_seeds(all_seeds), "shard": cfg.shard})
    print(f"samples: {manifest['samples']}")
    print(f"records: {manifest['records']} ({manifest['record_rows']} rows)")
    print(f"run: {out / 'run.json'}")


if __name__ == "__main__":
    main()
