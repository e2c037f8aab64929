"""Reports a person can read: Markdown plus a self-contained HTML page.

Figures (:mod:`promptopt.plots`) are PNG files beside the report: Markdown links
them, the HTML version embeds them as base64, so it opens anywhere without the
toolkit.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any, Sequence

from .artifacts import atomic_write_text


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_to_html(md: str, base: Path) -> str:
    """A small Markdown → HTML converter for the subset our reports use (headings, tables,
    lists, images, code, paragraphs), embedding images as base64 so the page stands alone."""
    out, in_table, in_list, in_code = [], False, False, False

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
        return text

    for line in md.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        img = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", line.strip())
        if img:
            p = base / img.group(2)
            if p.is_file():
                data = base64.b64encode(p.read_bytes()).decode()
                out.append(f'<p><img alt="{html.escape(img.group(1))}" src="data:image/png;base64,{data}" '
                           'style="max-width:100%"></p>')
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append('<table border="1" cellspacing="0" cellpadding="4">')
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    body = "\n".join(out)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>promptopt report</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:0.9em}code,pre{background:#f4f4f4}</style></head><body>\n"
            f"{body}\n</body></html>\n")


def figures_and_command(figs: Sequence[tuple[str, str]], command: str | None) -> list[str]:
    """Markdown lines ending a run report: one section per (caption, image file), then the command that made it."""
    md: list[str] = []
    for caption, fname in figs:
        md += [f"### {caption}", "", f"![{caption}]({fname})", ""]
    if command:
        md += ["## Command", "", "```", command, "```", ""]
    return md


def write_report(run_dir: str | Path, markdown: str, name: str = "report") -> tuple[Path, Path]:
    """Write ``report.md`` and a self-contained ``report.html`` (images embedded) atomically."""
    run_dir = Path(run_dir)
    md_path = atomic_write_text(run_dir / f"{name}.md", markdown)
    html_path = atomic_write_text(run_dir / f"{name}.html", _md_to_html(markdown, run_dir))
    return md_path, html_path
