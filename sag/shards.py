"""Seed sharding across jobs (``shard="i/n"``) and merging the shards' run dirs into one run dir.

Shard i of n gets a contiguous slice of the seed list; the slices are balanced (sizes differ by at most one,
the first ones get the extra seed) and every seed is in exactly one shard. More shards than seeds is a
:class:`~sag.errors.SagConfigError` for every shard index, so a sweep fails up front instead of leaving empty
runs behind.

:func:`merge_runs` joins complete shard runs into one run dir laid out like a single run: sample batches and
record shards (and the ``capture.word_maps`` files, :mod:`sag.word_maps`) are renumbered globally (part k's batch b
becomes batch ``offset_k + b``, where ``offset_k`` is the number of batches of the parts before it), so when the
batch size divides every shard the merged dir equals a single run of all seeds (samples, PNGs, grid, record tensors
and index, word maps) bit for bit, given the same device and thread count (others change float rounding, ~1e-5 on
this CPU). It refuses incomplete shards, shards of different configurations, and duplicate, missing or foreign seeds.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from sag.errors import SagConfigError
from sag.io import atomic_path, atomic_write_text
from sag.seeds import format_seeds, parse_seeds

if TYPE_CHECKING:  # sag.records / sag.runs load torch and diffusers: imported by the merge functions that use
    from sag.records import RecordReader  # them, so parsing a shard spec (sag.inputs) stays torch-free

ACCEPTED = "accepted: 'i/n' with integers 0 <= i < n (shard i of n), e.g. '0/4', or null for all seeds"
MERGING = ".merging"  # marker of an unfinished merge in the out dir; removed once run.json is written
# run.json fields that differ between shards of one configuration (compared after these are dropped)
PER_SHARD = {"seeds", "shard", "wall_s", "samples", "records", "record_rows", "resume_key", "merged_from",
             "shards", "status"}
_SHARD_RE = re.compile(r"^\s*([+-]?\d+)\s*/\s*([+-]?\d+)\s*$")
_BATCH_RE = re.compile(r"^batch-(\d+)\.safetensors$")


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)``; ``None`` (no sharding) -> ``None``.

    >>> parse_shard("1/4")
    (1, 4)
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise SagConfigError(f"shard={spec!r} is not valid; {ACCEPTED}")
    m = _SHARD_RE.match(spec)
    if not m:
        raise SagConfigError(f"shard={spec!r} is not of the form i/n; {ACCEPTED}")
    i, n = int(m.group(1)), int(m.group(2))
    if n <= 0:
        raise SagConfigError(f"shard={spec!r} asks for {n} shards; {ACCEPTED}")
    if not 0 <= i < n:
        raise SagConfigError(f"shard={spec!r}: index {i} is out of range for {n} shards; {ACCEPTED}")
    return i, n


def shard_bounds(num_seeds: int, shard: tuple[int, int]) -> tuple[int, int]:
    """``[start, stop)`` of shard ``(i, n)`` in a list of ``num_seeds`` seeds."""
    i, n = shard
    q, r = divmod(num_seeds, n)
    start = i * q + min(i, r)
    return start, start + q + (1 if i < r else 0)


def shard_seeds(seeds: Sequence[int], shard: tuple[int, int] | None) -> list[int]:
    """Shard ``(i, n)`` of ``seeds``: a contiguous, balanced slice in the original order (``None``: all seeds).

    More shards than seeds is refused (for every ``i``): an empty shard would be a run of nothing."""
    seeds = list(seeds)
    if shard is None:
        return seeds
    i, n = shard
    if not 0 <= i < n:
        raise SagConfigError(f"shard={i}/{n}: index {i} is out of range for {n} shards; {ACCEPTED}")
    if n > len(seeds):
        raise SagConfigError(f"shard={i}/{n}: {n} shards for {len(seeds)} seeds would leave shards empty; "
                             f"accepted: at most {len(seeds)} shards for these seeds")
    start, stop = shard_bounds(len(seeds), shard)
    return seeds[start:stop]


def shard_cond(cond, num_seeds: int, shard: tuple[int, int] | None):
    """The shard's rows of a per-seed condition (labels, prompt embeddings) built for all ``num_seeds`` seeds;
    a shared condition (one row, or ``None``) is returned as it is. Building the condition for all seeds and
    then slicing keeps per-seed ``labels``/``prompt`` lists meaning the same thing with and without shards."""
    if cond is None or shard is None or len(cond) != num_seeds:
        return cond
    start, stop = shard_bounds(num_seeds, shard)
    return cond[start:stop]


def discover_runs(path: str | Path, exclude: Sequence[str | Path] = ()) -> list[Path]:
    """The run dirs of a Hydra sweep dir: ``path`` itself if it holds ``run.json``, else its (non-hidden)
    subdirs that hold a run or the start of one (``run.json``, ``.hydra/``, ``samples/``, ``.state/``), so an
    unfinished job is reported as incomplete rather than silently missed. Merged runs are skipped."""
    from sag.runs import RUN_FILE, STATE_DIR

    root = Path(path)
    if not root.is_dir():
        raise SagConfigError(f"runs={str(root)!r}: not a directory; accepted: a sweep dir or a list of run dirs")
    if (root / RUN_FILE).is_file():
        return [root]
    skip = {Path(p).resolve() for p in exclude}
    found = [d for d in sorted(root.iterdir())
             if d.is_dir() and not d.name.startswith(".") and d.resolve() not in skip
             and any((d / m).exists() for m in (RUN_FILE, ".hydra", "samples", STATE_DIR))
             and "merged_from" not in (_read_manifest(d) or {})]  # an earlier merge is not a shard
    if not found:
        raise SagConfigError(f"runs={str(root)!r}: no run dirs in it; accepted: a sweep dir whose subdirs are "
                             "runs, or a list of run dirs")
    return found


def _read_manifest(run_dir: Path) -> dict | None:
    from sag.runs import RUN_FILE

    try:
        manifest = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("status") == "complete" else None


def _config_view(manifest: dict) -> dict:
    """The fields that must agree between shards of one configuration."""
    view = {k: v for k, v in manifest.items() if k not in PER_SHARD}
    sc = view.get("scheduler_config")
    if isinstance(sc, dict) and isinstance(sc.get("_use_default_values"), list):
        # diffusers builds this list from a set: its order follows the process's string-hash seed
        view["scheduler_config"] = dict(sc, _use_default_values=sorted(sc["_use_default_values"]))
    if isinstance(view.get("config"), dict):
        view["config"] = {k: v for k, v in view["config"].items() if k != "shard"}
    if isinstance(view.get("word_maps"), dict):  # capture.word_maps: the columns are per seed (merged), labels agree
        view["word_maps"] = view["word_maps"].get("labels")
    return view


def _batch_files(run_dir: Path) -> list[tuple[int, Path, list[int]]]:
    """(batch index, path, seeds) of every sample batch of a run, by batch index; indices must be 0..m-1."""
    from sag.runs import batch_seeds

    out = []
    for p in (run_dir / "samples").glob("batch-*.safetensors"):
        m = _BATCH_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p, batch_seeds(p)))
    out.sort(key=lambda b: b[0])
    if not out or [b[0] for b in out] != list(range(len(out))):
        raise SagConfigError(f"{run_dir / 'samples'}: sample batches {[b[0] for b in out]} are not 0..{len(out) - 1}; "
                             "the run is damaged")
    return out


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _merged_info(info: dict, seeds: list[int]) -> dict:
    """A shard's run info/manifest turned into the all-seeds run's."""
    info = dict(info, seeds=format_seeds(seeds))
    if "shard" in info:
        info["shard"] = None
    if isinstance(info.get("config"), dict) and "shard" in info["config"]:
        info["config"] = dict(info["config"], shard=None)
    if isinstance(info.get("resume_key"), str):  # the key run_sampling computes for all seeds in one run
        key = json.loads(info["resume_key"])
        key["seeds"] = info["seeds"]
        info["resume_key"] = json.dumps(key, sort_keys=True, default=str)
    return info


def _prepare_out(out: Path, sources: list[str]) -> dict | None:
    """The finished manifest if ``out`` already holds this merge; refuse an out dir holding anything else."""
    from sag.runs import RUN_FILE
    from sag.word_maps import WORD_MAPS_DIR

    manifest = _read_manifest(out) if (out / RUN_FILE).exists() else None
    if manifest is not None and manifest.get("merged_from") == sources:
        print(f"{out}: already merged, nothing to do")
        return manifest
    if (out / RUN_FILE).exists():
        raise SagConfigError(f"out={str(out)!r} holds another run (run.json); accepted: a new or empty dir")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MERGING).is_file():
            raise SagConfigError(f"out={str(out)!r} is not empty; accepted: a new or empty dir")
        for sub in ("samples", "records", "tables", WORD_MAPS_DIR):  # an interrupted merge: redo it from scratch
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MERGING, json.dumps(sources))
    return None


@dataclass
class _Plan:
    """The checked shard runs of one merge, in seed-spec order."""

    parts: list[Path]
    manifests: list[dict]
    batches: list[list[tuple[int, Path, list[int]]]]  # per part: (batch index, path, seeds)
    part_seeds: list[list[int]]
    all_seeds: list[int]
    readers: list[RecordReader]  # empty when the runs hold no records

    @property
    def sources(self) -> list[str]:
        return [str(p.resolve()) for p in self.parts]

    @property
    def offsets(self) -> list[int]:
        """Global batch index of each part's batch 0: the number of batches of the parts before it."""
        sizes = [len(b) for b in self.batches]
        return [sum(sizes[:k]) for k in range(len(sizes))]


