"""The self-contained HTML page: summary table, figures (embedded PNG data URIs), notes and provenance.

One file that can be mailed, archived or opened offline: no external stylesheets, scripts, fonts or links to
files, only ``data:`` images and in-page ``#anchors``. Every piece of text that comes from a file (labels, specs,
argv, configurations) goes through :func:`html.escape`.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import shlex
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .load import Run
from .stats import summary_rows

__all__ = ["FigureEntry", "render_html"]


@dataclass
class FigureEntry:
    """A figure as the page shows it: anchor name, title, caption, PNG bytes, files written."""

    name: str
    title: str
    caption: str
    png: bytes
    files: list[str]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0 auto;max-width:1180px;
padding:1.2em 1.6em 3em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin:.2em 0 .1em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.3em 0 .4em}
.meta{color:#666;font-size:.9em}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em}
th,td{border:1px solid #d6d6d6;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f4f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.summary th:first-child{min-width:16em}
figure{margin:.6em 0 1.6em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.9em;margin-top:.3em}
code,pre{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.85em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
.notes li{color:#8a4b00}details summary{cursor:pointer;color:#0b57d0}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def _compact(value: Any) -> str:
    if isinstance(value, (dict, list, bool)) or value is None:
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _summary_table(runs: Sequence[Run], summaries: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(r.label)}</th>" for r in runs)
    out = [f'<table class="summary"><thead><tr><th>quantity</th>{head}</tr></thead><tbody>']
    out.append("<tr><th>hyperparameters</th>" + "".join(f"<td>{_e(r.full_label)}</td>" for r in runs) + "</tr>")
    out.append("<tr><th>results file</th>" + "".join(f"<td><code>{_e(os.path.basename(r.path))}</code></td>" for r in runs) + "</tr>")
    for label, cells in summary_rows(runs, summaries):
        out.append(f"<tr><th>{_e(label)}</th>" + "".join(f'<td class="num">{_e(c)}</td>' for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _provenance(run: Run, anchor: str) -> str:
    a, p = run.attrs, run.provenance
    rows: list[tuple[str, str]] = [
        ("results file", f"<code>{_e(run.path)}</code>"),
        ("results written by", _e(f"sgdwalk {a.get('sgdwalk_version', '?')}, {a.get('runs', '?')} analyze run(s), updated {a.get('updated', '?')}")),
        ("archive", f"<code>{_e(a.get('archive_path', '?'))}</code>"),
        ("archive created", _e(p.get("created", a.get("archive_created", "?")))),
        ("archive records", _e(a.get("archive_records", "?"))),
        ("archive id", f"<code>{_e(str(a.get('archive_id', '?'))[:16])}</code>"),
        ("hyperparameters", _e(run.full_label)),
    ]
    for key, label in (("model_spec", "model spec"), ("model_class", "model class"), ("data_spec", "data spec"),
                       ("optimizer", "optimizer"), ("seed", "seed"), ("schedule", "record schedule"),
                       ("metadata", "trainer metadata"), ("codec", "codec"), ("lossy", "lossy codec"),
                       ("sgdwalk_version", "recorded with sgdwalk"), ("torch_version", "torch")):
        if key in p:
            value = p[key]
            if key == "optimizer" and isinstance(value, Mapping):
                value = {"class": value.get("class"), "defaults": value.get("defaults")}
            rows.append((label, f"<code>{_e(_compact(value))}</code>"))
    if "argv" in p:
        argv = p["argv"]
        text = shlex.join(str(x) for x in argv) if isinstance(argv, list) else str(argv)
        rows.append(("command", f"<code>{_e(text)}</code>"))
    parts = [f'<h3 id="{_e(anchor)}">{_e(run.label)}</h3>', _kv_table(rows)]
    tables = ['<table><thead><tr><th>metric</th><th>config</th><th>rows</th><th>steps</th><th>settings</th></tr></thead><tbody>']
    for name, m in sorted(run.metrics.items()):
        steps = f"{int(m['step_a'].min())}–{int(m['step_b'].max())}" if m.rows else "–"
        tables.append(
            f"<tr><td>{_e(name)}</td><td><code>{_e(m.hash[:16])}</code></td><td class=\"num\">{m.rows}</td>"
            f"<td class=\"num\">{_e(steps)}</td><td>{_e(m.describe)}<details><summary>full configuration</summary>"
            f"<pre>{_e(_json(m.config))}</pre></details></td></tr>"
        )
    tables.append("</tbody></table>")
    parts += ["<p>Metric tables used (one configuration per metric):</p>", "".join(tables)]
    if run.unused:
        items = "".join(f"<li>{_e(metric)} <code>{_e(h[:16])}</code>: {_e(desc)} ({rows} rows)</li>"
                        for metric, lst in sorted(run.unused.items()) for h, desc, rows in lst)
        parts.append(f"<p>Other configurations in the file, not used (choose with <code>--config HASH</code> or "
                     f"<code>--eval</code>):</p><ul>{items}</ul>")
    return "\n".join(parts)


def render_html(*, title: str, runs: Sequence[Run], summaries: Sequence[Mapping[str, Any]],
                figures: Sequence[FigureEntry], notes: Sequence[str], files: Sequence[str], version: str,
                created: str | None = None) -> str:
    """The report page as one string."""
    created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    anchors = [f"run-{i + 1}" for i in range(len(runs))]
    nav = ['<a href="#summary">Summary</a>'] + [f'<a href="#fig-{_e(f.name)}">{_e(f.title)}</a>' for f in figures]
    nav += ['<a href="#provenance">Provenance</a>', '<a href="#files">Files</a>']
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">sgdwalk {_e(version)} report of {len(runs)} run{"s" if len(runs) != 1 else ""}, '
        f"generated {_e(created)}</p>",
        f"<nav>{''.join(nav)}</nav>",
        '<h2 id="summary">Summary</h2>',
        _summary_table(runs, summaries),
    ]
    if notes:
        body.append('<h3 id="notes">Notes</h3><ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    for f in figures:
        data = base64.b64encode(f.png).decode("ascii")
        names = ", ".join(os.path.basename(p) for p in f.files)
        body.append(
            f'<h2 id="fig-{_e(f.name)}">{_e(f.title)}</h2><figure><img src="data:image/png;base64,{data}" '
            f'alt="{_e(f.title)}"><figcaption>{_e(f.caption)}'
            + (f" Files: <code>{_e(names)}</code>." if names else "")
            + "</figcaption></figure>"
        )
    body.append('<h2 id="provenance">Provenance</h2>')
    for run, anchor in zip(runs, anchors):
        body.append(_provenance(run, anchor))
    body.append('<h2 id="files">Files</h2><p>Written next to this page:</p><ul>'
                + "".join(f"<li><code>{_e(name)}</code></li>" for name in files) + "</ul>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
