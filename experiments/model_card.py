"""Measure an embedded model's quality for its model card (no Hydra: a fixed protocol).

    python -m experiments.model_card [--model-dir DIR] [--evaluators DIR] [--n 1000] [--steps 50] [--out FILE]

1. Sample n class-conditional images (labels = seed % classes, guidance off, DDIM) from seeds 0..n-1.
2. Top-1 accuracy of the domain classifier on the requested labels (chance = 1 / classes).
3. Frechet distance (:func:`sag.evaluators.frechet_distance`, the code behind ``tables/quality.parquet``) in
   the domain classifier's 128-d feature space between the samples and n held-out scenes, next to the floor:
   the same distance between two disjoint held-out sets of n scenes.
   Held-out scenes are the model's own domain's (:mod:`sag.domains`: embedded-scenes or natural-scenes), data
   seed 3, which neither the diffusion model (seed 0) nor the evaluators (seeds 1, 2) saw; the classifier is the
   shipped one of that domain unless --evaluators names another.
Writes the metrics as JSON and a labelled sample grid (one row per class).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the sag modules load in main(), after the arguments parse (fast --help)
    import numpy as np
    import torch

HELD_OUT_SEED = 3


def features(clf, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    """The classifier's penultimate features of ``images`` (n, 128) as numpy, in batches of ``batch``."""
    import torch

    with torch.no_grad():
        return torch.cat([clf.features(images[i : i + batch]) for i in range(0, len(images), batch)]).cpu().numpy()


def class_model(model_dir: str | None, device):
    """The model to measure on ``device``: a diffusers dir or the embedded model; class-conditional (the protocol
    samples labels seed % classes and scores class accuracy), else a one-line SagConfigError."""
    from sag.errors import SagConfigError
    from sag.models import load_model

    model = (load_model("diffusers_dir", path=model_dir) if model_dir else load_model("embedded")).to(device)
    if model.conditioning != "class":
        raise SagConfigError(f"--model-dir {model_dir}: a {model.conditioning!r}-conditioned model; accepted: a "
                             "class-conditional diffusers dir")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.model_card", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="a diffusers dir; default: the embedded model")
    ap.add_argument("--evaluators", default=None, help="dir with classifier/; default: the model domain's own")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--out", default="outputs/model_card/metrics.json")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; the seeds' noise is drawn on the CPU either way")
    args = ap.parse_args()
    import torch

    from sag.data import SHAPES
    from sag.domains import scene_maker
    from sag.evaluators import accuracy, frechet_distance
    from sag.evaluators.io import evaluator_for
    from sag.io import atomic_write_text
    from sag.pixels import to_uint8
    from sag.runs import save_grid
    from sag.sampling import sample
    from sag.schedulers import make_scheduler

    torch.set_num_threads(2)
    device = torch.device(args.device)
    model = class_model(args.model_dir, device)
    clf = evaluator_for("classifier", model, Path(args.evaluators) / "classifier" if args.evaluators else None, device)
    seeds = list(range(args.n))
    labels = torch.tensor([s % model.num_classes for s in seeds])
    t0 = time.time()
    x = sample(model, make_scheduler(model, "ddim"), steps=args.steps, seeds=seeds, cond=labels,
               batch_size=args.batch)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    sample_s = time.time() - t0
    images = model.to_images(x.to(device))
    with torch.no_grad():
        logits = torch.cat([clf(images[i : i + 250]) for i in range(0, len(images), 250)]).cpu()
    acc = accuracy(logits, labels)
    held = torch.from_numpy(scene_maker(model.domain)(HELD_OUT_SEED, 0, 2 * args.n)["image"]).to(device)
    f_gen, f_a, f_b = features(clf, images), features(clf, held[: args.n]), features(clf, held[args.n :])
    metrics = {
        "n": args.n, "domain": model.domain, "steps": args.steps, "scheduler": "ddim", "guidance": "none",
        "class_accuracy": acc, "chance": 1 / model.num_classes,
        "per_class_accuracy": {SHAPES[c]: accuracy(logits[labels == c], labels[labels == c])
                               for c in range(model.num_classes)},
        "fd_samples_vs_heldout": frechet_distance(f_gen, f_a),
        "fd_floor_heldout_vs_heldout": frechet_distance(f_a, f_b),
        "sampling_wall_s": round(sample_s, 1),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.machine()} {torch.get_num_threads()} threads",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(metrics, indent=2))
    # grid: one row per class, 8 samples each
    rows = [images[labels == c][:8] for c in range(model.num_classes)]
    grid = to_uint8(torch.cat(rows).cpu()).repeat(2, axis=1).repeat(2, axis=2)
    save_grid(grid, out.with_name("samples.png"), ncol=8)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out} and {out.with_name('samples.png')}")


if __name__ == "__main__":
    from experiments.common import user_errors

    with user_errors():  # a bad --model-dir / --evaluators: one line, exit 2
        main()
