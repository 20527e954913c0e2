"""One-line user errors of the entry points: every error a user can cause (:func:`user_error_line`) ends the command
with exit status 2 and one line ``error: <what>; accepted: <what works>`` on stderr, no traceback.
``SAG_DEBUG=1`` raises it with its traceback instead. :mod:`experiments.cli` applies it to every Hydra job."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sag.errors import SagConfigError

DEBUG_ENV = "SAG_DEBUG"  # SAG_DEBUG=1: user errors are raised with their traceback instead of one line
HANDLERS = [0]  # active user_errors / entry_point handlers: only the outermost one reports
# exception classes of modules that load torch: matched only if their module was imported (it raised them)
_LAZY_USER_ERRORS = (("sag.sampling", "NonFiniteError"), ("sag.records", "RecordsError"),
                     ("analysis.tables", "TableError"))


def debugging() -> bool:
    """Whether ``SAG_DEBUG`` asks for tracebacks (any value but empty, 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text) -> str:
    """A multi-line message on one line: lines joined by "; " (by " " after a "." or ":"), the lines after one
    ending in ":" (a listing) by ", "."""
    out, listing = "", False
    for line in (s.strip() for s in str(text).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith((":", ".")) else ", " if listing else "; ") + line
            listing = listing or out.endswith(":")
    return out


def _os_error_line(e: OSError) -> str | None:
    where, out = e.filename or "a file of the output dir", "(hydra.run.dir=<dir>)"
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {where}; accepted: free disk space, or another disk {out}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {e.strerror or 'not writable'} (read-only?); accepted: a writable output dir {out}"
    return f"{e.filename}: {e.strerror or _one_line(e)}" if e.filename else None


def user_error_line(e: BaseException) -> str | None:
    """The one line (without ``error:``) for an error the user caused; None for anything else (a bug).

    User errors: :class:`~sag.errors.SagConfigError` (also raised inside ``hydra.utils.instantiate``), the records
    and table readers' errors, NaN/Inf from the model (``NonFiniteError``), Hydra's composition errors (unknown
    key, missing option), OmegaConf key errors, and OS errors on a named file (no space, read-only, missing)."""
    from hydra.errors import HydraException, InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, InstantiationException):
        return user_error_line(e.__cause__) if e.__cause__ is not None else None
    lazy = tuple(getattr(sys.modules[m], n) for m, n in _LAZY_USER_ERRORS if m in sys.modules)
    if isinstance(e, (SagConfigError, *lazy)):
        return _one_line(e)
    if isinstance(e, HydraException):  # composition: an unknown key, a missing config option, a bad override
        why = _one_line(e.__cause__).split("; full_key")[0] if isinstance(e.__cause__, OmegaConfBaseException) else ""
        return _one_line(e) + (f" ({why})" if why else "")
    if isinstance(e, OmegaConfBaseException):
        return _one_line(e).split("; object_type")[0]
    if isinstance(e, OSError):
        return _os_error_line(e)
    if "No space left on device" in str(e) or "StorageFull" in str(e):  # e.g. safetensors' SafetensorError
        return _os_error_line(OSError(errno.ENOSPC, "No space left on device", None))
    cause = e.__cause__ or e.__context__  # e.g. logging's ValueError around the job log's PermissionError
    return _os_error_line(cause) if isinstance(cause, OSError) else None


def report(line: str) -> None:
    """Print ``error: <line>`` on stderr."""
    print(f"error: {line}", file=sys.stderr, flush=True)


def exit_if_user_error(e: Exception) -> None:
    """For a user error (:func:`user_error_line`): print its line and exit 2; else (a bug, or ``SAG_DEBUG``) return,
    and the caller re-raises it with its traceback."""
    line = user_error_line(e)
    if line is not None and not debugging():
        report(line)
        sys.exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error (:func:`user_error_line`) into one line on stderr and exit status 2 (no traceback);
    inside an :func:`experiments.cli.entry_point` job (or another ``user_errors``) it lets the error through to
    that handler."""
    if HANDLERS[0]:
        yield
        return
    HANDLERS[0] += 1
    try:
        yield
    except Exception as e:
        exit_if_user_error(e)
        raise
    finally:
        HANDLERS[0] -= 1


@contextmanager
def composition_errors() -> Iterator[None]:
    """Hydra's errors before the job (unknown key, missing option, bad override) as one line, exit 2. Hydra
    re-raises them (instead of printing and exiting 1) under HYDRA_FULL_ERROR=1, set for the call."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as e:
        exit_if_user_error(e)
        raise
    finally:
        os.environ.pop("HYDRA_FULL_ERROR") if saved is None else os.environ.update(HYDRA_FULL_ERROR=saved)
