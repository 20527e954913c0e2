"""Run dirs and refusals of the Hydra entry points (one-line errors: :mod:`experiments.errors`).

- :func:`entry_point` replaces ``@hydra.main``: Hydra's own errors and the job's user errors end with exit 2 and
  one line (``SAG_DEBUG=1``: the traceback). ``.hydra/{config,hydra,overrides}.yaml`` are written when the job
  *succeeds* (conf/hydra/default.yaml sets ``hydra.output_subdir: null``), so a refused rerun cannot overwrite
  the config of the run its dir holds; a refused fresh run removes the empty run dir Hydra made for it.
- ``--multirun``: a refused job prints its line and the other jobs run; :class:`RefusalReport` (a Hydra callback)
  lists the refused jobs at the end and exits 2. The refusals go through ``<sweep dir>/refused.txt``, so
  launchers that run jobs in other processes report them too.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback

from experiments.errors import HANDLERS, composition_errors, debugging, report, user_error_line
from experiments.rundirs import remove_if_fresh, save_hydra_config

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: also right for in-process main() calls
REFUSED_FILE = "refused.txt"  # in a multirun's sweep dir: one line per refused job, read by RefusalReport


def _refuse(hc, line: str, save_config: bool) -> None:
    """Report a refused job: exit 2, or in a multirun record it for :class:`RefusalReport` and return."""
    from hydra.types import RunMode

    multirun = hc.mode == RunMode.MULTIRUN
    line = f"job {hc.job.num} ({' '.join(hc.overrides.task)}): {line}" if multirun else line
    report(line)
    if save_config:
        remove_if_fresh(Path(hc.runtime.output_dir), hc.job.name)
    if not multirun:
        sys.exit(2)
    with open(Path(hc.sweep.dir) / REFUSED_FILE, "a") as f:
        f.write(line + "\n")


def _job(fn: Callable, save_config: bool) -> Callable:
    """The task function Hydra runs: ``fn(cfg)`` with user errors reported (exit 2; in a multirun: recorded for
    :class:`RefusalReport` and the next job runs) and ``.hydra/`` written on success."""

    @functools.wraps(fn)
    def job(cfg):
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        HANDLERS[0] += 1
        try:
            result = fn(cfg)
        except Exception as e:
            line = user_error_line(e)
            if line is None or debugging():
                raise
            return _refuse(hc, line, save_config)
        finally:
            HANDLERS[0] -= 1
        if save_config:
            save_hydra_config(Path(hc.runtime.output_dir), cfg)
        return result

    return job


def entry_point(config_name: str, *, save_config: bool = True) -> Callable:
    """``@hydra.main(version_base="1.3", config_path=<repo>/conf, config_name=config_name)`` with one-line user
    errors (exit 2), ``.hydra/`` written when the job succeeds (``save_config=False``: commands without a run
    dir of their own, e.g. figures, merge) and multirun refusals reported at the end (module docstring)."""
    import hydra

    def decorate(fn: Callable) -> Callable:
        app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(_job(fn, save_config))

        @functools.wraps(fn)
        def main() -> None:
            with composition_errors():
                app()

        return main

    return decorate


class RefusalReport(Callback):
    """Hydra callback: after a multirun, the refused jobs again (``<sweep dir>/refused.txt``) and exit status 2."""

    def on_multirun_start(self, config, **kwargs) -> None:
        """Forget the refusals of an earlier multirun into the same sweep dir."""
        (Path(config.hydra.sweep.dir) / REFUSED_FILE).unlink(missing_ok=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        """Print the refused jobs (one line each) and exit 2 if there are any."""
        path = Path(config.hydra.sweep.dir) / REFUSED_FILE
        if lines := (path.read_text().splitlines() if path.is_file() else []):
            print(f"error: {len(lines)} job(s) of the multirun refused (the others ran):", *lines, sep="\n  ",
                  file=sys.stderr)
            sys.exit(2)
