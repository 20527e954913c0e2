"""Quality of guidance on paired seeds: every setting samples the same seeds and labels, then is scored
against held-out scenes in the domain classifier's feature space -> ``tables/quality.parquet``.

    python -m experiments.evaluate                       # the embedded model, seeds 0-255, DDIM 50
    python -m experiments.evaluate seeds=0-999 sag_scales=[0,0.1,0.25,0.5,1.0] metrics.draws_fd=50
    python -m experiments.evaluate debug=tiny model=tiny_pixel_cond seeds=0-7      # seconds
    python -m experiments.evaluate model=diffusers_dir model.path=DIR reference=REF.npz inception_weights=I.pt
                                        # any model against your reference set (features: sag.evaluators.features)

Settings (:func:`sag.sweep.quality_settings`): SAG and blur guidance over ``sag_scales``/``blur_scales`` (s = 0
is the unguided run: SAG at s = 0 is bit-for-bit unguided), CFG and CG alone and with SAG (``combos``; paper
Sec. 3.2 table: SAG x CG). Each setting samples into ``settings/<name>/`` through :func:`sag.runs.run_sampling`,
so rerunning into the same run dir (``hydra.run.dir=...``) resumes an interrupted sweep. Metrics
(:mod:`sag.evaluators.quality`): fd, precision, recall (k-NN, k = 3), class_accuracy, is_score, with bootstrap
CIs over seeds; ``calls_per_image`` is counted (network evaluations per image) on one extra trajectory. A model of no
shipped domain is scored against ``reference=`` (a folder or .npz) in Inception or backbone features (fid, sfid, is,
fd_dinov2, ...); without one it is refused in one line before any sampling (sag.evaluators.scoring).
"""

from __future__ import annotations

from omegaconf import DictConfig

from experiments.cli import entry_point
from experiments.common import run_inputs

SETTINGS_KEYS = ("sag_scales", "blur_scales", "combos", "combo_sag_scale", "cfg_scale", "cg_scale", "family",
                 "family_options")


@entry_point("evaluate")
def main(cfg: DictConfig) -> None:
    run_inputs(cfg)  # seeds, steps, batch size, size: refused before the heavy imports (run_sweep checks again)
    from experiments.sweeps import run_sweep  # heavy (torch, evaluators): after --help and config errors
    from sag.sweep import quality_settings

    run_sweep(cfg, quality_settings, SETTINGS_KEYS, "quality", "evaluate")


if __name__ == "__main__":
    main()