def _check_dirs(parts: list[Path], out: Path) -> None:
    if not parts:
        raise SagConfigError("no run dirs to merge; accepted: a sweep dir or a list of run dirs")
    if len({p.resolve() for p in parts}) != len(parts):
        raise SagConfigError(f"run dirs {[str(p) for p in parts]} name a dir twice; accepted: distinct run dirs")
    if out.resolve() in {p.resolve() for p in parts}:
        raise SagConfigError(f"out={str(out)!r} is one of the runs to merge; accepted: a new dir")


def _check_manifests(parts: list[Path], seeds: str | None) -> tuple[list[dict], list[int]]:
    """Every part complete, all of one configuration, declaring one full seed spec: (manifests, all seeds)."""
    manifests = [_read_manifest(p) for p in parts]
    incomplete = [str(p) for p, m in zip(parts, manifests) if m is None]
    if incomplete:
        raise SagConfigError(f"incomplete shard run(s) {incomplete}: no run.json with status complete; rerun them "
                             "(they resume) before merging")
    base = _config_view(manifests[0])
    for p, m in zip(parts[1:], manifests[1:]):
        view = _config_view(m)
        diff = sorted(k for k in base.keys() | view.keys() if base.get(k) != view.get(k))
        if diff:
            if "config" in diff:
                c0, c1 = base.get("config") or {}, view.get("config") or {}
                diff += [f"config.{k}" for k in sorted(c0.keys() | c1.keys()) if c0.get(k) != c1.get(k)]
            raise SagConfigError(f"shard runs {str(parts[0])!r} and {str(p)!r} differ in configuration {diff}; "
                                 "accepted: shards of one configuration")
    spec = seeds if seeds is not None else manifests[0].get("all_seeds")
    if spec is None:
        raise SagConfigError(f"runs {[str(p) for p in parts]} do not record all_seeds (the full seed spec); pass "
                             "seeds= to merge them")
    return manifests, parse_seeds(spec)


