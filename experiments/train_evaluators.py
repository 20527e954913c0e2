"""Train the domain evaluators (classifier, noisy classifier, segmenter; logic in sag.evaluators.train).

    python -m experiments.train_evaluators out_dir=outputs/evaluators threads=1
    python -m experiments.train_evaluators kinds=[segmenter] segmenter.steps=300

Writes ``<out_dir>/<kind>/model.safetensors``, ``config.json`` (with the held-out metrics) and ``loss.csv``
per kind, and prints each kind's summary as JSON.
"""

from __future__ import annotations

import json

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry_point
from experiments.common import user_errors
from sag.errors import SagConfigError


@entry_point("train_evaluators")
def main(cfg: DictConfig) -> None:
    out = HydraConfig.get().runtime.output_dir  # = out_dir, resolved once at startup
    with user_errors():
        settings = OmegaConf.to_container(cfg, resolve=True)  # sag takes plain dicts
        from sag.inputs import check_positive

        threads = check_positive("threads", settings["threads"])
        import torch  # torch, the evaluators: after --help and the cheap checks

        from sag.evaluators import EVALUATORS
        from sag.evaluators.train import train_evaluator

        torch.set_num_threads(threads)
        kinds = list(settings["kinds"])
        bad = [k for k in kinds if k not in EVALUATORS]
        if bad or not kinds:
            raise SagConfigError(f"kinds={kinds}; accepted: a non-empty list of {sorted(EVALUATORS)}")
        for kind in kinds:
            summary = train_evaluator(kind, settings, out)
            print(json.dumps(summary, indent=2), flush=True)
            print(f"{kind}: wrote {summary['weights']} and config.json", flush=True)
    print(f"evaluators: {out}")


if __name__ == "__main__":
    main()
