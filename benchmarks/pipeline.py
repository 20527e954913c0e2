"""Ours against diffusers' StableDiffusionSAGPipeline: same tiny Stable Diffusion, DDIM, prompts and seeds.

    python -m benchmarks.pipeline --out outputs/bench_cpu --device cpu --steps 20 --batch 4 --repeats 3

Both sides run on one tiny random SD-1.x-style model built offline (:mod:`sag.models.tiny_sd_pipeline`: CLIP
text encoder, UNet2DConditionModel on 16x16x4 latents, AutoencoderKL), sharing the very same UNet / VAE / text
encoder modules, the same DDIM scheduler config, the same prompts and the same per-image seeds. Settings:

- ``sag_cfg``: diffusers ``sag_scale=s, guidance_scale=1 + w`` against ours ``build_guidance(model, "sag_cfg",
  sag_scale=s, cfg_scale=w)`` (diffusers' g is 1 + w in our convention);
- ``sag``: diffusers ``sag_scale=s, guidance_scale=1.0`` (SAG alone) against ours ``"sag"``, sag_scale s.

s, w, the layer and the blur come from ``conf/model_guidance/tiny_sd.yaml`` (diffusers' pipeline defaults: s 0.75,
g 7.5 so w 6.5, the mid-block attn1, kernel 9, blur std 1.0). What is timed is the same work on
both sides: prompt encoding (the pipeline's ``encode_prompt``, with the empty prompt under CFG) + the DDIM
sampling loop from the initial noise to the final latents. VAE decoding is excluded from both (the pipeline
runs with ``output_type="latent"``; ours stops at latents).

The cases are interleaved in one process after one warm-up round (which also counts UNet rows with
``sag.guidance.CallCounter`` on the shared UNet and
records the final latents for the parity check), ``--repeats`` rounds, the order of ours / diffusers alternating
from round to round; medians. After each diffusers call the mid-block attn1 processor that the pipeline swaps in
(and leaves) is restored, so that ours never runs on the pipeline's processor.

Rows of ``<out>/tables/bench.parquet`` (appended): ``benchmark="pipeline"``, ``setting`` ``"ours sag_cfg"``,
``"diffusers sag_cfg"``, ``"ours sag"``, ``"diffusers sag"``. In these rows ``ratio_vs_none`` holds
ours / diffusers time for the same setting (1.0 on the diffusers rows; target <= 1.0x), repeated in the explicit
extra column ``ratio_vs_diffusers``, with its 95% bootstrap interval over the rounds in ``ratio_ci_low`` /
``ratio_ci_high`` (:func:`ratio_interval`; NaN for one round) and the round count in ``repeats``; ``ratio_vs_cfg`` is
NaN. ``unet_s_per_image``: the median time inside the shared UNet's forward calls (:class:`UNetClock`; NaN on a GPU),
so s_per_image - unet_s_per_image is what each side spends around the model. ``parity_max_abs`` is the max abs
difference of the final latents between ours and diffusers for the setting (float32: ~1e-5). ``calls_per_image``
counts UNet image-evaluations per image (3 x steps for SAG+CFG, 2 x steps for SAG) on each side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time

import numpy as np
import pandas as pd
import torch

from benchmarks.common import DTYPES, append_bench, machine, model_guidance, timed
from sag.evaluators.quality import bootstrap_indices, percentile_interval
from sag.guidance import CallCounter, build_guidance
from sag.models.tiny_sd_pipeline import build_tiny_sd, run_pipeline
from sag.sampling import sample

PROMPTS = ["a cat", "the dog", "a cat and the dog", "the cat"]
KINDS = ("sag_cfg", "sag")


def guidance_scales(kw: dict) -> dict[str, float]:
    """diffusers' guidance_scale g per setting: 1 + w for sag_cfg, 1.0 (no CFG) for sag; ours: cfg_scale = g - 1."""
    return {"sag_cfg": 1.0 + float(kw["cfg_scale"]), "sag": 1.0}


