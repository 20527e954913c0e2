"""Shared by the SDXL and SD3 parity tests: run a tiny diffusers text-to-image pipeline and record what it feeds
its scheduler, and build the (pipeline, saved folder, our model) fixture."""

import torch

from sag.models import load_model


def pipeline_run(pipe, prompts, seeds, steps: int, guidance_scale: float, size, negative_prompt=None, **extra):
    """(the guided prediction before each scheduler step, the final latents) of ``pipe`` at latent ``size`` (VAE
    factor 2 in the tiny builders), per-seed generators (``randn_tensor`` draws sample k from generator k, as
    ``sag.sampling.initial_noise``); ``extra``: more call arguments (Flux: ``true_cfg_scale``)."""
    preds, step = [], pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        preds.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        with torch.no_grad():
            out = pipe(prompts, height=size[0] * 2, width=size[1] * 2, num_inference_steps=steps,
                       guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt and [negative_prompt] * len(prompts),
                       generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent", **extra)
    finally:
        del pipe.scheduler.step  # back to the class method
    return preds, out.images


def saved_pipeline(build, tmp):
    """(the pipeline ``build(folder)`` makes, its save_pretrained folder, our model loaded from that folder)."""
    pipe = build(tmp / "build")
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe", load_model("diffusers_dir", path=str(tmp / "pipe"))
