"""SD3 folders with a T5 text encoder (``text_encoder_3``): a tiny random ``StableDiffusion3Pipeline`` with the tiny
T5 of sag/models/tiny_t5.py, saved and loaded by ``load_model("diffusers_dir")``, encodes prompts and samples as the
pipeline itself (the no-T5 case: tests/test_sd3.py)."""

import pytest
import torch

pytest.importorskip("transformers")

import text_pipelines  # noqa: E402
from text_pipelines import saved_pipeline  # noqa: E402

from sag.models.tiny_sd3 import build_tiny_sd3_pipeline  # noqa: E402
from sag.sampling import sample  # noqa: E402
from sag.schedulers import make_scheduler  # noqa: E402

PROMPTS = ["a cat", "the dog"]
SEEDS = [0, 1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_t5_folder_encodes_and_samples_as_the_pipeline(tmp_path):
    pipe, _, model = saved_pipeline(lambda d: build_tiny_sd3_pipeline(d, t5=True), tmp_path)
    assert model.encode_prompt.t5 is not None
    with torch.no_grad():  # as the pipeline's __call__
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    ours = model.encode_prompt(PROMPTS)
    # CLIP-L + CLIP-G (77 tokens, zero-padded to 48) then 256 T5 tokens, no longer zeros; pooled 16 + 16
    assert ours.shape == (2, 77 + 256 + 1, 48) and ours[:, 77:-1].abs().amax() > 0
    assert torch.equal(ours[:, :-1], embeds) and torch.equal(ours[:, -1, :32], pooled)
    _, z_theirs = text_pipelines.pipeline_run(pipe, PROMPTS, SEEDS, 2, 1.0, (16, 16))
    z_ours = sample(model, make_scheduler(model, "flow_euler"), steps=2, seeds=SEEDS, cond=ours, size=(16, 16),
                    progress=False)
    # guidance off, same weights, prompts, seeds and scheduler: bit-identical on this CPU (as tests/test_sd3.py);
    # 1e-4 absolute leaves room for other BLAS builds on latents of magnitude <= ~5
    assert (z_ours - z_theirs).abs().max() < 1e-4