def make_cases(pipe, model, steps: int, batch: int, kw: dict) -> dict:
    """name -> zero-argument callable returning the final latents (on the CPU); ``kw``: ``build_guidance``
    settings (``model_guidance("tiny_sd")``), whose ``sag_scale`` both sides use."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    attn1 = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    device = pipe._execution_device

    def theirs(g):
        def fn():
            orig = attn1.processor
            try:
                return run_pipeline(pipe, prompts, seeds, steps, sag_scale=kw["sag_scale"], guidance_scale=g).cpu()
            finally:
                attn1.set_processor(orig)  # the pipeline leaves its CrossAttnStoreProcessor on the shared UNet
        return fn

    def ours(kind, g):
        guide = build_guidance(model, kind, **{**kw, "cfg_scale": g - 1.0})
        use_cfg = kind == "sag_cfg"

        def fn():
            with torch.no_grad():
                cond = pipe.encode_prompt(prompts, device, 1, use_cfg, None)[0]  # as the pipeline does
            return sample(model, pipe.scheduler, steps=steps, seeds=seeds, cond=cond, model_fn=guide,
                          batch_size=batch, progress=False, check_finite=False)
        return fn

    cases = {}
    for kind, g in guidance_scales(kw).items():
        cases[f"diffusers {kind}"] = theirs(g)
        cases[f"ours {kind}"] = ours(kind, g)
    return cases


def run(pipe, model, device, steps: int, batch: int, repeats: int,
        kw: dict | None = None) -> tuple[list[dict], dict[str, float]]:
    """Bench rows (without the run metadata) and parity (max abs latent difference) per setting; ``kw``
    defaults to ``model_guidance("tiny_sd")``."""
    cases = make_cases(pipe, model, steps, batch, model_guidance("tiny_sd") if kw is None else kw)
    calls, latents = {}, {}
    for name, fn in cases.items():  # warm-up: count UNet rows, keep the latents for parity
        with CallCounter(pipe.unet) as counter:
            latents[name] = fn()
        calls[name] = counter.rows / batch
    times, peaks, inside = {k: [] for k in cases}, {k: [] for k in cases}, {k: [] for k in cases}
    with UNetClock(pipe.unet) as clock:
        for r in range(repeats):
            for kind in KINDS:
                pair = [f"diffusers {kind}", f"ours {kind}"]
                for name in pair if r % 2 == 0 else pair[::-1]:
                    clock.seconds = 0.0
                    s, m = timed(cases[name], device)
                    times[name].append(s)
                    peaks[name].append(m)
                    inside[name].append(clock.seconds if device.type == "cpu" else float("nan"))
    med = {k: statistics.median(v) for k, v in times.items()}
    parity = {kind: float((latents[f"ours {kind}"] - latents[f"diffusers {kind}"]).abs().max()) for kind in KINDS}
    rows = []
    for kind in KINDS:
        ratio = med[f"ours {kind}"] / med[f"diffusers {kind}"]
        lo, hi = ratio_interval(times[f"ours {kind}"], times[f"diffusers {kind}"])
        for side in ("ours", "diffusers"):
            name = f"{side} {kind}"
            r, (rlo, rhi) = (ratio, (lo, hi)) if side == "ours" else (1.0, (1.0, 1.0))
            rows.append({"benchmark": "pipeline", "setting": name, "calls_per_image": calls[name],
                         "s_per_image": med[name] / batch, "peak_mem_mb": max(peaks[name]), "ratio_vs_none": r,
                         "ratio_vs_cfg": float("nan"), "ratio_vs_diffusers": r, "ratio_ci_low": rlo,
                         "ratio_ci_high": rhi, "repeats": repeats, "parity_max_abs": parity[kind],
                         "unet_s_per_image": statistics.median(inside[name]) / batch})
    return rows, parity


class UNetClock:
    """Wall time spent inside the UNet's forward calls (a forward pre-hook and hook on the shared UNet, the same on both
    sides), summed into ``seconds``. Meaningful on the CPU only: on a GPU the calls return before the kernels end."""

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.seconds, self._start, self._handles = unet, 0.0, 0.0, []

    def __enter__(self) -> UNetClock:
        def start(*_):
            self._start = time.perf_counter()

        def stop(*_):
            self.seconds += time.perf_counter() - self._start
        self._handles = [self.unet.register_forward_pre_hook(start), self.unet.register_forward_hook(stop)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def ratio_interval(ours: list[float], theirs: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of median(ours) / median(theirs) over the rounds, resampled in pairs (a round's
    two times ran back to back, so a slow spell of the machine moves both); NaN with fewer than 2 rounds."""
    if len(ours) < 2:
        return float("nan"), float("nan")
    idx = bootstrap_indices(len(ours), draws, seed)
    o, t = np.asarray(ours)[idx], np.asarray(theirs)[idx]
    return percentile_interval(np.median(o, axis=1) / np.median(t, axis=1))


