"""Run an entry point in this process: ``experiments.<command>.main()`` with ``sys.argv`` set (a subprocess would
spend ~6 s on imports)."""

from __future__ import annotations

import importlib
import sys

from hydra.core.global_hydra import GlobalHydra


def cli(capsys, command: str, *args: str) -> tuple[int, str, str]:
    """(exit status, stderr, stdout) of ``python -m experiments.<command> *args``, run in this process."""
    module = importlib.import_module(f"experiments.{command}")
    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, [command, *args]
    capsys.readouterr()
    try:
        module.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.err, out.out
