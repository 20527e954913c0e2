"""Small CNNs that judge images of the embedded scene domain (:mod:`sag.data.scenes`).

* :class:`DomainClassifier`: clean 32x32 image in [-1, 1] -> logits of the largest object's class; its
  penultimate features (:meth:`DomainClassifier.features`) span the domain feature space in which the
  Frechet distance is measured (the role Inception-v3's pool features play for FID).
* :class:`NoisyClassifier`: the same network conditioned on the diffusion timestep t (FiLM from a
  sinusoidal embedding), trained on x_t; gives grad_x log p(y | x_t) for classifier guidance
  (Dhariwal & Nichol 2021).
* :class:`ObjectSegmenter`: a tiny UNet predicting the binary object mask of a clean image (a stand-in for
  the Mask R-CNN applied to generated images).

All use GroupNorm (no batch statistics), so ``train()`` and ``eval()`` compute the same function.
Every model keeps its constructor arguments in ``self.config`` (see :mod:`sag.evaluators.io`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sag.data.scenes import SHAPES
from sag.errors import SagConfigError


def _groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is <= ``groups``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """Pre-activation residual block: GN-SiLU-conv, (FiLM from ``emb``), GN-SiLU-conv, plus a skip."""

    def __init__(self, cin: int, cout: int, groups: int = 8, emb_dim: int | None = None):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin, groups), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(cout, groups), cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        if self.film is not None:  # start as the identity modulation
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (b, dim) of a float timestep (Vaswani et al. 2017; DDPM's time embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return F.pad(emb, (0, dim % 2))


class _Backbone(nn.Module):
    """Stem conv, then per stage ``blocks`` ResBlocks and a 2x average-pool (not after the last stage)."""

    def __init__(self, widths, blocks: int, groups: int, emb_dim: int | None):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.stages = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.stages.append(nn.ModuleList([ResBlock(cin if i == 0 else w, w, groups, emb_dim)
                                              for i in range(blocks)]))
            cin = w
        self.norm = nn.GroupNorm(_groups(cin, groups), cin)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i:
                h = F.avg_pool2d(h, 2)
            for block in stage:
                h = block(h, emb)
        return F.silu(self.norm(h)).mean(dim=(2, 3))  # global average pool, (n, widths[-1])


class DomainClassifier(nn.Module):
    """Clean-image classifier: ``forward(x) -> (n, num_classes)`` logits for images (n, 3, 32, 32) in [-1, 1].

    Architecture: stem conv, ``len(widths)`` stages of ``blocks`` residual blocks (GroupNorm/SiLU) with 2x
    average-pool between stages (default 32 -> 16 -> 8 -> 4 px), global average pool, a ``feature_dim`` feature layer
    (linear + SiLU: :meth:`features`) and a linear head.
    """

    kind = "classifier"

    def __init__(self, widths=(16, 32, 64, 128), blocks: int = 1, feature_dim: int = 128, groups: int = 8,
                 num_classes: int = len(SHAPES)):
        super().__init__()
        self.config = {"widths": [int(w) for w in widths], "blocks": int(blocks), "feature_dim": int(feature_dim),
                       "groups": int(groups), "num_classes": int(num_classes)}
        self.backbone = _Backbone(widths, blocks, groups, None)
        self.feature = nn.Linear(widths[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(n, feature_dim) penultimate features: the domain feature space of the Frechet distance."""
        return F.silu(self.feature(self.backbone(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class NoisyClassifier(nn.Module):
    """Timestep-aware classifier for classifier guidance: ``forward(x_t, t) -> (n, num_classes)`` logits.

    ``t`` is the model timestep in [0, num_train_timesteps - 1], a float or int tensor of shape (n,) or a
    scalar; fractional t (Euler-type schedulers) is fine. Its sinusoidal embedding passes an MLP and
    modulates every residual block (FiLM: ``h * (1 + scale) + shift`` after the second GroupNorm). Trained on
    ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` (see :mod:`sag.evaluators.train`); differentiable w.r.t. x_t.
    """

    kind = "noisy_classifier"

    def __init__(self, widths=(16, 32, 64, 128), blocks: int = 1, feature_dim: int = 128, groups: int = 8,
                 num_classes: int = len(SHAPES), emb_dim: int = 128):
        super().__init__()
        self.config = {"widths": [int(w) for w in widths], "blocks": int(blocks), "feature_dim": int(feature_dim),
                       "groups": int(groups), "num_classes": int(num_classes), "emb_dim": int(emb_dim)}
        self.emb_dim = int(emb_dim)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.backbone = _Backbone(widths, blocks, groups, emb_dim)
        self.feature = nn.Linear(widths[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def embed_t(self, t: Tensor | float, n: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t has shape {tuple(t.shape)} for a batch of {n}; accepted: a scalar or ({n},)")
        return F.silu(self.time_mlp(timestep_embedding(t, self.emb_dim)))

    def features(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        emb = self.embed_t(t, x_t.shape[0], x_t.device)
        return F.silu(self.feature(self.backbone(x_t, emb)))

    def forward(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        return self.head(self.features(x_t, t))


class ObjectSegmenter(nn.Module):
    """Tiny UNet: ``forward(x) -> (n, 1, 32, 32)`` logits of "pixel belongs to an object" (``object_mask``).

    Encoder: stem conv and one residual block per level (32, 16, 8 px; 2x average-pool between); decoder:
    nearest 2x upsampling, concatenation with the encoder skip and a residual block per level; 1x1 output.
    """

    kind = "segmenter"

    def __init__(self, widths=(16, 32, 64), groups: int = 8):
        super().__init__()
        self.config = {"widths": [int(w) for w in widths], "groups": int(groups)}
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = widths[0]
        for w in widths:
            self.down.append(ResBlock(cin, w, groups))
            cin = w
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(ResBlock(cin + w, w, groups))
            cin = w
        self.norm = nn.GroupNorm(_groups(cin, groups), cin)
        self.out = nn.Conv2d(cin, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        skips = []
        for i, block in enumerate(self.down):
            if i:
                skips.append(h)
                h = F.avg_pool2d(h, 2)
            h = block(h)
        for block in self.up:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1))
        return self.out(F.silu(self.norm(h)))

    @torch.no_grad()
    def predict_mask(self, x: Tensor, threshold: float = 0.5) -> Tensor:
        """(n, 32, 32) bool: sigmoid(logits) > ``threshold``."""
        return torch.sigmoid(self(x))[:, 0] > threshold


EVALUATORS: dict[str, type[nn.Module]] = {
    "classifier": DomainClassifier,
    "noisy_classifier": NoisyClassifier,
    "segmenter": ObjectSegmenter,
}


def build_evaluator(kind: str, **arch) -> nn.Module:
    """A freshly initialised evaluator of ``kind`` (a key of :data:`EVALUATORS`) with architecture ``arch``."""
    if kind not in EVALUATORS:
        raise SagConfigError(f"evaluator kind {kind!r}; accepted: {sorted(EVALUATORS)}")
    try:
        return EVALUATORS[kind](**arch)
    except (TypeError, ValueError) as e:
        raise SagConfigError(f"{kind} architecture {arch}: {e}") from None


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
