"""Re-export of :mod:`sag.models.tiny_sd_pipeline` (the tiny offline Stable Diffusion SAG pipeline) for the tests
that import ``sd_pipeline`` from tests/ (on sys.path under pytest). Not a test module."""

from sag.models.tiny_sd_pipeline import (  # noqa: F401
    MERGES,
    SAG_LAYER,
    build_text_encoder,
    build_tiny_sd,
    build_tiny_sd_sag_pipeline,
    build_tokenizer,
    diffusion_model,
    encode,
    run_pipeline,
    write_tokenizer_files,
)
