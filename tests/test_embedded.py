"""The embedded model ships with the package, loads offline and samples on the CPU."""

import json

import torch

from sag.models import load_model
from sag.models.embedded import EMBEDDED_DIR
from sag.sampling import sample
from sag.schedulers import make_scheduler


def test_embedded_model_loads_offline_and_samples():
    m = load_model("embedded")
    info = json.loads((EMBEDDED_DIR / "classes.json").read_text())
    assert m.name == "embedded" and m.conditioning == "class" and m.has_null_class
    assert m.class_names == info["classes"] and m.num_classes == len(info["classes"]) == 5
    x = sample(m, make_scheduler(m, "ddim"), steps=3, seeds=[0, 1], cond=torch.tensor([0, 4]), progress=False)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_embedded_weights_are_small():
    size = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
