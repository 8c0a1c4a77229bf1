"""The report's document type, ``Section``, and its two renderings: Markdown and self-contained HTML.

Sections hold blocks (text, tables, plots, sub-headings, rows of plots);
rendering takes sections and writes nothing: ``analysis.report`` writes the files.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
from pathlib import Path

import pandas as pd

from analysis.figures import Plot
from analysis.tables import to_markdown

__all__ = ["Section", "render_markdown", "render_html", "MODEL_CARD_LINE"]


@dataclasses.dataclass
class Section:
    title: str
    blocks: list = dataclasses.field(default_factory=list)  # ("text", str) | ("table", DataFrame) | ("plot", Plot) | ("h3", str)

    def text(self, s: str) -> None:
        self.blocks.append(("text", s))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def plot(self, p: Plot) -> None:
        self.blocks.append(("plot", p))

    def sub(self, title: str) -> None:
        self.blocks.append(("h3", title))

    def row(self, plots: list[Plot]) -> None:
        """Plots side by side in the HTML (one after the other in Markdown)."""
        self.blocks.append(("row", list(plots)))


def render_markdown(header: dict, sections: list[Section], root: Path) -> str:
    """The report as Markdown; plots are linked relative to ``root`` (the results folder)."""
    out = [f"# {header['title']}", "", header["state_text"], "",
           f"_Generated {header['generated']} from the results folder `{root.name}`._", ""]
    if header.get("model_card"):
        out += [MODEL_CARD_LINE, ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for kind, value in section.blocks:
            if kind == "text":
                out += [value, ""]
            elif kind == "h3":
                out += [f"### {value}", ""]
            elif kind == "table":
                out += [to_markdown(value) if len(value) else "_(none)_", ""]
            elif kind in ("plot", "row"):
                for plot in value if kind == "row" else [value]:
                    out += _plot_markdown(plot, root)
    return "\n".join(out).rstrip() + "\n"


MODEL_CARD_LINE = ("**Model card**: [model_card.md](model_card.md), beside this report (intended use, data, results at "
                   "the operating point, calibration, limitations; `python -m analysis.model_card` rewrites it).")

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.15em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right;vertical-align:top}
th{background:#f2f2f2;white-space:normal;min-width:3.5em;max-width:11em;font-weight:600}
td{white-space:nowrap}td.text{white-space:normal;min-width:12em}th.l,td.l{text-align:left}
td .ci{color:#666;font-size:.86em}
td:first-child,th:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafafa}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.9em}
.state{padding:.5em .8em;border-radius:4px;background:#eef7ee;border:1px solid #9c9}
.state.partial{background:#fff6e0;border-color:#e0b040}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption,.note{color:#555;font-size:.88em}
.skipped{color:#8a5a00}
.row{display:flex;gap:1em;align-items:flex-start}.row figure{flex:1 1 0;min-width:0}
"""


def render_html(header: dict, sections: list[Section], root: Path) -> str:
    """The report as one self-contained HTML page (plots embedded)."""
    state = header["state"]
    body = [f"<h1>{html.escape(header['title'])}</h1>",
            f"<p class=\"state{' partial' if state['partial'] else ''}\">{_inline(header['state_text'])}</p>",
            f"<p class=\"note\">Generated {html.escape(header['generated'])} from the results folder "
            f"<code>{html.escape(root.name)}</code>.</p>",
            *([f"<p>{_inline(MODEL_CARD_LINE)}</p>"] if header.get("model_card") else [])]
    nav = ("<nav><ol>" + "".join(f"<li><a href=\"#{_anchor(s.title)}\">{html.escape(s.title)}</a></li>" for s in sections)
           + "</ol></nav>")
    for i, section in enumerate(sections):
        if i == 1:  # the contents after the first section: the answer comes first, on the first screen
            body.append(nav)
        body.append(f"<h2 id=\"{_anchor(section.title)}\">{html.escape(section.title)}</h2>")
        for kind, value in section.blocks:
            if kind == "text":
                body.append(_text_html(value))
            elif kind == "h3":
                body.append(f"<h3>{html.escape(value)}</h3>")
            elif kind == "table":
                body.append(_table_html(value) if len(value) else "<p><em>(none)</em></p>")
            elif kind == "plot":
                body.append(_plot_html(value))
            elif kind == "row":
                body.append("<div class=\"row\">" + "".join(_plot_html(p) for p in value) + "</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(header['title'])}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _plot_markdown(plot: Plot, root: Path) -> list[str]:
    if plot.path is None:
        return [f"**{plot.title}**: {plot.note}", ""]
    rel = plot.path.relative_to(root) if plot.path.is_relative_to(root) else Path(plot.path.name)
    return [f"![{plot.title}]({rel.as_posix()})", ""] + ([f"_{plot.note}_", ""] if plot.note else [])


def _plot_html(plot: Plot) -> str:
    if plot.path is None:
        return f"<p class=\"skipped\"><strong>{html.escape(plot.title)}</strong>: {_inline(plot.note)}</p>"
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    caption = html.escape(plot.note) if plot.note else ""
    return (f"<figure><img alt=\"{html.escape(plot.title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{caption}</figcaption></figure>")


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _inline(text: str) -> str:
    """The little Markdown the report's text uses: `code`, **bold**, [text](relative link); everything else escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\[([^\]]+)\]\(([\w./-]+)\)", r'<a href="\2">\1</a>', text)
    return text


TEXT_CELL = 48  # a cell longer than this (a description, an error line, a citation) may wrap
_NUMBER = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?%?( / [-+]?[\d.,]+)*")


def _table_html(frame: pd.DataFrame) -> str:
    """An HTML table of text cells: headers wrap, a cell's second line (an interval) sits under its value;
    numbers align right, words left."""
    def text(value) -> str:
        return "" if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)) else str(value)

    cells = [[text(v) for v in row] for row in frame.itertuples(index=False)]
    words = [any(c[j] and not _NUMBER.fullmatch(c[j].split("\n")[0]) for c in cells) for j in range(frame.shape[1])]
    head = "".join(("<th class=\"l\">" if w else "<th>") + f"{html.escape(str(c))}</th>" for c, w in zip(frame.columns, words))
    rows = []
    for row in cells:
        out = []
        for value, word in zip(row, words):
            first, *more = value.split("\n")
            inner = html.escape(first) + "".join(f"<br><span class=\"ci\">{html.escape(m)}</span>" for m in more)
            kind = " ".join(k for k, on in (("l", word), ("text", len(first) > TEXT_CELL)) if on)
            out.append(f"<td class=\"{kind}\">{inner}</td>" if kind else f"<td>{inner}</td>")
        rows.append("<tr>" + "".join(out) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _text_html(text: str) -> str:
    lines = text.splitlines()
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return "<p>" + "<br>".join(_inline(line) for line in lines) + "</p>"


