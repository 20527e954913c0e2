"""Render the report notebooks (jupytext percent scripts under ``notebooks/``) to HTML for a run dir.

``render_notebook(script, run_dir, out_html)``: jupytext reads the script, a cell that sets ``RUN_DIR`` (and
any extra parameters) is injected after the cell tagged ``parameters`` (papermill style), nbclient executes it
on the ``python3`` kernel of the current interpreter with ``SAG_RUN_DIR`` in its environment, and nbconvert
writes standalone HTML without the code (``exclude_input``: the jupytext source keeps it) and without warnings:
the kernel starts with ``TQDM_DISABLE=1`` (no progress bars), and stderr streams, where Python warnings and logging
go, are left out of the HTML and echoed to this process's stderr instead (so nothing is lost, only moved off the
page). Nothing touches the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUNS_ROOT = ROOT / "outputs" / "main"


def default_run_dir(root: str | Path = RUNS_ROOT) -> Path | None:
    """``$SAG_RUN_DIR`` if set, else the most recently modified run dir under ``outputs/main/`` (or None)."""
    if os.environ.get("SAG_RUN_DIR"):
        return Path(os.environ["SAG_RUN_DIR"])
    runs = [p for p in Path(root).glob("*") if p.is_dir()] if Path(root).is_dir() else []
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def available_tables(run_dir: str | Path | None) -> list[str]:
    """Names of the ``tables/*.parquet`` a run dir holds."""
    d = Path(run_dir or "") / "tables"
    return sorted(p.stem for p in d.glob("*.parquet")) if run_dir and d.is_dir() else []


def _parameter_cell(params: dict) -> str:
    lines = ["# Injected parameters (analysis.report.render_notebook)"]
    lines += [f"{k} = {str(v)!r}" if v is not None else f"{k} = None" for k, v in params.items()]
    return "\n".join(lines)


def render_notebook(script_path: str | Path, run_dir: str | Path, out_html: str | Path, *,
                    params: dict | None = None, timeout: int = 600, ipynb: str | Path | None = None,
                    title: str | None = None) -> Path:
    """Execute the jupytext script ``script_path`` on ``run_dir`` and write ``out_html``; returns its path.

    ``params``: further parameters to inject (e.g. ``{"CAPTURE_DIR": ..., "SWEEP_DIR": ...}``); ``ipynb``:
    also save the executed notebook there (with its code and stderr); ``title``: the page title (default: the
    script's stem). Raises nbclient's ``CellExecutionError`` if a cell fails."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    script = Path(script_path).resolve()
    nb = jupytext.read(script)
    values = {"RUN_DIR": str(Path(run_dir).resolve()), **(params or {})}
    cell = nbformat.v4.new_code_cell(_parameter_cell(values), metadata={"tags": ["injected-parameters"]})
    at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    nb.cells.insert(at, cell)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    env = dict(os.environ, SAG_RUN_DIR=values["RUN_DIR"], MPLBACKEND="Agg", TQDM_DISABLE="1")
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    if ipynb is not None:
        nbformat.write(nb, str(ipynb))
    _drop_stderr(nb, script.name)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or script.stem}})
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def render_reports(scripts: dict[str, Path], run_dir: str | Path, *, params: dict | None = None) -> list[Path]:
    """Render each jupytext script of ``scripts`` ({name: path}) on ``run_dir`` to ``<run_dir>/report/<name>.html``
    (printing "report: <path>" per page), then write ``<run_dir>/index.html`` (:mod:`analysis.index_page`).
    ``params``: further notebook parameters (e.g. CAPTURE_DIR, SWEEP_DIR). Returns the pages, the index last."""
    from analysis.index_page import write_index

    run_dir = Path(run_dir)
    pages = []
    for name, script in scripts.items():
        pages.append(render_notebook(script, run_dir, run_dir / "report" / f"{name}.html", params=params))
        print(f"report: {pages[-1]}", flush=True)
    return pages + [write_index(run_dir)]


def _drop_stderr(nb, name: str) -> None:
    """Remove stderr stream outputs from ``nb`` in place, echoing them to this process's stderr."""
    for cell in nb.cells:
        keep = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                print(f"[{name}] {out.get('text', '')}", end="", file=sys.stderr)
            else:
                keep.append(out)
        if "outputs" in cell:
            cell["outputs"] = keep


def show(fig):
    """Display a figure in a notebook as a PNG (works whatever the matplotlib backend) and close it."""
    import io

    from IPython.display import Image

    from analysis.figures import style

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    style.plt.close(fig)
    return Image(data=buf.getvalue(), format="png")


def table_or_none(run_dirs, name: str):
    """``tables/<name>.parquet`` from the first of ``run_dirs`` that has it, else None."""
    from analysis.figures.build import find_table

    return find_table(name, [d for d in run_dirs if d])
