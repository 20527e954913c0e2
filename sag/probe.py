"""Model-side inputs of the Exp. C object study (paper Sec. 2.4): attention on forward-noised scenes with exact
masks, and object masks of generated samples from the domain segmenter.

``probe_scenes`` noises dataset scenes to chosen timesteps t (q(x_t | x_0), one seeded noise per scene and t),
runs ONE model call per (batch, t) under :func:`sag.capture.capture_attention`, and writes

    <out>/records/    the sag.records format, read by analysis like any sampling run (x0 = the clean scene)
    <out>/masks.npz   scene_index (n,), object_mask, texture_mask (n, H, W) bool, label (n,), image (n, 3, H, W),
                      t (k,)

There is no sampler here, so two names of the record format are borrowed, in this one place: the records'
``seed`` column holds the **scene index** (``scene_index``, the scene's position in dataset ``data_seed``) and
their ``step`` column the **t index** (``t_index`` = k, the position of t in ``ts``; the records' ``t`` column
holds t itself). :func:`analysis.driver.scene_correlation` reads them back under those names; the
``object_correlation`` rows of mode "scenes" keep the table's ``seed`` / ``step`` columns with these meanings.

``segment_images`` runs the shipped object segmenter (the stand-in for the paper's Mask R-CNN) on generated images;
``write_sample_masks`` stores a run's sample masks (the segmenter's, or those of another source such as the user's
files: analysis.masks_source) as ``.npz`` (seeds, object_mask, source) for the analysis and the figures.

The scenes and the segmenter belong to a scene domain (:mod:`sag.domains`): ``probe_scenes`` refuses a model that
declares none and draws the scenes of the model's own domain; ``segment_images`` sees images only, so its callers
check the model (:func:`analysis.driver.run_studies`) and name its domain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sag.capture import capture_attention
from sag.data.scenes import SIZE
from sag.domains import DECLARE, DOMAINS, require_domain, scene_maker
from sag.errors import SagConfigError
from sag.io import atomic_path
from sag.models.base import DiffusionModel
from sag.records import RecordWriter

MASKS_FILE = "masks.npz"
# Where the studies store the segmenter masks of a run's samples (relative to the run dir); figures read them.
SAMPLE_MASKS_FILE = Path("studies") / "sample_masks.npz"
RECORD_KEYS = {"seed": "scene_index", "step": "t_index"}  # what the probe's records' seed / step columns hold


def _check_scene_model(model: DiffusionModel, what: str) -> None:
    if model.is_latent or model.in_channels != 3 or tuple(model.sample_size) != (SIZE, SIZE):
        raise SagConfigError(f"{what} needs a {SIZE}x{SIZE} RGB pixel model (the scene domain); model "
                             f"{model.name!r} has {model.in_channels} channels at {list(model.sample_size)}"
                             f"{' (latent)' if model.is_latent else ''}")


def scene_noise(noise_seed: int, indices: Sequence[int], k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps for scene ``indices`` at the k-th t: a function of (noise_seed, scene index, k) only."""
    return torch.from_numpy(np.stack([np.random.default_rng([noise_seed, int(i), k]).standard_normal(shape)
                                      for i in indices]).astype(np.float32))