def _check_seeds(parts: list[Path], manifests: list[dict], part_seeds: list[list[int]], all_seeds: list[int]) -> None:
    """Every seed of the spec in exactly one part, nothing else; each part's run.json agrees with its batches."""
    owner: dict[int, list[str]] = {}
    for p, ss in zip(parts, part_seeds):
        for s in ss:
            owner.setdefault(s, []).append(str(p))
    dup = {s: ds for s, ds in owner.items() if len(ds) > 1}
    if dup:
        dirs = sorted({d for ds in dup.values() for d in ds})
        raise SagConfigError(f"seeds {sorted(dup)[:10]} are in more than one shard run {dirs}; accepted: each seed "
                             "in exactly one shard")
    declared = set(all_seeds)
    missing = [s for s in all_seeds if s not in owner]
    if missing:
        raise SagConfigError(f"seeds {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)} of "
                             f"{format_seeds(all_seeds)!r}) are in none of the runs {[str(p) for p in parts]}; "
                             "accepted: shards covering every seed (a shard job failed or is left out?)")
    extra = sorted(s for s in owner if s not in declared)
    if extra:
        raise SagConfigError(f"seeds {extra[:10]} of runs {sorted({owner[s][0] for s in extra})} are not in the "
                             f"full seed spec {format_seeds(all_seeds)!r}; accepted: shards of that spec")
    for p, m, ss in zip(parts, manifests, part_seeds):
        if m.get("seeds") != format_seeds(ss):
            raise SagConfigError(f"{p}: run.json seeds {m.get('seeds')!r} but its sample batches hold "
                                 f"{format_seeds(ss)!r}; the run is damaged")


