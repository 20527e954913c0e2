"""Train the class-conditional diffusion model on the embedded scenes (logic in sag.training).

    python -m experiments.train out_dir=outputs/train_embedded threads=1 train.max_minutes=120

Rerunning the same command resumes from ``<out_dir>/checkpoints/last.pt``. Writes ``loss.csv``,
``checkpoints/last.pt`` and ``export/`` (EMA weights as a local diffusers directory) into ``out_dir``.
"""

from __future__ import annotations

import json

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry_point
from experiments.common import user_errors


@entry_point("train")
def main(cfg: DictConfig) -> None:
    out = HydraConfig.get().runtime.output_dir  # = out_dir, resolved once at startup
    from sag.training import train  # torch, diffusers: after --help and config errors

    with user_errors():
        summary = train(OmegaConf.to_container(cfg, resolve=True), out)  # sag takes plain dicts
    print(json.dumps(summary, indent=2))
    print(f"wrote: {out} (loss.csv, checkpoints/last.pt, export/)")


if __name__ == "__main__":
    main()
