"""Sample seeds and record self-attention of the selected layers at every step.

    python -m experiments.capture model=tiny_pixel scheduler=euler steps=20 seeds=0-15 capture=default

Writes ``samples/`` (PNGs, model-space tensors, grid) and ``records/`` (see sag.records) into the Hydra
run dir, and ``run.json`` last.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.cli import entry_point
from experiments.common import capture_run


@entry_point("capture")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    manifest = capture_run(cfg, out)
    print(f"samples: {manifest['samples']}")
    print(f"records: {manifest['records']} ({manifest['record_rows']} rows)")
    print(f"run: {out / 'run.json'}")


if __name__ == "__main__":
    main()
