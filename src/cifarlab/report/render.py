"""Rendering the report templates (``templates/``, jinja2) into ``report.html`` and ``README.md``.

The HTML embeds every image as a base64 ``data:`` URI and its CSS inline, references no
URL and needs no JavaScript, so it opens offline and can be mailed as one file. The
Markdown holds the same content with the PNGs saved beside it in ``report_files/``,
ready to paste into a repository.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FILES_DIR = "report_files"


@dataclass
class Figure_:
    """A rendered figure: file name (in report_files/), alt text and PNG bytes."""

    name: str
    alt: str
    png: bytes


@dataclass
class ReportPaths:
    """Where the report went, and how long it took."""

    html: Path
    markdown: Path
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def _md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _pct(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}%}"


def _num(value: float, spec: str = ".3g") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def template_env(autoescape: bool):
    """The jinja2 environment over ``cifarlab/report/templates`` (autoescaped for HTML)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cifarlab.report", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["pct"] = _pct
    env.filters["num"] = _num
    env.filters["md"] = _md_cell
    return env


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render_html(template: str, context: dict[str, Any], figures: Sequence[Figure_]) -> str:
    """Render an HTML template with every figure embedded as a data URI (``images[name].src``)."""
    images = {f.name: {"src": data_uri(f.png), "alt": f.alt} for f in figures}
    return template_env(True).get_template(template).render(**context, images=images)


def render_report(out_dir: Path, context: dict[str, Any], figures: Sequence[Figure_]) -> ReportPaths:
    """Write report.html (embedded images) and README.md (+ report_files/*.png) from one context."""
    html_path = out_dir / "report.html"
    html_path.write_text(render_html("report.html.j2", context, figures), encoding="utf-8")
    files_dir = out_dir / FILES_DIR
    files_dir.mkdir(parents=True, exist_ok=True)
    md_images = {}
    files = []
    for f in figures:
        p = files_dir / f"{f.name}.png"
        p.write_bytes(f.png)
        files.append(p)
        md_images[f.name] = {"src": f"{FILES_DIR}/{p.name}", "alt": f.alt}
    md = template_env(False).get_template("report.md.j2").render(**context, images=md_images)
    md_path = out_dir / "README.md"
    md_path.write_text(md, encoding="utf-8")
    return ReportPaths(html=html_path, markdown=md_path, files=files)
