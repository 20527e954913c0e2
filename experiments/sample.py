"""Guided sampling to per-seed images and a grid; the same seeds across guidance settings pair every comparison.

    python -m experiments.sample guidance=sag_cfg guidance.sag_scale=0.5 seeds=0-63
    python -m experiments.sample --multirun guidance=none,sag,blur,cfg,sag_cfg seeds=0-31
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.common import build_model, check_positive, class_labels, load_classifier, text_cond, user_errors
from sag.runs import run_sampling
from sag.seeds import format_seeds, parse_seeds
from sag.shards import parse_shard, shard_cond, shard_seeds


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        all_seeds = parse_seeds(cfg.seeds)
        shard = parse_shard(cfg.shard)
        seeds = shard_seeds(all_seeds, shard)
        steps = check_positive("steps", cfg.steps)
        batch_size = check_positive("batch_size", cfg.batch_size)
        model = build_model(cfg)
        scheduler = instantiate(cfg.scheduler)(model)
        kind = cfg.guidance.kind
        extra = {"classifier": load_classifier(cfg, model)} if kind in ("cg", "sag_cg") else {}
        guidance = instantiate(cfg.guidance, _convert_="all")(model, **extra)
        size = tuple(cfg.size) if cfg.size is not None else model.sample_size
        if hasattr(guidance, "validate"):
            guidance.validate(size)
        # per-seed labels/prompts are given for all seeds: build the condition for all, keep the shard's rows
        cond = (class_labels(cfg, model, all_seeds) if model.conditioning == "class"
                else text_cond(cfg, model, all_seeds))
        cond = shard_cond(cond, len(all_seeds), shard)
    out = Path(HydraConfig.get().runtime.output_dir)
    print(f"sampling {len(seeds)} seeds from {model.name} with guidance={kind} over {steps} steps -> {out}")
    manifest = run_sampling(model, scheduler, out, steps=steps, seeds=seeds, model_fn=guidance, batch_size=batch_size,
                            cond=cond, size=size, progress=cfg.progress,
                            meta={"guidance": OmegaConf.to_container(cfg.guidance, resolve=True),
                                  "config": OmegaConf.to_container(cfg, resolve=True),
                                  "all_seeds": format_seeds(all_seeds), "shard": cfg.shard})
    print(f"samples: {manifest['samples']} (grid: {Path(manifest['samples']) / 'grid.png'})")
    print(f"run: {out / 'run.json'}")


if __name__ == "__main__":
    main()
