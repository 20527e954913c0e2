"""Cost of guidance: model calls, image-evaluations and wall time per image, measured in one run.

    python benchmarks/guidance_cost.py [--model tiny_pixel_cond] [--steps 20] [--batch 8] [--repeats 3]

Runs unguided, SAG, blur, CFG and SAG+CFG A/B interleaved on the same seeds and prints the ratios
SAG / unguided (target <= 2.05x; ideal 2.0x: one extra model call per guided step) and SAG+CFG / CFG
(target <= 1.55x; ideal 1.5x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sag.guidance import build_guidance
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler


class Counter:
    def __init__(self, model):
        self.model, self.calls, self.rows = model, 0, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return self.model(x, t, cond)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_pixel_cond")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = load_model(args.model)
    sched = make_scheduler(model, args.scheduler)
    seeds = list(range(args.batch))
    cond = torch.arange(args.batch) % model.num_classes if model.conditioning == "class" else None
    kinds = ["none", "sag", "blur", "cfg", "sag_cfg"] if model.conditioning != "none" else ["none", "sag", "blur"]
    counters = {k: Counter(model) for k in kinds}
    fns = {}
    for k in kinds:
        fns[k] = counters[k] if k == "none" else build_guidance(model, k, cfg_scale=2.0)
        if k != "none":
            fns[k].inner = counters[k]

    def run(k):
        sample(model, sched, steps=args.steps, seeds=seeds, cond=cond, model_fn=fns[k], batch_size=args.batch,
               progress=False)

    for k in kinds:
        run(k)  # warm-up; also counts the calls of one run
    calls = {k: (c.calls, c.rows) for k, c in counters.items()}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for k in kinds:
            t0 = time.perf_counter()
            run(k)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = args.batch
    print(f"model={args.model} scheduler={args.scheduler} steps={args.steps} batch={n} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}")
    header = ("guidance", "calls/step", "img-evals/img/step", "s/img", "vs none", "vs cfg")
    print("{:10s} {:>10s} {:>18s} {:>8s} {:>8s} {:>7s}".format(*header))
    for k in kinds:
        c, rows = calls[k]
        vs_cfg = f"{med[k] / med['cfg']:.3f}" if "cfg" in med else "-"
        print(f"{k:10s} {c / args.steps:10.2f} {rows / n / args.steps:18.2f} {med[k] / n:8.4f} "
              f"{med[k] / med['none']:8.3f} {vs_cfg:>7s}")


if __name__ == "__main__":
    main()
