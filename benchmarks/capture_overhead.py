"""Capture overhead: sampling with every self-attention layer recorded at every step vs no capture.

    python -m benchmarks.capture_overhead [--model tiny_pixel] [--steps 20] [--batch 8] [--repeats 5]

Runs A/B interleaved in one process (same seeds, same scheduler) and prints median wall times and their
ratios for: no capture | capture (head_mean + received, popped and discarded) | capture streamed to
records on disk | capture with exact=False (output from the recorded probabilities). The target is
<= 1.15x for the in-memory case.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from sag.capture import CaptureSpec, capture_attention
from sag.models import load_model
from sag.records import RecordWriter
from sag.sampling import sample
from sag.schedulers import make_scheduler


def main() -> None:
    """Command line: run the four cases A/B interleaved and print median times and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_pixel")
    ap.add_argument("--channels", default="16,32,32", help="tiny_pixel block_out_channels")
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reductions", default="head_mean,received")
    args = ap.parse_args()
    kw = {}
    if args.model == "tiny_pixel":
        kw = {"block_out_channels": tuple(int(c) for c in args.channels.split(",")),
              "layers_per_block": args.layers_per_block}
    model = load_model(args.model, **kw)
    n_params = sum(p.numel() for p in model.net.parameters())
    sched = make_scheduler(model, args.scheduler)
    seeds = list(range(args.batch))
    reductions = args.reductions.split(",")

    def plain():
        sample(model, sched, steps=args.steps, seeds=seeds, batch_size=args.batch, progress=False)

    def in_memory(exact=True):
        with capture_attention(model.net, "*", reductions, exact=exact) as store:
            sample(model, sched, steps=args.steps, seeds=seeds, batch_size=args.batch, progress=False,
                   callback=lambda s: store.pop())

    def to_disk():
        with tempfile.TemporaryDirectory() as d, capture_attention(model.net, "*", reductions) as store:
            w = RecordWriter(d, CaptureSpec().dtype)
            sample(model, sched, steps=args.steps, seeds=seeds, batch_size=args.batch, progress=False,
                   callback=lambda s: w.write_step(batch_index=s.batch_index, step=s.step,
                                                   num_steps=s.num_steps, t=s.t, seeds=s.seeds,
                                                   records=store.pop()))
            w.close()

    cases = {"no capture": plain, "capture (memory)": in_memory, "capture (records)": to_disk,
             "capture exact=False": lambda: in_memory(exact=False)}
    for fn in cases.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["no capture"])
    print(f"model={args.model} params={n_params / 1e6:.2f}M scheduler={args.scheduler} steps={args.steps} "
          f"batch={args.batch} reductions={reductions} threads={torch.get_num_threads()} repeats={args.repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:18s} median {med:7.3f} s   ratio {med / base:5.3f}x   (min {min(ts):.3f} s)")


if __name__ == "__main__":
    main()
