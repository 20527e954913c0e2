"""The run dir side of a Hydra job (:mod:`experiments.cli`): Hydra's ``.hydra/`` files written by the job when it
succeeds, and the removal of the empty run dir of a refused fresh run."""

from __future__ import annotations

from pathlib import Path


def save_hydra_config(out: Path, cfg) -> None:
    """Write Hydra's ``.hydra/{config,hydra,overrides}.yaml`` of the current job (``cfg``: the job's config) into
    ``out``, atomically: the files and content Hydra writes itself with ``hydra.output_subdir=.hydra``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from sag.io import atomic_write_text

    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        atomic_write_text(out / ".hydra" / name, OmegaConf.to_yaml(node))


def remove_if_fresh(out: Path, job_name: str) -> None:
    """Remove the run dir Hydra made for a refused job when it holds nothing (but an empty job log); a dir that
    holds a run (or anything else) is left as it was."""
    entries = list(out.iterdir()) if out.is_dir() else [out]
    if all(p.name == f"{job_name}.log" and p.is_file() and p.stat().st_size == 0 for p in entries):
        for p in entries:
            p.unlink(missing_ok=True)
        out.rmdir()