LABELS = {"sag": "SAG", "sag_cfg": "SAG+CFG"}


def markdown_table(rows: pd.DataFrame) -> str:
    """BENCHMARKS.md's table of one run: its four ``benchmark="pipeline"`` rows (ours / diffusers per setting)."""
    by = rows.set_index("setting")
    lines = ["| setting | UNet calls / image | ours s / image | diffusers s / image | ours / diffusers [95% CI] | "
             "inside the UNet calls, ours / diffusers | final latents max abs diff |", "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        o, d = by.loc[f"ours {kind}"], by.loc[f"diffusers {kind}"]
        lines.append(f"| {LABELS[kind]} | {o['calls_per_image']:.0f} | {o['s_per_image']:.4f} | {d['s_per_image']:.4f} "
                     f"| **{o['ratio_vs_diffusers']:.3f}x** [{o['ratio_ci_low']:.3f}, {o['ratio_ci_high']:.3f}] "
                     f"| {o['unet_s_per_image'] / d['unet_s_per_image']:.3f}x | {o['parity_max_abs']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Command line: build the tiny SD pipeline, run ours vs diffusers, append the rows to the bench table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default="outputs/bench", help="writes <out>/tables/bench.parquet (appends)")
    args = ap.parse_args(argv)
    if min(args.steps, args.batch, args.repeats) < 1:
        raise SystemExit("--steps, --batch and --repeats must be positive integers")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, model = build_tiny_sd(tmp, device, DTYPES[args.dtype])
    rows, parity = run(pipe, model, device, args.steps, args.batch, args.repeats)
    meta = {"model": "tiny_sd_pipeline (16x16x4 latent)", "device": device.type, "dtype": args.dtype,
            "batch": args.batch, "steps": args.steps, "machine": machine(device), "date": dt.date.today().isoformat()}
    df, path = append_bench(rows, meta, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.tail(len(rows))[["setting", "model", "steps", "batch", "calls_per_image", "s_per_image",
                                  "unet_s_per_image", "ratio_vs_diffusers", "ratio_ci_low", "ratio_ci_high",
                                  "parity_max_abs"]].to_string(index=False))
    for kind in KINDS:
        ours, theirs = (r for r in rows if r["setting"].endswith(f" {kind}"))
        print(f"{kind}: ours / diffusers = {ours['ratio_vs_diffusers']:.3f}x "
              f"[{ours['ratio_ci_low']:.3f}, {ours['ratio_ci_high']:.3f}] (95% bootstrap over {args.repeats} rounds) "
              f"({ours['s_per_image']:.4f} vs {theirs['s_per_image']:.4f} s/image), "
              f"parity max |z_ours - z_diffusers| = {parity[kind]:.2e}")
    print(markdown_table(df.tail(len(rows))))
    print(f"wrote {path}")
    return df


if __name__ == "__main__":
    main()
