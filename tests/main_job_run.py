"""One tiny main job per test session, shared by the tests that need a real run dir (the ``tiny_main_job`` fixture of
tests/conftest.py): tests/test_main_job.py (every stage), tests/test_evaluate_cli.py (its evaluate and frontier stages
stand in for separate end-to-end runs of those commands) and tests/test_notebooks.py (the report stage's rendered
pages: the notebooks render once per session). Imported, not a conftest, like fixtures_report.py.

The run is the README's ``python -m experiments.main main_scale=tiny`` as a subprocess (so the command line, the
stages' child processes and their Hydra command lines are all real), with ``threads=1`` (conf/main.yaml: each stage
gets OMP_NUM_THREADS=1; on this 2-core machine the tiny networks sample ~10x faster on one thread than on two when
the cores are shared) and conf/main_scale/tiny.yaml's evaluate and frontier lists extended by the settings below,
which the evaluate / frontier end-to-end tests assert on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# added to main_scale=tiny's stage lists (later overrides win in Hydra): PAG x CG beside the default combos (CG alone
# is added beside it); SAG x CFG windows and every-k beside main_scale=tiny's sag and pag frontier
EXTRA = {"evaluate": ["family=[pag_cg]"], "frontier": ["kinds=[sag,sag_cfg]"]}


@dataclass(frozen=True)
class MainRun:
    """A finished tiny main job: its out_dir and the outer command's captured output (children's included)."""

    out: Path
    stdout: str
    stderr: str

    def stage_stdout(self, stage: str) -> str:
        """The part of ``stdout`` printed while ``stage`` ran (between its "[i/n] stage ..." and "[i/n] stage: N s"
        lines; the children inherit the outer command's stdout)."""
        start = self.stdout.index(f"] {stage} ...")
        return self.stdout[start:self.stdout.index(f"] {stage}: ", start)]

    def stage_overrides(self, stage: str) -> list[str]:
        """The overrides the stage's child ran with (``<stage dir>/.hydra/overrides.yaml``, written on success)."""
        return list(OmegaConf.load(self.out / stage / ".hydra" / "overrides.yaml"))


def stage_lists() -> list[str]:
    """``overrides.evaluate=[...]`` and ``overrides.frontier=[...]``: conf/main_scale/tiny.yaml's lists + EXTRA."""
    tiny = OmegaConf.load(ROOT / "conf" / "main_scale" / "tiny.yaml").overrides
    return [f"overrides.{stage}=[" + ",".join(f"'{a}'" for a in [*tiny[stage], *extra]) + "]"
            for stage, extra in EXTRA.items()]


def run_tiny_main(out: Path, timeout: int = 900) -> MainRun:
    """Run the tiny main job into ``out`` (a subprocess, OMP_NUM_THREADS=1) and check it exited 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "experiments.main", "main_scale=tiny", f"out_dir={out}", "threads=1",
                          *stage_lists()], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return MainRun(out, res.stdout, res.stderr)