@torch.no_grad()
def probe_scenes(model: DiffusionModel, out_dir: str | Path, *, layers: Sequence[str], ts: Sequence[float],
                 data_seed: int = 3, start: int = 0, count: int = 32, batch_size: int = 32, noise_seed: int = 0,
                 reductions: Sequence[str] = ("received",), dtype: str = "float32") -> Path:
    """Capture attention on ``count`` scenes of dataset ``data_seed`` noised to each t in ``ts``; returns
    ``out_dir``. Class-conditional models get the scene's label (the class of its largest object). The model must
    declare a scene domain (:func:`sag.domains.require_domain`), whose scenes are probed."""
    domain = require_domain(model, "the scenes probe (correlation_modes=[scenes])",
                            ["correlation_modes=[samples]", DECLARE])
    _check_scene_model(model, "the scenes probe")
    if count <= 0 or batch_size <= 0:
        raise SagConfigError(f"scenes count={count}, batch_size={batch_size}; accepted: positive integers")
    n_train = model.alphas_cumprod.numel()
    bad = [t for t in ts if not 0 <= float(t) < n_train]
    if bad or not ts:
        raise SagConfigError(f"scene timesteps {list(ts)}; accepted: a non-empty list in [0, {n_train})")
    out = Path(out_dir)
    scenes = scene_maker(domain)(data_seed, start, count)
    scene_index = list(range(start, start + count))
    writer = RecordWriter(out / "records", dtype, meta={"probe": "scenes", "model": model.describe(),
                                                        "data_seed": data_seed, "t": [float(t) for t in ts],
                                                        "layers": list(layers), "noise_seed": noise_seed,
                                                        "record_keys": RECORD_KEYS})
    x0_all = torch.from_numpy(scenes["image"])
    labels = torch.from_numpy(scenes["label"])
    with capture_attention(model.net, list(layers), list(reductions)) as store:
        for bi, lo in enumerate(range(0, count, batch_size)):
            idx = scene_index[lo: lo + batch_size]
            x0 = x0_all[lo: lo + batch_size].to(model.device, model.dtype)
            cond = labels[lo: lo + batch_size].to(model.device) if model.conditioning == "class" else None
            for k, t in enumerate(ts):
                eps = scene_noise(noise_seed, idx, k, tuple(x0.shape[1:])).to(model.device, model.dtype)
                tt = torch.full((len(idx),), float(t), device=model.device)
                x_t = model.schedule.add_noise(x0, eps, tt)  # q(x_t | x_0)
                store.pop()
                model(x_t, tt, cond)
                # RECORD_KEYS: the record's step is the t index k, its seeds the scene indices
                writer.write_step(batch_index=bi, step=k, num_steps=len(ts), t=tt.cpu(), seeds=idx,
                                  records=store.pop(), extras={"x0": x0})
    writer.close()
    _savez(out / MASKS_FILE, scene_index=np.asarray(scene_index), object_mask=scenes["object_mask"],
           texture_mask=scenes["texture_mask"], label=scenes["label"], image=scenes["image"],
           t=np.asarray([float(t) for t in ts]))
    return out


def _savez(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` written atomically (through an open file: numpy would append .npz to a temp name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


@torch.no_grad()
def segment_images(images: np.ndarray, segmenter: torch.nn.Module | None = None, batch_size: int = 256, *,
                   domain: str | None) -> np.ndarray:
    """(n, 3, 32, 32) float images in [-1, 1] -> (n, 32, 32) bool object masks from ``segmenter``, or (None) the
    shipped segmenter of ``domain``, the domain the images' model declares (None: refused in one line; there is no
    default domain, so a caller cannot apply one domain's segmenter to another model's images by omission)."""
    if images.ndim != 4 or images.shape[1:] != (3, SIZE, SIZE):
        raise SagConfigError(f"the object segmenter reads (n, 3, {SIZE}, {SIZE}) images; got {images.shape}")
    if segmenter is None:
        from sag.evaluators import load_evaluator

        if domain not in DOMAINS:
            raise SagConfigError(f"the shipped object segmenter is for the {' and '.join(DOMAINS)} domains; the "
                                 f"images' model declares {domain or 'no domain'}; accepted: object_masks=files or "
                                 "object_masks=segmentation, or a model of a scene domain")

        segmenter = load_evaluator("segmenter", domain=domain)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return torch.cat([segmenter.predict_mask(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def write_sample_masks(path: str | Path, seeds: Sequence[int], images: np.ndarray, masks: np.ndarray | None = None,
                       source: str = "embedded", domain: str | None = None) -> Path:
    """Store ``seeds``, ``object_mask`` (n, H, W) bool and ``source`` (where the masks come from, as the tables'
    ``object_masks`` column) in ``path`` (.npz). ``masks`` None: segment the generated ``images`` with the shipped
    segmenter of ``domain``, the one their model declares (source "embedded"; :func:`segment_images`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    masks = segment_images(images, domain=domain) if masks is None else np.asarray(masks, dtype=bool)
    _savez(path, seeds=np.asarray(seeds), object_mask=masks, source=np.asarray(source))
    return path
