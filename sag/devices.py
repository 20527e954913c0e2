"""Which device a job runs on: every GPU of a node, one job per GPU.

``device=auto`` spreads the jobs of a sweep or a sharded run over the CUDA devices this process sees:

* a Hydra multirun on one node (``hydra/launcher=local``, joblib): job ``n`` (Hydra's ``hydra.job.num``) gets
  ``cuda:<n mod G>``, G = the number of visible GPUs. With as many concurrent jobs as GPUs (``n_jobs=G`` and G
  shards) every job has its own GPU; with more jobs than GPUs, jobs ``n`` and ``n + G`` share one only when they
  overlap in time (a loky worker takes the next job as soon as its last one ends);
* Slurm: ``SLURM_LOCALID`` (the task's rank on its node; else ``SLURM_PROCID``) replaces the job number, so that
  ``srun --ntasks-per-node=G`` puts task k on GPU k. A job that Slurm gave one GPU (``gpus_per_node: 1``, the submitit
  launcher's default here) sees exactly that GPU as ``cuda:0``;
* no visible GPU: ``cpu``.

Indices are those of the visible devices: torch numbers the GPUs of ``CUDA_VISIBLE_DEVICES`` (which Slurm sets for
its allocation) from 0, so ``CUDA_VISIBLE_DEVICES=4,5,6,7`` with ``device=auto`` uses only those four. An explicit
device (``cpu``, ``cuda``, ``cuda:N``, ``mps``) is used as given, after checking that it exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from sag.errors import SagConfigError

ACCEPTED = "cpu, cuda, cuda:N, mps or auto (one job per visible GPU, else cpu)"
SLURM_RANKS = ("SLURM_LOCALID", "SLURM_PROCID")  # the node-local rank first


def job_slot(job_num: int | None, env: Mapping[str, str]) -> int:
    """The index that picks this job's GPU: Slurm's task rank (``SLURM_LOCALID``, else ``SLURM_PROCID``) when set,
    else Hydra's job number, else 0."""
    for key in SLURM_RANKS:
        value = env.get(key, "")
        if value.strip().isdigit():
            return int(value)
    return int(job_num) if job_num is not None else 0


def assign_device(spec: str, job_num: int | None = None, num_gpus: int | None = None,
                  env: Mapping[str, str] | None = None) -> str:
    """The device string for ``spec``; ``auto`` = ``cuda:<job_slot mod num_gpus>``, or ``cpu`` without GPUs.

    ``job_num``: Hydra's ``hydra.job.num`` in a multirun (None in a single run); ``num_gpus``: visible CUDA devices
    (default ``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``); ``env``: the environment (default
    ``os.environ``), read for Slurm's task rank. Refuses an unknown spec and a CUDA device that is not visible.
    """
    spec = str(spec).strip()
    if num_gpus is None:
        num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        if num_gpus == 0:
            return "cpu"
        return f"cuda:{job_slot(job_num, os.environ if env is None else env) % num_gpus}"
    if spec in ("cpu", "mps"):
        return spec
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise SagConfigError(f"device={spec!r}; accepted: {ACCEPTED}")
    index = int(match.group(1) or 0)
    if index >= num_gpus:
        seen = f"{num_gpus} CUDA device(s) are visible" if num_gpus else "no CUDA device is visible"
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise SagConfigError(f"device={spec!r} but {seen} (CUDA_VISIBLE_DEVICES={mask!r}); accepted: {ACCEPTED}")
    return spec


__all__ = ["ACCEPTED", "SLURM_RANKS", "assign_device", "job_slot"]
