"""A tiny random Stable Diffusion SAG pipeline built fully offline, for parity checks and benchmarks only.

Not a model to sample with for results: every weight is random. It exists so that diffusers'
``StableDiffusionSAGPipeline`` and our SAG (:mod:`sag.guidance` + :func:`sag.sampling.sample`) can be run on
*identical* weights, prompts, seeds and scheduler, without network access: the parity tests
(``tests/test_sag_parity.py``, ``tests/test_checkpoints.py``) and ``benchmarks/pipeline.py`` use it.
``transformers`` (tokenizer and text encoder) is imported lazily inside the builders, so importing this module
does not need it.

Usage::

    from sag.models.tiny_sd_pipeline import build_tiny_sd, encode, run_pipeline

    pipe, model = build_tiny_sd(tmp_dir)                     # tokenizer files are written to tmp_dir
    z = run_pipeline(pipe, "a cat", seed=0, steps=5, sag_scale=0.75, guidance_scale=7.5)  # (1, 4, 16, 16)
    cond, uncond = encode(pipe, "a cat")                     # each (1, 77, 32), as the pipeline uses them
    # initial latents: torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    #                  * pipe.scheduler.init_noise_sigma   (== 1.0 for DDIM)
    # our side: build_guidance(model, "sag_cfg", sag_scale=0.75, cfg_scale=6.5, layers=SAG_LAYER, kernel_size=9,
    #           blur_sigma=1.0) and sample(model, pipe.scheduler, steps=5, seeds=[0], cond=cond, model_fn=...)
    #           -> the same latents (those settings: conf/model_guidance/tiny_sd.yaml, which callers read)

Components (all random, under ``torch.manual_seed(0)`` inside ``torch.random.fork_rng()``): a byte-level
``CLIPTokenizer`` from a hand-written vocab/merges (pads to 77), a 2-layer ``CLIPTextModel`` (hidden 32), a
``UNet2DConditionModel`` (16x16 latent, self-attention in the mid block at 8x8, 8 heads) whose ``to_q``/``to_k``
weights are doubled so attention is non-uniform, a factor-2 ``AutoencoderKL`` and SD-1.x's ``DDIMScheduler``.
:func:`diffusion_model` wraps the pipeline's own UNet and VAE (shared, not copied) as our ``DiffusionModel``.

Conventions: diffusers' ``guidance_scale`` g is ``1 + cfg_scale`` in ours (g <= 1: no CFG, our ``sag``);
``sag_scale`` is the same s on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sag.models.base import DiffusionModel
from sag.models.tiny import _sharpen, tiny_sd_components

if TYPE_CHECKING:
    from diffusers import StableDiffusionSAGPipeline

# The layer diffusers' SAG pipeline hooks (its blur is fixed at kernel 9, std 1.0). Our settings for this model,
# layer included, live in conf/model_guidance/tiny_sd.yaml: the benchmark and tests read them there.
SAG_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"

MERGES = [("t", "h"), ("c", "a"), ("ca", "t</w>"), ("th", "e</w>"), ("o", "g</w>"), ("d", "og</w>")]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable unicode map (the 256 base symbols of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(tmp_dir: str | Path) -> Path:
    """Write vocab.json / merges.txt / tokenizer_config.json of a tiny byte-level CLIP tokenizer; return the dir."""
    tok_dir = Path(tmp_dir) / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (tok_dir / "merges.txt").write_text(merges, encoding="utf-8")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), encoding="utf-8")
    return tok_dir


def build_tokenizer(tmp_dir: str | Path):
    """The tiny ``CLIPTokenizer`` (its files are written under ``tmp_dir/tokenizer``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_dir))


def clip_text_config(tokenizer, hidden_size: int = 32, **extra):
    """The tiny ``CLIPTextConfig`` of every tiny text pipeline: 2 layers, 4 heads, 77 positions, ``tokenizer``'s
    vocabulary and special ids (``extra``: e.g. ``projection_dim`` for ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def build_text_encoder(tokenizer):
    """A random 2-layer ``CLIPTextModel`` (hidden 32, 4 heads) for ``tokenizer``; draws from the global RNG."""
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config(tokenizer))


def build_tiny_sd_sag_pipeline(tmp_dir: str | Path, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> StableDiffusionSAGPipeline:
    """A tiny random SD-1.x-style SAG pipeline (32x32 images <-> 16x16x4 latents), offline, on ``device``."""
    from diffusers import DDIMScheduler, StableDiffusionSAGPipeline

    tokenizer = build_tokenizer(tmp_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = build_text_encoder(tokenizer)
        unet, vae = tiny_sd_components(cross_attention_dim=32)
    _sharpen(unet, 2.0)  # sharpen attention so that SAG masks are not degenerate (draws no random numbers)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionSAGPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(torch.device(device))
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusion_model(pipe: StableDiffusionSAGPipeline, uncond: torch.Tensor | None = None) -> DiffusionModel:
    """Our ``DiffusionModel`` on the pipeline's own UNet and VAE (shared modules), its training schedule and
    scheduler config; the null text is ``uncond`` (default: the pipeline's embedding of the empty prompt)."""
    if uncond is None:
        uncond = encode(pipe, "")[1]
    return DiffusionModel(
        name="tiny_sd_pipeline", net=pipe.unet, alphas_cumprod=pipe.scheduler.alphas_cumprod.clone(),
        conditioning="text", null_text=uncond, decoder=pipe.vae, latent_scale=pipe.vae.config.scaling_factor,
        sample_size=(16, 16), in_channels=4, clip_denoised=False, scheduler_config=dict(pipe.scheduler.config),
    )


def build_tiny_sd(tmp_dir: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[StableDiffusionSAGPipeline, DiffusionModel]:
    """(diffusers' SAG pipeline, our model) sharing one UNet / VAE; the text encoder is the pipeline's."""
    pipe = build_tiny_sd_sag_pipeline(tmp_dir, device, dtype)
    return pipe, diffusion_model(pipe)


@torch.no_grad()
def run_pipeline(pipe: StableDiffusionSAGPipeline, prompt: str | Sequence[str], seed: int | Sequence[int],
                 steps: int, sag_scale: float, guidance_scale: float, height: int = 32,
                 width: int = 32) -> torch.Tensor:
    """Run the diffusers SAG pipeline (DDIM, eta=0) and return the final latents, shape (n, 4, H/2, W/2).

    ``prompt`` and ``seed`` may be lists (one per image): each image then starts from its own CPU generator,
    ``torch.randn((1, 4, H/2, W/2), generator=Generator().manual_seed(seed_k))``, as our ``sample`` does."""
    gen = (torch.Generator().manual_seed(int(seed)) if isinstance(seed, int)
           else [torch.Generator().manual_seed(int(s)) for s in seed])
    out = pipe(
        prompt if isinstance(prompt, str) else list(prompt), height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance_scale, sag_scale=sag_scale, generator=gen,
        output_type="latent",
    )
    return out.images


@torch.no_grad()
def encode(pipe: StableDiffusionSAGPipeline, prompt: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) text embeddings exactly as ``pipe.__call__`` computes them (uncond = empty prompt ""),
    each (n, 77, 32)."""
    prompt = prompt if isinstance(prompt, str) else list(prompt)
    cond, uncond = pipe.encode_prompt(prompt, pipe._execution_device, 1, True, None)
    return cond, uncond


__all__ = ["MERGES", "SAG_LAYER", "build_text_encoder", "build_tiny_sd", "build_tiny_sd_sag_pipeline",
           "build_tokenizer", "diffusion_model", "encode", "run_pipeline", "write_tokenizer_files"]