def _plan(parts: list[Path], seeds: str | None) -> _Plan:
    """Validate the shard runs and put them in the order their first seeds have in the full seed spec."""
    from sag.records import RecordReader

    manifests, all_seeds = _check_manifests(parts, seeds)
    batches = [_batch_files(p) for p in parts]
    part_seeds = [[s for _, _, bs in b for s in bs] for b in batches]
    _check_seeds(parts, manifests, part_seeds, all_seeds)
    pos = {s: k for k, s in enumerate(all_seeds)}
    order = sorted(range(len(parts)), key=lambda k: pos[part_seeds[k][0]])
    parts, manifests, batches, part_seeds = ([xs[k] for k in order] for xs in (parts, manifests, batches, part_seeds))
    readers = [RecordReader(p / "records") for p in parts] if manifests[0].get("records") is not None else []
    for p, r, ss in zip(parts, readers, part_seeds):
        if not r.complete or set(r.seeds) != set(ss):
            raise SagConfigError(f"{p / 'records'}: incomplete or holds other seeds than the run's samples")
    return _Plan(parts, manifests, batches, part_seeds, all_seeds, readers)


def _copy_samples(plan: _Plan, samples: Path) -> None:
    """PNGs as they are, batches renumbered, grid rebuilt from the PNGs in seed-spec order."""
    from sag.runs import batch_path, save_grid

    samples.mkdir(exist_ok=True)
    for p, bs, offset in zip(plan.parts, plan.batches, plan.offsets):
        for bi, path, bseeds in bs:
            _copy_atomic(path, batch_path(samples, offset + bi))
            for s in bseeds:
                _copy_atomic(p / "samples" / f"{s:06d}.png", samples / f"{s:06d}.png")
    ims = [np.asarray(Image.open(samples / f"{s:06d}.png")) for s in plan.all_seeds[:64]]
    save_grid(np.stack([im[..., None] if im.ndim == 2 else im for im in ims]), samples / "grid.png")


