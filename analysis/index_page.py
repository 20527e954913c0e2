"""``<run_dir>/index.html``: one page that lists what a run produced and where, with relative links.

Sections: the HTML reports (every ``*.html`` under the run dir but this page), the figures (every file under a
``figures/`` dir, grouped by stem: a thumbnail of the PNG, links to PNG / PDF / CSV and the caption text where
``<name>.caption.txt`` exists), the tables (every ``*.parquet``, e.g. ``tables/``, ``capture/tables/``, with rows and
columns read from the parquet footer), the stage times (``main.json``) and the run's config
(``.hydra/config.yaml``, else ``run.json``). Links are relative, so the page works after the run dir is moved.

    python -m analysis.index_page <run_dir>     # writes <run_dir>/index.html and prints its path
"""

from __future__ import annotations

import html
import json
import sys
from collections import defaultdict
from pathlib import Path

from sag.io import atomic_write_text

INDEX = "index.html"
STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:24px;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:14px} td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;
vertical-align:top} th{background:#f3f3f3} img.thumb{max-width:220px;max-height:160px;border:1px solid #ccc}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow:auto;max-height:500px} .cap{color:#444;font-size:13px}
</style>"""


def _link(path: Path, root: Path, text: str | None = None) -> str:
    rel = path.relative_to(root).as_posix()
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def _reports(root: Path) -> str:
    pages = sorted(p for p in root.rglob("*.html") if p != root / INDEX)
    return "<ul>" + "".join(f"<li>{_link(p, root)}</li>" for p in pages) + "</ul>" if pages else "<p>none</p>"


def _figures(root: Path) -> str:
    groups: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.parent.name == "figures":
            stem, _, ext = p.name.partition(".")
            groups[(p.parent, stem)][ext] = p
    if not groups:
        return "<p>none</p>"
    rows = []
    for (parent, stem), files in sorted(groups.items()):
        png = files.get("png")
        thumb = f'<a href="{png.relative_to(root).as_posix()}"><img class="thumb" src="' \
                f'{png.relative_to(root).as_posix()}"/></a>' if png else ""
        links = " · ".join(_link(p, root, ext) for ext, p in sorted(files.items()))
        cap = files.get("caption.txt")
        text = html.escape(cap.read_text(encoding="utf-8").strip()) if cap else ""
        where = html.escape(parent.relative_to(root).as_posix())
        rows.append(f"<tr><td>{thumb}</td><td><b>{html.escape(stem)}</b><br>{where}/<br>{links}</td>"
                    f"<td class='cap'>{text}</td></tr>")
    return "<table><tr><th></th><th>figure</th><th>caption</th></tr>" + "".join(rows) + "</table>"


def _shape(path: Path) -> str:
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return f"{meta.num_rows} rows x {meta.num_columns} columns"
    except Exception as e:  # a damaged or partial file: say so instead of failing the page
        return f"unreadable ({type(e).__name__})"


def _tables(root: Path) -> str:
    paths = sorted(root.rglob("*.parquet"))
    if not paths:
        return "<p>none</p>"
    rows = "".join(f"<tr><td>{_link(p, root)}</td><td>{_shape(p)}</td></tr>" for p in paths)
    return "<table><tr><th>table</th><th>size</th></tr>" + rows + "</table>"


def _config(root: Path) -> str:
    for name in (".hydra/config.yaml", "run.json"):
        p = root / name
        if p.is_file():
            return f"<p>{_link(p, root)}</p><pre>{html.escape(p.read_text(encoding='utf-8'))}</pre>"
    return "<p>no .hydra/config.yaml or run.json in the run dir</p>"


def _stage_times(root: Path) -> str:
    p = root / "main.json"
    if not p.is_file():
        return ""
    try:
        stages = json.loads(p.read_text(encoding="utf-8")).get("stages", {})
    except json.JSONDecodeError:
        return f"<p>{_link(p, root)} (unreadable)</p>"
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.0f} s</td></tr>" for k, v in stages.items())
    return f"<h2>Stage times</h2><p>{_link(p, root)}</p><table>{cells}</table>"


def write_index(run_dir: str | Path, title: str | None = None) -> Path:
    """Write ``<run_dir>/index.html`` (module docstring) atomically and return its path. ``title``: the heading
    (default: "Run <dir name>")."""
    root = Path(run_dir).resolve()
    if not root.is_dir():
        from sag.errors import SagConfigError

        raise SagConfigError(f"run_dir={run_dir}: not a directory; accepted: a run dir (e.g. outputs/main/<run>)")
    head = html.escape(title or f"Run {root.name}")
    body = (f"<h1>{head}</h1><p class='cap'>{html.escape(str(root))}; links are relative to this page.</p>"
            f"<h2>Reports</h2>{_reports(root)}<h2>Figures</h2>{_figures(root)}<h2>Tables</h2>{_tables(root)}"
            f"{_stage_times(root)}<h2>Config</h2>{_config(root)}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{head}</title>{STYLE}</head>"
            f"<body>{body}</body></html>")
    out = root / INDEX
    atomic_write_text(out, page)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.index_page <run_dir>``: write the page and print its path."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m analysis.index_page <run_dir>", file=sys.stderr)
        return 2
    print(write_index(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
