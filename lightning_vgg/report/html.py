"""One report, two renderings: a self-contained HTML page and its Markdown twin.

A report is a list of :class:`Section` objects holding blocks (:class:`Para`,
:class:`Table`, :class:`Image`, nested sections). :func:`render_html` writes one HTML
file with inline CSS and every image embedded as a base64 ``data:`` URI, so it opens
anywhere (a mail attachment, an air-gapped machine) and loads nothing from outside;
:func:`render_markdown` writes the same content with the images as relative links to
the PNG files beside it. Building both from the same blocks keeps them in step.

Numbers go into tables as :class:`Cell` objects: the text shown, plus the exact value
as a ``data-value`` attribute in the HTML, so tests (and scripts) can read the numbers
back without parsing the formatted text. :func:`fmt` renders ``None`` and non-finite
values as "—", so no "nan" ever reaches a reader.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MISSING",
    "Cell",
    "Image",
    "Para",
    "Section",
    "Table",
    "ci_cell",
    "finite_or_none",
    "fmt",
    "markdown_table",
    "num_cell",
    "pm_cell",
    "render_html",
    "render_markdown",
]

#: What a missing or non-finite number is shown as.
MISSING = "—"


def finite_or_none(v: object) -> float | None:
    """``v`` as a float, or ``None`` where it is missing, not a number or not finite.

    Run files are written by other versions and by hand: a reader must see
    :data:`MISSING`, not ``nan`` or a crash.
    """
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt(value: float | int | None, kind: str = "float", digits: int = 4) -> str:
    """Format a number for a table: ``pct`` (``95.05%``), ``float`` or ``int``.

    ``None``, NaN and infinities become :data:`MISSING`.
    """
    if value is None:
        return MISSING
    v = float(value)
    if not math.isfinite(v):
        return MISSING
    if kind == "pct":
        return f"{v:.{max(digits - 2, 0)}%}"
    if kind == "int":
        return str(round(v))
    return f"{v:.{digits}f}"


@dataclass
class Cell:
    """One table cell: the text shown and, for numbers, the exact value behind it."""

    text: str
    value: float | None = None


def num_cell(v: object, kind: str = "float", digits: int = 4) -> Cell:
    """A table cell for a number (:func:`fmt`), its exact value kept when finite."""
    f = finite_or_none(v)
    return Cell(fmt(f, kind, digits), f)


def pm_cell(mean: object, std: object, digits: int = 3) -> Cell:
    """``mean ± std`` (just the mean when the std is missing); the value is the mean."""
    m, s = finite_or_none(mean), finite_or_none(std)
    if m is None:
        return Cell(MISSING)
    return Cell(f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}", m)


def ci_cell(
    mean: object, ci95: Sequence[float] | None, kind: str = "float", digits: int = 3
) -> Cell:
    """``mean [lo, hi]`` (the bootstrap 95 % interval); just the mean without one."""
    m = finite_or_none(mean)
    if m is None:
        return Cell(MISSING)
    text = fmt(m, kind, digits)
    if ci95 is not None:
        lo, hi = (finite_or_none(v) for v in ci95)
        text += f" [{fmt(lo, kind, digits)}, {fmt(hi, kind, digits)}]"
    return Cell(text, m)


@dataclass
class Para:
    """A paragraph; text in backticks is rendered as code. ``note`` styles it as an aside."""

    text: str
    note: bool = False


@dataclass
class Table:
    """A table with a header row; cells are :class:`Cell` or plain strings."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Cell | str]]
    caption: str = ""


@dataclass
class Image:
    """A PNG written beside the report; ``path`` is relative to the report's folder."""

    path: str
    alt: str
    caption: str = ""


@dataclass
class Section:
    """A titled section with a stable ``id`` (the HTML anchor)."""

    id: str
    title: str
    blocks: list[Para | Table | Image | Section] = field(default_factory=list)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2327; background: #fff; line-height: 1.45; }
