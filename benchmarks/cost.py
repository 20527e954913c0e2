"""Cost of guidance and of attention capture, measured in one run, written to ``tables/bench.parquet``.

    python -m benchmarks.cost --preset tiny_pixel_cond --device cpu --out outputs/bench
    python -m benchmarks.cost --preset sd15 --device cuda --dtype float16 --out $OUT   # random weights

Presets (random weights unless named): ``tiny_pixel_cond`` (0.28M), ``embedded`` (the shipped weights),
``adm128`` (guided-diffusion ImageNet-128 conditional architecture, 421.5M, 128x128 pixels, SAG layer
output_blocks[8] as the official README), ``sd15`` (diffusers' default UNet2DConditionModel = SD-1.5,
860M, 4x64x64 latents, text embeddings 77x768, SAG on the mid-block attn1 as diffusers' pipeline), ``sdxl`` (the
SDXL base UNet, 2.6B, 4x128x128 latents with ``--latent 128``, pooled embedding and time ids as added conditioning,
SAG on the first mid-block attn1), ``sd3`` (SD3 medium MMDiT, 2.03B) and ``flux`` (FLUX.1-dev, 11.9B), flow matching
on ``flow_euler``, 16x128x128 latents with ``--latent 128`` (``benchmarks.presets``; sdxl, sd3, flux not measured
yet, see BENCHMARKS.md; on sd3/flux pass ``--kinds sag,blur,...``: PAG/SEG/SLG refuse or fail there). The SAG
settings (layers, blur, scales) of a preset are those of its ``conf/model_guidance/<name>.yaml`` (``PRESETS``).

Two benchmarks, each A/B interleaved over ``--repeats`` rounds on the same seeds (medians):
- ``guidance``: none / sag / blur / pag / seg / slg (/ cfg / sag_cfg / apg where the model has a null condition;
  ``--kinds`` to choose any of ``sag.guidance.KINDS`` except those that need a classifier, cg and every ``*_cg``
  kind, refused by ``build_guidance`` in one line): model calls per image (network rows
  counted by a hook, ``sag.guidance.CallCounter``), wall time per image, peak accelerator memory, ratios to
  unguided and to CFG. The ideal is one extra model call per guided step: SAG / none = 2.0x, SAG+CFG / CFG =
  1.5x (targets 2.05x, 1.55x); PAG, SEG, SLG cost what SAG costs, APG what CFG costs.
- ``capture``: every self-attention layer, head-mean and received-mass maps, every step, against no
  capture (target 1.15x); ``--latent`` sets the sd15 latent size, so 64 gives a 64x64 token grid at the
  first level and 32 a 32x32 one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics

import pandas as pd
import torch

from benchmarks.common import DTYPES, append_bench, machine, model_guidance, timed
from benchmarks.presets import RANDOM_PRESETS, build_random_preset
from sag.capture import capture_attention
from sag.guidance import CallCounter, build_guidance
from sag.models import DiffusionModel, load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler

# Preset -> its conf/model_guidance/<name>.yaml (SAG layers, blur, scales; read with benchmarks.common).
PRESETS = {"tiny_pixel_cond": "tiny_pixel_cond", "embedded": "embedded", "adm128": "adm128",
           "sd15": "stable_diffusion", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


def build_preset(name: str, device: torch.device, dtype: torch.dtype, latent: int) -> DiffusionModel:
    """A model of the preset's architecture on ``device`` (random weights for adm128 / sd15)."""
    if name in ("tiny_pixel_cond", "embedded"):
        return load_model(name).to(device=device, dtype=dtype)
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    if name == "adm128":
        from sag.models.adm import adm_flags, adm_scheduler_config, build_adm_unet

        flags = adm_flags("imagenet128_cond")
        with torch.device(device):
            net = build_adm_unet(flags)
        sched = adm_scheduler_config(flags)
        ac = DDPMScheduler.from_config(sched).alphas_cumprod
        model = DiffusionModel("adm128", net, ac, learned_variance=True, conditioning="class", num_classes=1000,
                               sample_size=(128, 128), scheduler_config=sched)
    elif name in RANDOM_PRESETS:  # sd15, sdxl, sd3, flux: random weights at the real network sizes
        model = build_random_preset(name, device, latent)
    else:
        raise SystemExit(f"unknown preset {name!r}; accepted: {sorted(PRESETS)}")
    return model.to(device=device, dtype=dtype)


def _cond(model: DiffusionModel, n: int, device) -> torch.Tensor | None:
    if model.conditioning == "class":
        return torch.arange(n, device=device) % model.num_classes
    if model.conditioning == "text":
        shape = model.null_text.shape[1:]  # (77, 768); SDXL: the packed (78, 2048), sag.models.sdxl
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1)).to(device, model.dtype)
    return None


