"""The attention studies at real scale on this machine: an SD-1.5-sized random-weight UNet at a 64x64 latent (512 px
decoded images), capture -> studies (timesteps, Exp. B frequency, Exp. C correlation with mask files), with wall
time per phase and peak resident memory.

    python -m benchmarks.studies_scale [--latent 64] [--steps 2] [--seeds 2] [--threads N] [--out DIR]

The model: ``benchmarks.presets`` ``sd15`` (diffusers' default UNet2DConditionModel = the SD-1.5 UNet, 860M, seeded
random weights) plus a random AutoencoderKL with the SD-1.5 VAE architecture (``SD15_VAE``: factor 8, so a 64x64
latent decodes to 512x512), so the studies read decoded images through the VAE factor exactly as on the real
checkpoint. Layers, psi and patch sizes come from ``conf/experiment/paper_sd15.yaml`` (the paper's token grids
32/16/8 -> 16/32/64 px tokens); Exp. C uses seeded random object masks written as files (``object_masks=files``);
the analysis settings are conf/studies.yaml's (50 random draws, 2,000 bootstrap resamples). Peak memory is
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) after each phase (a running maximum); the load average
is printed because the machine may be shared. Prints one markdown table; writes nothing outside ``--out`` (default
a temporary directory, removed).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from analysis.driver import run_studies
from analysis.masks_source import ObjectMasks
from analysis.studies import Settings
from benchmarks.common import CONF_DIR
from benchmarks.presets import build_random_preset
from sag.capture import CaptureSpec
from sag.inputs import text_cond
from sag.runs import run_sampling
from sag.schedulers import make_scheduler

# runwayml/stable-diffusion-v1-5 vae/config.json (the entries that differ from diffusers' AutoencoderKL defaults)
SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": 512}
SD15_LATENT_SCALE = 0.18215  # the same config's scaling_factor


def peak_mib() -> float:
    """Peak resident memory of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sd15_with_vae(latent: int):
    """The random ``sd15`` preset at ``latent``^2 latents with a seeded random SD-1.5-architecture VAE decoder."""
    from diffusers import AutoencoderKL

    model = build_random_preset("sd15", torch.device("cpu"), latent)
    torch.manual_seed(1)
    vae = AutoencoderKL(**SD15_VAE)
    return dataclasses.replace(model, decoder=vae, latent_scale=SD15_LATENT_SCALE)


def write_masks(folder: Path, seeds: list[int], hw: tuple[int, int]) -> ObjectMasks:
    """Seeded random object masks (a random rectangle per seed) as ``<seed>.npz`` files of the decoded size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in seeds:
        m = np.zeros(hw, bool)
        y, x = rng.integers(0, hw[0] // 2), rng.integers(0, hw[1] // 2)
        m[y: y + hw[0] // 3, x: x + hw[1] // 3] = True
        np.savez(folder / f"{s}.npz", mask=m)
    return ObjectMasks.parse("files", str(folder))


def measure(out: Path, latent: int, steps: int, n_seeds: int) -> dict:
    """Build, capture, study; wall seconds and peak MiB after each phase, and the tables' token grids."""
    overlay = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / "paper_sd15.yaml"))
    studies_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "studies.yaml").analysis)
    seeds, row = list(range(n_seeds)), {}
    t0 = time.perf_counter()
    model = sd15_with_vae(latent)
    row["build_s"], row["build_mib"] = time.perf_counter() - t0, peak_mib()
    spec = CaptureSpec(layers=overlay["capture"]["layers"], reductions=["received", "row_entropy"], record_x0=False)
    t0 = time.perf_counter()
    run_sampling(model, make_scheduler(model, "ddim"), out / "run", steps=steps, seeds=seeds, capture=spec,
                 batch_size=n_seeds, cond=text_cond(model, seeds), progress=False)
    row["capture_s"], row["capture_mib"] = time.perf_counter() - t0, peak_mib()
    hw = (latent * 8, latent * 8)  # VAE factor 8
    analysis = {**studies_cfg, **{k: overlay["analysis"][k] for k in ("psis", "patch_sizes", "sources")},
                "steps": None, "progress": False}
    t0 = time.perf_counter()
    result = run_studies(out / "run", Settings(**analysis), modes=["samples"],
                         object_masks=write_masks(out / "masks", seeds, hw))
    row["studies_s"], row["studies_mib"] = time.perf_counter() - t0, peak_mib()
    row["phases"] = {k: round(v, 1) for k, v in result.times.items()}
    ts = result.tables["attention_timesteps"]
    row["grids"] = sorted(set(zip(ts.layer, ts.grid, ts.token_px)), key=lambda r: -r[2])
    row["rows"] = {k: len(v) for k, v in result.tables.items()}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="keep the run here (default: a temporary directory)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(Path(a.out or tmp), a.latent, a.steps, a.seeds)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"SD-1.5-sized random UNet + SD-1.5 VAE, latent {a.latent}x{a.latent} -> {a.latent * 8} px, {a.steps} DDIM "
          f"steps, {a.seeds} seeds, {torch.get_num_threads()} torch threads, load average {load} (1/5/15 min)")
    print("| phase | wall s | peak RSS MiB (running max) |\n|---|---|---|")
    for phase in ("build", "capture", "studies"):
        print(f"| {phase} | {r[phase + '_s']:.1f} | {r[phase + '_mib']:.0f} |")
    print(f"studies phases (s): {r['phases']}")
    print("layers (grid, token_px): " + "; ".join(f"{ly} {g} {px} px" for ly, g, px in r["grids"]))
    print(f"table rows: {r['rows']}")


if __name__ == "__main__":
    main()
