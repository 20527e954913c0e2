"""The standard Inception-v3 of FID, sFID and IS, from a LOCAL TorchScript file (nothing is downloaded).

The file is NVIDIA's ``inception-2015-12-05.pt``: the TensorFlow graph ``inception-2015-12-05`` (the network of the
original FID code, of guided-diffusion's ``evaluations/evaluator.py`` and of the ADM paper's tables) translated to
TorchScript, as StyleGAN2-ADA, StyleGAN3, EDM, EDM2 and clean-fid load it. It needs torch only: torch-fidelity
0.4.0 imports torchvision in its ``__init__`` (and, once installed, makes ``torchmetrics.image.fid`` fail to import),
torchvision does not install beside this torch (environment.md), and pytorch-fid builds on torchvision. The file's
contract, as those projects call it: uint8 NCHW RGB images of any size in; ``net(x, return_features=True)`` ->
(n, 2048) pool_3 features (FID; StyleGAN2-ADA ``frechet_inception_distance.py``); ``net(x, no_output_bias=True)`` ->
(n, 1008) softmax probabilities without the output bias (IS; StyleGAN2-ADA ``inception_score.py``, which matches
guided-diffusion's softmax of ``pool_3 @ W``); ``net.layers``: the Sequential from the resized input to pool_3, with
``layers.mixed_6.conv`` the ``mixed_6/conv`` tensor whose first 7 channels guided-diffusion flattens for sFID
(7 x 17 x 17 = 2023 features).

TorchScript modules take no forward hooks, so the spatial features come from running ``layers`` child by child on the
network's own input transform (:func:`layers_input`, transcribed from the file's ``_resize``: bilinear resampling to
299x299 with border padding, then (x - 128) / 128). :class:`InceptionV3` checks at load that this route reproduces
the file's own pool_3 features on a seeded probe batch, so a file of another layout is refused instead of giving a
wrong sFID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sag.errors import SagConfigError
from sag.pixels import to_uint8

SIZE = 299  # the network's input resolution (inception-2015-12-05)
SPATIAL_CHANNELS = 7  # guided-diffusion evaluator.py: spatial = mixed_6/conv[..., :7] (2023 features at 17x17)
IS_SPLIT = 5000  # guided-diffusion evaluator.py compute_inception_score(split_size=5000)
ACCEPTED = ("a local TorchScript Inception-v3 file in the format of NVIDIA's inception-2015-12-05.pt (as EDM/EDM2, "
            "StyleGAN2-ADA and clean-fid load it), or null")


def check_inception_weights(weights: str | Path | None) -> Path | None:
    """The local Inception weights file (None: none given), checked without loading it."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SagConfigError(f"inception_weights={weights}: no such file; accepted: {ACCEPTED}")
    return path


def uint8_images(images: Tensor) -> Tensor:
    """(n, 3, H, W) in [-1, 1] -> (n, 3, H, W) uint8: the pixels of the sample PNGs (:func:`sag.pixels.to_uint8`)."""
    return torch.from_numpy(to_uint8(images.detach().cpu())).permute(0, 3, 1, 2)


def layers_input(images: Tensor, size: int = SIZE) -> Tensor:
    """uint8 (n, 3, H, W) -> the input of ``net.layers`` (n, 3, size, size): the file's ``_resize``, transcribed
    (affine grid with the half-pixel offset of the two sizes, bilinear, border padding), then (x - 128) / 128."""
    n, c, h, w = images.shape
    x = images.to(torch.float32)
    theta = torch.eye(2, 3, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


class InceptionV3:
    """The TorchScript Inception of a local file (module docstring), on CPU. Call it on images in [-1, 1] for
    (pool_3 (n, 2048), spatial (n, 2023), probabilities (n, 1008)), all float64."""

    def __init__(self, weights: str | Path, batch: int = 100):
        path = check_inception_weights(weights)
        self.path, self.batch = str(path), int(batch)
        try:
            self.net = torch.jit.load(self.path, map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            raise SagConfigError(f"inception_weights={weights}: not a TorchScript file ({str(e).splitlines()[0]}); "
                                 f"accepted: {ACCEPTED}") from None
        children = dict(self.net.layers.named_children()) if hasattr(self.net, "layers") else {}
        if "mixed_6" not in children or not hasattr(children["mixed_6"], "conv"):
            raise SagConfigError(f"inception_weights={weights}: no layers.mixed_6.conv (the sFID features); "
                                 f"accepted: {ACCEPTED}")
        self._check_route(weights)

    @torch.no_grad()
    def _check_route(self, weights) -> None:
        probe = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 37, 45), dtype=np.uint8))
        own = self.net(probe, return_features=True).double().flatten(1)
        pool, _ = self._route(probe)
        # same float32 kernels in another call order: agreement to round-off, far below any real mismatch
        if pool.shape != own.shape or not torch.allclose(pool, own, rtol=1e-4, atol=1e-4 * float(own.abs().max())):
            raise SagConfigError(f"inception_weights={weights}: its layers do not reproduce its own pool_3 features "
                                 f"from the transcribed input transform; accepted: {ACCEPTED}")

    def _route(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(pool_3, spatial) of uint8 images through ``layers`` child by child (one pass for both)."""
        h = layers_input(images)
        spatial = None
        for name, child in self.net.layers.named_children():
            if name == "mixed_6":
                spatial = child.conv(h)[:, :SPATIAL_CHANNELS].flatten(1)
            h = child(h)
        return h.double().flatten(1), spatial.double()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pools, spatials, probs = [], [], []
        for i in range(0, len(images), self.batch):
            x = uint8_images(images[i : i + self.batch])
            pool, spatial = self._route(x)
            pools.append(pool)
            spatials.append(spatial)
            probs.append(self.net(x, no_output_bias=True).double())
        p = torch.cat(probs)
        if p.ndim != 2 or bool((p < 0).any()) or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype),
                                                                      atol=1e-3):  # float32 softmax rows
            raise SagConfigError(f"inception_weights={self.path}: net(x, no_output_bias=True) does not return "
                                 f"probabilities (IS needs the softmax); accepted: {ACCEPTED}")
        return torch.cat(pools), torch.cat(spatials), p
