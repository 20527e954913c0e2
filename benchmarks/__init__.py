"""Measured costs of guidance and capture, installed with sag-lab (``python -m benchmarks.<name>``).

- :mod:`benchmarks.cost`: guidance and capture cost per preset (CPU or CUDA), appended to ``tables/bench.parquet``;
- :mod:`benchmarks.pipeline`: ours against diffusers' ``StableDiffusionSAGPipeline`` on a tiny offline SD;
- :mod:`benchmarks.capture_overhead`: capture on/off/to disk on a tiny model, printed;
- :mod:`benchmarks.common`: shared timing, table and per-model settings (``conf/model_guidance``);
- ``gpu.sh``: the GPU set (see BENCHMARKS.md). Measured tables: ``benchmarks/results/``.
"""