def run_cases(cases: dict, device, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds and max peak MiB per case, A/B interleaved after one warm-up round."""
    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    peaks = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            s, m = timed(fn, device)
            times[k].append(s)
            peaks[k].append(m)
    return {k: (statistics.median(times[k]), max(peaks[k])) for k in cases}


# The kinds benchmarked by default: SAG, blur and the SAG family; CFG, SAG+CFG and APG only where the model has a
# null condition (pag_cfg, seg_cfg, slg_cfg cost what sag_cfg costs: --kinds adds them; classifier guidance needs
# a trained classifier and is not benchmarked here).
PLAIN_KINDS = ("none", "sag", "blur", "pag", "seg", "slg")
CFG_KINDS = ("cfg", "sag_cfg", "apg")


def bench_guidance(model, preset, device, steps, batch, repeats, scheduler="ddim", kinds=None) -> list[dict]:
    """Rows of the ``guidance`` benchmark: calls per image (UNet rows counted by a hook), time and memory, per kind
    of ``kinds`` (None: ``PLAIN_KINDS``, then ``CFG_KINDS`` where the model has a null condition; "none" always
    runs first, it is the ratios' reference; "cfg" is added where a ``*_cfg`` kind or apg is asked for)."""
    sched = make_scheduler(model, scheduler)
    seeds, cond = list(range(batch)), _cond(model, batch, device)
    has_null = model.conditioning == "text" or model.has_null_class
    if kinds is None:
        kinds = [*PLAIN_KINDS, *(CFG_KINDS if has_null else ())]
    wants_cfg = any(k.endswith("_cfg") or k == "apg" for k in kinds)
    kinds = ["none", *(["cfg"] if wants_cfg and "cfg" not in kinds else []), *(k for k in kinds if k != "none")]
    kw = model_guidance(PRESETS[preset])
    fns = {k: build_guidance(model, k, **kw) for k in kinds}
    counters = {k: CallCounter(model.net) for k in kinds}

    def case(k):
        def fn():
            with counters[k]:  # counts every round, the warm-up included
                sample(model, sched, steps=steps, seeds=seeds, cond=cond, model_fn=fns[k], batch_size=batch,
                       progress=False, check_finite=False)
        return fn

    res = run_cases({k: case(k) for k in kinds}, device, repeats)
    calls = {k: counters[k].rows / (repeats + 1) / batch for k in kinds}
    rows = []
    for k in kinds:
        s, mem = res[k]
        rows.append({"benchmark": "guidance", "setting": k, "calls_per_image": calls[k], "s_per_image": s / batch,
                     "peak_mem_mb": mem, "ratio_vs_none": s / res["none"][0],
                     "ratio_vs_cfg": s / res["cfg"][0] if "cfg" in res else float("nan")})
    return rows


def bench_capture(model, device, steps, batch, repeats, scheduler="ddim") -> list[dict]:
    """Rows of the ``capture`` benchmark: every self-attention layer recorded at every step vs no capture."""
    sched = make_scheduler(model, scheduler)
    seeds, cond = list(range(batch)), _cond(model, batch, device)

    def plain():
        sample(model, sched, steps=steps, seeds=seeds, cond=cond, batch_size=batch, progress=False,
               check_finite=False)

    def captured(exact=True):
        def fn():
            with capture_attention(model.net, "*", ["head_mean", "received"], exact=exact) as store:
                sample(model, sched, steps=steps, seeds=seeds, cond=cond, batch_size=batch, progress=False,
                       check_finite=False, callback=lambda s: store.pop())
        return fn

    res = run_cases({"no capture": plain, "capture": captured(), "capture exact=False": captured(False)},
                    device, repeats)
    base = res["no capture"][0]
    return [{"benchmark": "capture", "setting": k, "calls_per_image": float(steps), "s_per_image": s / batch,
             "peak_mem_mb": m, "ratio_vs_none": s / base, "ratio_vs_cfg": float("nan")} for k, (s, m) in res.items()]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Command line: build the preset, run the chosen benchmarks, append their rows to the bench table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny_pixel_cond", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent", type=int, default=64, help="sd15/sdxl/sd3/flux latent size (128 = 1024 px)")
    ap.add_argument("--benchmarks", default="guidance,capture")
    ap.add_argument("--kinds", default=None, help="comma-separated guidance kinds of the guidance benchmark "
                    "(default: sag, blur, pag, seg, slg and, with a null condition, cfg, sag_cfg, apg)")
    ap.add_argument("--out", default="outputs/bench", help="writes <out>/tables/bench.parquet (appends)")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build_preset(args.preset, device, dtype, args.latent)
    rows, which = [], args.benchmarks.split(",")
    sched = "flow_euler" if model.schedule_family == "flow" else "ddim"  # sd3, flux: their flow-matching Euler
    if "guidance" in which:
        kinds = None if args.kinds is None else args.kinds.split(",")
        rows += bench_guidance(model, args.preset, device, args.steps, args.batch, args.repeats, sched, kinds)
    if "capture" in which:
        rows += bench_capture(model, device, args.steps, args.batch, args.repeats, sched)
    grid = f"{args.latent}x{args.latent}" if args.preset in RANDOM_PRESETS else "x".join(map(str, model.sample_size))
    meta = {"model": f"{args.preset} ({grid})", "device": device.type, "dtype": args.dtype, "batch": args.batch,
            "steps": args.steps, "machine": machine(device), "date": dt.date.today().isoformat()}
    df, path = append_bench(rows, meta, args.out)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.tail(len(rows))[["benchmark", "setting", "model", "calls_per_image", "s_per_image", "peak_mem_mb",
                                  "ratio_vs_none", "ratio_vs_cfg"]].to_string(index=False))
    print(f"wrote {path}")
    return df


if __name__ == "__main__":
    main()
