"""Shared by the SDXL, SD3 and Flux parity tests: run a tiny diffusers text-to-image pipeline and record what it feeds
its scheduler, our flow sampler's run recorded the same way, and the (pipeline, saved folder, our model) fixture."""

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


def flow_run(model, kind: str, size, layers, prompts, seeds, steps: int, **options):
    """(the guided prediction of each step, the final latents) of our flow_euler sampler with guidance ``kind`` on
    ``layers`` (the SD3 and Flux tests' side of :func:`pipeline_run`)."""
    from sag.guidance import build_guidance
    from sag.sampling import sample
    from sag.schedulers import make_scheduler

    preds = []
    g = build_guidance(model, kind, layers=layers, **options)
    x = sample(model, make_scheduler(model, "flow_euler"), steps=steps, seeds=seeds, cond=model.encode_prompt(prompts),
               size=size, model_fn=g, progress=False, callback=lambda s: preds.append(s.prediction))
    return preds, x