main { max-width: 1500px; margin: 0 auto; padding: 1.2em 2em 4em; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.5em; }
nav ul { columns: 3; padding-left: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f5f7; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
figure { margin: 0.6em 0 1.4em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e8eb; }
figcaption { font-size: 0.9em; color: #57606a; }
code { background: #f3f5f7; padding: 0 0.25em; border-radius: 3px; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; }
"""


_LINK = re.compile(r"\[([^\]]+)\]\((#[\w\-]+)\)")


def _escape_with_links(text: str) -> str:
    """Escape ``text``; ``[words](#anchor)`` (Markdown's in-page link) becomes a link."""
    out, pos = [], 0
    for m in _LINK.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        out.append(f'<a href="{html.escape(m.group(2))}">{html.escape(m.group(1))}</a>')
        pos = m.end()
    return "".join(out) + html.escape(text[pos:])


def _inline_html(text: str) -> str:
    """Escape ``text``, turn `backticks` into ``<code>`` and ``[a](#id)`` into links."""
    parts = re.split(r"`([^`]*)`", text)
    return "".join(
        f"<code>{html.escape(p)}</code>" if i % 2 else _escape_with_links(p)
        for i, p in enumerate(parts)
    )


def _data_uri(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def _cell(c: Cell | str) -> Cell:
    return c if isinstance(c, Cell) else Cell(str(c))


def _html_blocks(blocks: Sequence[Para | Table | Image | Section], base: Path, level: int) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Section):
            out.append(_html_section(b, base, level))
        elif isinstance(b, Para):
            cls = ' class="note"' if b.note else ""
            out.append(f"<p{cls}>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            rows = ["<table>"]
            if b.caption:
                rows.append(f"<caption>{_inline_html(b.caption)}</caption>")
            rows.append(
                "<thead><tr>"
                + "".join(f"<th>{_inline_html(c)}</th>" for c in b.columns)
                + "</tr></thead><tbody>"
            )
            for row in b.rows:
                cells = []
                for raw in row:
                    c = _cell(raw)
                    attr = (
                        f' data-value="{c.value!r}"'
                        if c.value is not None and math.isfinite(c.value)
                        else ""
                    )
                    cells.append(f"<td{attr}>{_inline_html(c.text)}</td>")
                rows.append("<tr>" + "".join(cells) + "</tr>")
            rows.append("</tbody></table>")
            out.append("\n".join(rows))
        elif isinstance(b, Image):
            cap = f"<figcaption>{_inline_html(b.caption)}</figcaption>" if b.caption else ""
            out.append(
                f'<figure><img src="{_data_uri(base / b.path)}" alt="{html.escape(b.alt)}">'
                f"{cap}</figure>"
            )
        else:  # pragma: no cover - the block types above are all there is
            raise TypeError(f"unknown report block {type(b).__name__}")
    return "\n".join(out)


def _html_section(s: Section, base: Path, level: int) -> str:
    h = min(level, 6)
    return (
        f'<section id="{html.escape(s.id)}">\n<h{h}>{_inline_html(s.title)}</h{h}>\n'
        f"{_html_blocks(s.blocks, base, level + 1)}\n</section>"
    )


def render_html(title: str, intro: Sequence[Para], sections: Sequence[Section], base: Path) -> str:
    """The whole report as one self-contained HTML page.

    Args:
        title: Page title and heading.
        intro: Paragraphs under the heading.
        sections: Top-level sections; a table of contents links to each.
        base: Folder that :class:`Image` paths are relative to (their bytes are
            embedded).
    """
    toc = "".join(
        f'<li><a href="#{html.escape(s.id)}">{_inline_html(s.title)}</a></li>' for s in sections
    )
    body = "\n".join(_html_section(s, base, 2) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{html.escape(title)}</h1>\n{_html_blocks(list(intro), base, 2)}\n"
        f"<nav><ul>{toc}</ul></nav>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _md_escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Cell | str]]) -> str:
    """A GitHub-flavoured Markdown table; ``|`` in a cell is escaped, newlines joined.

    The one Markdown table writer of the reports (``report.md`` and a run's
    ``summary.md``), so both escape cells the same way.
    """
    lines = ["| " + " | ".join(_md_escape_cell(c) for c in columns) + " |"]
    lines.append("|" + "|".join(["---"] * len(columns)) + "|")
    lines += ["| " + " | ".join(_md_escape_cell(_cell(c).text) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_blocks(blocks: Sequence[Para | Table | Image | Section], level: int) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Section):
            out += _md_section(b, level)
        elif isinstance(b, Para):
            out.append(f"> {b.text}" if b.note else b.text)
        elif isinstance(b, Table):
            table = markdown_table(b.columns, b.rows)
            out.append(f"**{b.caption}**\n\n{table}" if b.caption else table)
        elif isinstance(b, Image):
            img = f"![{b.alt}]({b.path})"
            out.append(f"{img}\n\n*{b.caption}*" if b.caption else img)
    return out


def _md_section(s: Section, level: int) -> list[str]:
    return [
        f'{"#" * min(level, 6)} {s.title} <a id="{s.id}"></a>',
        *_md_blocks(s.blocks, level + 1),
    ]


def render_markdown(title: str, intro: Sequence[Para], sections: Sequence[Section]) -> str:
    """The same report as Markdown, images linked relative to the report's folder."""
    parts = [f"# {title}", *_md_blocks(list(intro), 2)]
    parts.append("\n".join(f"- [{s.title}](#{s.id})" for s in sections))
    for s in sections:
        parts += _md_section(s, 2)
    return "\n\n".join(parts) + "\n"
