"""Merge the shard runs of one configuration (``shard=i/n`` jobs of a multirun) into one run dir.

    python -m experiments.sample --multirun seeds=0-63 shard=0/4,1/4,2/4,3/4 hydra.sweep.dir=outputs/sweep
    python -m experiments.merge runs=outputs/sweep out=outputs/merged

``runs`` is a sweep dir (every subdir holding a run, or an unfinished one, is a part) or a list of run dirs.
Refuses incomplete shards, mixed configurations and duplicate or missing seeds; writes ``run.json`` last.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig

from experiments.cli import entry_point
from experiments.common import user_errors
from sag.errors import SagConfigError


@entry_point("merge", save_config=False)
def main(cfg: DictConfig) -> None:
    from sag.shards import discover_runs, merge_runs  # numpy, pandas, PIL: after --help

    with user_errors():
        if cfg.out is None or not str(cfg.out).strip():
            raise SagConfigError(f"out={cfg.out!r}; accepted: a new or empty dir for the merged run")
        out = Path(str(cfg.out))
        if isinstance(cfg.runs, ListConfig | list | tuple):
            runs = [Path(str(r)) for r in cfg.runs]
        elif cfg.runs is not None and str(cfg.runs).strip():
            runs = discover_runs(str(cfg.runs), exclude=[out])
        else:
            raise SagConfigError(f"runs={cfg.runs!r}; accepted: a sweep dir or a list of run dirs")
        seeds = None if cfg.seeds is None else str(cfg.seeds)
        done_before = (out / "run.json").is_file()  # merge_runs returns such a dir only if it holds this merge
        manifest = merge_runs(runs, out, seeds=seeds)
    if not done_before:  # else merge_runs said "already merged, nothing to do"
        print(f"merged {len(runs)} run(s), seeds {manifest['seeds']} -> {out}")
    print(f"samples: {manifest['samples']}")
    if manifest.get("records"):
        print(f"records: {manifest['records']} ({manifest.get('record_rows')} rows)")
    print(f"run: {out / 'run.json'}")


if __name__ == "__main__":
    main()
