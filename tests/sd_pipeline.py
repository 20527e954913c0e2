"""Tiny random Stable Diffusion SAG pipeline, built fully offline, for diffusers-parity tests.

Not a test module (no ``test_`` functions): a helper for comparing diffusers' ``StableDiffusionSAGPipeline``
against our own SAG implementation on identical weights, prompts and seeds.

Usage::

    from sd_pipeline import build_tiny_sd_sag_pipeline, encode, run_pipeline  # tests/ is on sys.path under pytest

    pipe = build_tiny_sd_sag_pipeline(tmp_path)              # tokenizer files are written to tmp_path
    z = run_pipeline(pipe, "a cat", seed=0, steps=5, sag_scale=0.75, guidance_scale=7.5)  # (1, 4, 16, 16)
    cond, uncond = encode(pipe, "a cat")                     # each (1, 77, 32), as the pipeline uses them
    # initial latents: torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    #                  * pipe.scheduler.init_noise_sigma   (== 1.0 for DDIM)

Components (all random, under ``torch.manual_seed(0)`` inside ``torch.random.fork_rng()``): a byte-level
``CLIPTokenizer`` from a hand-written vocab/merges (pads to 77), a 2-layer ``CLIPTextModel`` (hidden 32), a
``UNet2DConditionModel`` (16x16 latent, self-attention in the mid block at 8x8, 8 heads) whose ``to_q``/``to_k``
weights are doubled so attention is non-uniform, a factor-2 ``AutoencoderKL`` and SD-1.x's ``DDIMScheduler``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionSAGPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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


def write_tokenizer_files(tmp_dir: Path) -> Path:
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


def build_tiny_sd_sag_pipeline(tmp_dir: Path) -> StableDiffusionSAGPipeline:
    """A tiny random SD-1.x-style SAG pipeline (32x32 images <-> 16x16x4 latents), on CPU, offline."""
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, in_channels=4, out_channels=4,
        )
        with torch.no_grad():  # sharpen attention so that SAG masks are not degenerate
            for module in unet.modules():
                if isinstance(module, Attention):
                    module.to_q.weight.mul_(2.0)
                    module.to_k.weight.mul_(2.0)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionSAGPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_pipeline(pipe: StableDiffusionSAGPipeline, prompt: str, seed: int, steps: int, sag_scale: float,
                 guidance_scale: float, height: int = 32, width: int = 32) -> torch.Tensor:
    """Run the diffusers SAG pipeline (DDIM, eta=0) and return the final latents, shape (1, 4, H/2, W/2)."""
    out = pipe(
        prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
        sag_scale=sag_scale, generator=torch.Generator().manual_seed(seed), output_type="latent",
    )
    return out.images


@torch.no_grad()
def encode(pipe: StableDiffusionSAGPipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) text embeddings exactly as ``pipe.__call__`` computes them (uncond = empty prompt ""),
    each (1, 77, 32)."""
    cond, uncond = pipe.encode_prompt(prompt, pipe._execution_device, 1, True, None)
    return cond, uncond