def _copy_records(plan: _Plan, rec: Path) -> int:
    """Record shards renumbered like the batches, merged index checked against the parts', meta.json; returns
    the number of index rows."""
    from sag.records import RecordsError, build_index, copy_shard

    (rec / "shards").mkdir(parents=True, exist_ok=True)
    expected = []
    for p, r, off in zip(plan.parts, plan.readers, plan.offsets):
        renamed = {name: copy_shard(p / "records" / "shards" / name, rec / "shards", off)
                   for name in r.index["shard"].unique()}
        ix = r.index.copy()
        ix["shard"] = ix["shard"].map(renamed)
        ix["batch_index"] = ix["batch_index"] + off
        expected.append(ix)
    index = build_index(rec)
    want = pd.concat(expected, ignore_index=True).sort_values(["shard", "key", "row"], kind="stable")
    got = index.sort_values(["shard", "key", "row"], kind="stable")
    try:
        pd.testing.assert_frame_equal(want[list(index.columns)].reset_index(drop=True),
                                      got.reset_index(drop=True), check_dtype=False, check_exact=True)
    except AssertionError as e:
        raise RecordsError(f"{rec}: merged index disagrees with the shard runs' indexes ({str(e).splitlines()[0]})"
                           "; merge aborted") from None
    _write_parquet(index, rec / "index.parquet")
    head = json.loads((plan.parts[0] / "records" / "meta.json").read_text())
    atomic_write_text(rec / "meta.json", json.dumps(_merged_info(head, plan.all_seeds), indent=2, default=str))
    return int(len(index))


def _concat_tables(plan: _Plan, out: Path) -> None:
    """Tables concatenated in part order; every part must have each table, with the same columns."""
    names = sorted({t.stem for p in plan.parts for t in (p / "tables").glob("*.parquet")})
    for name in names:
        lacking = [str(p) for p in plan.parts if not (p / "tables" / f"{name}.parquet").is_file()]
        if lacking:
            raise SagConfigError(f"table {name!r} is missing from runs {lacking}; accepted: the same tables in "
                                 "every shard run (run the stage on each, or remove it)")
        dfs = [pd.read_parquet(p / "tables" / f"{name}.parquet") for p in plan.parts]
        if any(list(d.columns) != list(dfs[0].columns) for d in dfs):
            raise SagConfigError(f"table {name!r} has different columns across runs {[str(p) for p in plan.parts]}")
        (out / "tables").mkdir(exist_ok=True)
        _write_parquet(pd.concat(dfs, ignore_index=True), out / "tables" / f"{name}.parquet")


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, seeds: str | None = None) -> dict:
    """Merge complete shard runs into ``out_dir``; returns the merged manifest (``run.json``, written last).

    ``seeds`` is the full seed spec the shards must cover; default: the ``all_seeds`` every shard recorded
    (the entry points store it). Parts are ordered by where their first seed falls in that spec."""
    from sag.runs import RUN_FILE

    parts, out = [Path(d) for d in run_dirs], Path(out_dir)
    _check_dirs(parts, out)
    plan = _plan(parts, seeds)
    done = _prepare_out(out, plan.sources)
    if done is not None:
        return done
    _copy_samples(plan, out / "samples")
    manifest = _merged_info(plan.manifests[0], plan.all_seeds)
    if manifest.get("word_maps"):  # capture.word_maps: the maps renumbered as the batches, the columns joined
        from sag.word_maps import copy_batches, merge_columns

        for p, bs, off in zip(plan.parts, plan.batches, plan.offsets):
            copy_batches(p, out, [(bi, ss) for bi, _, ss in bs], off)
        manifest["word_maps"] = merge_columns([m["word_maps"] for m in plan.manifests], plan.all_seeds)
    if plan.readers:
        manifest["record_rows"] = _copy_records(plan, out / "records")
    _concat_tables(plan, out)
    manifest.update(status="complete", wall_s=round(sum(float(m.get("wall_s") or 0) for m in plan.manifests), 3),
                    samples=str(out / "samples"), records=str(out / "records") if plan.readers else None,
                    merged_from=plan.sources, shards=[m.get("shard") for m in plan.manifests])
    atomic_write_text(out / RUN_FILE, json.dumps(manifest, indent=2, default=str))  # last: marks the merge complete
    (out / MERGING).unlink(missing_ok=True)
    return manifest
