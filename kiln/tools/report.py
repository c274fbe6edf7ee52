"""`kiln report`: one self-contained HTML file (inline SVG, a few lines of inline JS, nothing fetched) with the
latency histogram, per-layer times, per-layer errors against onnxruntime, the memory timeline and the build summary."""
from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KilnError

WIDTH = 900
ROW = 16  # pixels per bar in the per-layer charts
MAX_LAYER_ROWS = 250  # beyond this the charts show the slowest / worst layers only

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 960px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 10px; text-align: left; }
th { cursor: pointer; background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
.num { text-align: right; font-variant-numeric: tabular-nums; } .fail { color: #b00020; font-weight: bold; }
.pass { color: #1b7f3b; font-weight: bold; } .note { color: #666; } svg text { font: 11px system-ui, sans-serif; }
"""

# Sorting tables by a click on a column header; the only script, and it touches nothing outside the page.
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (header, column) {
  header.addEventListener("click", function () {
    var table = header.closest("table"), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = header.dataset.order !== "asc";
    header.dataset.order = ascending ? "asc" : "desc";
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value || a.cells[column].textContent;
      var y = b.cells[column].dataset.value || b.cells[column].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.4g}"


# -- charts ------------------------------------------------------------------------------------------

def histogram_svg(values: list[float], unit: str = "ms", bins: int = 30) -> str:
    """Vertical bars: how many iterations fell in each latency bin."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return '<p class="note">no measurements</p>'
    low, high = float(data.min()), float(data.max())
    if high <= low:
        high = low + max(abs(low) * 1e-3, 1e-6)
    counts, edges = np.histogram(data, bins=bins, range=(low, high))
    height, left, bottom = 220, 50, 30
    plot_w, plot_h = WIDTH - left - 20, height - bottom - 10
    peak = max(int(counts.max()), 1)
    bar_w = plot_w / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" aria-label="latency histogram">']
    for i, count in enumerate(counts):
        h = plot_h * count / peak
        x, y = left + i * bar_w, 10 + plot_h - h
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}" fill="#3b73b9">'
                     f'<title>{_fmt(edges[i])}-{_fmt(edges[i + 1])} {unit}: {int(count)}</title></rect>')
    axis_y = 10 + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#444"/>')
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        x = left + plot_w * fraction
        anchor = "start" if fraction == 0 else "end" if fraction == 1 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="{anchor}">{_fmt(low + (high - low) * fraction)} {unit}</text>')
    parts.append(f'<text x="{left - 6}" y="16" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 6}" y="{axis_y}" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart_svg(rows: list[tuple[str, float, str]], unit: str, log: bool = False, floor: float = 1e-12) -> str:
    """Horizontal bars, one per (label, value, colour), on a linear or log10 scale."""
    if not rows:
        return '<p class="note">nothing to show</p>'
    label_w, right = 260, 90
    plot_w = WIDTH - label_w - right
    height = ROW * len(rows) + 24

    def scale(v: float) -> float:
        return math.log10(max(v, floor)) if log else max(v, 0.0)

    finite = [scale(v) for _, v, _ in rows if not math.isinf(v)]
    low = min(finite + [math.log10(floor) if log else 0.0]) if log else 0.0
    high = max(finite + [low + 1e-12])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img">']
    for i, (label, value, colour) in enumerate(rows):
        y = 4 + i * ROW
        length = plot_w if math.isinf(value) else plot_w * (scale(value) - low) / (high - low) if high > low else 0.0
        short = label if len(label) <= 38 else label[:17] + "..." + label[-18:]
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{_e(short)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{max(length, 1):.1f}" height="{ROW - 3}" fill="{colour}">'
                     f'<title>{_e(label)}: {_fmt(value)} {unit}</title></rect>')
        parts.append(f'<text x="{label_w + max(length, 1) + 4:.1f}" y="{y + 11}">{_fmt(value)}</text>')
    parts.append(f'<text x="{label_w}" y="{height - 4}" class="note">{unit}{" (log scale)" if log else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


def timeline_svg(timeline: list[dict]) -> str:
    """Host (and device) memory over time, with the phases marked."""
    if len(timeline) < 2:
        return '<p class="note">too few samples for a timeline</p>'
    height, left, bottom = 260, 70, 40
    plot_w, plot_h = WIDTH - left - 20, height - bottom - 20
    seconds = [s["seconds"] for s in timeline]
    end = max(seconds[-1], 1e-6)
    series = [("host", [s["host_bytes"] for s in timeline], "#3b73b9")]
    if any(s.get("device_bytes") for s in timeline):
        series.append(("device", [s["device_bytes"] for s in timeline], "#d9822b"))
    top = max(max(values) for _, values, _ in series) or 1
    mib = 1 << 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" aria-label="memory timeline">']
    previous = None
    for sample in timeline:
        if sample.get("label") and sample["label"] != previous:
            x = left + plot_w * sample["seconds"] / end
            parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{20 + plot_h}" stroke="#bbb" stroke-dasharray="3,3"/>'
                         f'<text x="{x + 3:.1f}" y="{14 + 12 * (len(parts) % 2)}">{_e(sample["label"])}</text>')
            previous = sample["label"]
    for name, values, colour in series:
        points = " ".join(f"{left + plot_w * t / end:.1f},{20 + plot_h - plot_h * v / top:.1f}" for t, v in zip(seconds, values))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"><title>{name} memory</title></polyline>')
    axis_y = 20 + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#444"/>')
    parts.append(f'<text x="{left - 6}" y="24" text-anchor="end">{top / mib:.0f} MiB</text>')
    parts.append(f'<text x="{left - 6}" y="{axis_y}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left}" y="{axis_y + 16}">0 s</text><text x="{left + plot_w}" y="{axis_y + 16}" text-anchor="end">{end:.2f} s</text>')
    for i, (name, _, colour) in enumerate(series):
        parts.append(f'<rect x="{left + 10 + 90 * i}" y="{axis_y + 24}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 24 + 90 * i}" y="{axis_y + 33}">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i in numeric and isinstance(cell, (int, float)):
                cells.append(f'<td class="num" data-value="{cell!r}">{_fmt(float(cell))}</td>')
            else:
                cells.append(f"<td>{cell if isinstance(cell, _Raw) else _e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


class _Raw(str):
    """Markup built here, inserted into a table cell as is."""


# -- the page ----------------------------------------------------------------------------------------

def render(*, title: str, engine, bench=None, comparison=None, memory: dict | None = None,
           timeline: list[dict] | None = None, notes: list[str] | None = None) -> str:
    """The HTML text of the report; any section whose data is missing says why instead."""
    from .memory import format_bytes

    sections = [f"<h1>{_e(title)}</h1>", f'<p class="note">written {_e(time.strftime("%Y-%m-%d %H:%M:%S"))} by kiln report</p>']
    for note in notes or []:
        sections.append(f'<p class="note">{_e(note)}</p>')

    plan, info = engine.plan, engine.plan.build_info
    counts: dict[str, int] = {}
    for layer in plan.layers.values():
        counts[layer.get("op", "?")] = counts.get(layer.get("op", "?"), 0) + 1
    precisions: dict[str, int] = {}
    for layer in plan.layers.values():
        precisions[layer.get("precision", "?")] = precisions.get(layer.get("precision", "?"), 0) + 1
    summary_rows = [["device", plan.target.get("device")], ["target", json.dumps(plan.target)],
                    ["layers", len(plan.graph.nodes)],
                    ["inputs", ", ".join(str(b) for b in engine.inputs)], ["outputs", ", ".join(str(b) for b in engine.outputs)],
                    ["precisions asked", ", ".join(k for k in ("fp16", "bf16", "tf32", "int8", "fp8", "best") if plan.config.get(k)) or "fp32"],
                    ["layer precisions", ", ".join(f"{k} {v}" for k, v in sorted(precisions.items()))],
                    ["build time", f"{info.get('build_seconds', '?')} s"],
                    ["built by", f"kiln {info.get('kiln')}, torch {info.get('torch')}, onnx {info.get('onnx')}, python {info.get('python')}"],
                    ["rewrites", ", ".join(f"{k} {v}" for k, v in sorted(info.get("counters", {}).items())) or "none"]]
    if plan.memory.get("peak_bytes") is not None:
        summary_rows.append(["activation arena", f"{format_bytes(plan.memory['peak_bytes'])} (every activation in its own "
                                                 f"buffer: {format_bytes(plan.memory.get('naive_bytes'))})"])
    summary_rows.append(["weights", format_bytes(sum(a.nbytes for a in plan.graph.initializers.values()))])
    sections.append("<h2>Build summary</h2>" + _table(["", ""], summary_rows))
    sections.append("<h3>Layers by operator</h3>" + _table(["operator", "layers"], sorted(([k, v] for k, v in counts.items()),
                                                                                          key=lambda r: -r[1]), {1}))

    sections.append("<h2>Latency</h2>")
    if bench is not None:
        stats = bench.stats("latency")
        sections.append(f"<p>{bench.iterations} iterations in {bench.wall_seconds:.2f} s on {_e(bench.device)}: "
                        f"throughput <b>{bench.throughput:.2f} qps</b>; latency " +
                        ", ".join(f"{k} {v:.3f} ms" for k, v in stats.items()) + "</p>")
        if bench.device == "cuda":
            sections.append("<p>split (mean): " + ", ".join(f"{label} {bench.stats(key)['mean']:.3f} ms" for label, key in (
                ("host-to-device", "h2d"), ("compute", "compute"), ("device-to-host", "d2h"))) + "</p>")
        sections.append(histogram_svg(bench.latency_ms))
    else:
        sections.append('<p class="note">not measured</p>')

    sections.append("<h2>Per-layer time</h2>")
    if bench is not None and bench.layers:
        layers = sorted(bench.layers, key=lambda r: -r["averageMs"])[:MAX_LAYER_ROWS]
        shown = [r for r in bench.layers if r in layers]
        if len(shown) < len(bench.layers):
            sections.append(f'<p class="note">the {len(shown)} slowest of {len(bench.layers)} layers, in execution order</p>')
        sections.append(f"<p>sum of layer means {bench.layer_sum_ms():.3f} ms over {bench.profile_iterations} profiled runs</p>")
        sections.append(bar_chart_svg([(f"{r['name']} ({r['op']})", r["averageMs"], "#3b73b9") for r in shown], "ms per run"))
        sections.append(_table(["layer", "op", "mean ms", "median ms", "%"],
                               [[r["name"], r["op"], r["averageMs"], r["medianMs"], r["percentage"]] for r in bench.layers], {2, 3, 4}))
    else:
        sections.append('<p class="note">no per-layer profile</p>')

    sections.append("<h2>Per-layer error against onnxruntime</h2>")
    if comparison is not None:
        verdict = '<span class="pass">PASS</span>' if comparison.passed else '<span class="fail">FAIL</span>'
        sections.append(f"<p>outputs: {verdict} (atol {comparison.atol:g}, rtol {comparison.rtol:g})</p>")
        sections.append(_table(["output", "result", "max abs", "mean abs", "max rel", "cosine", "outside tolerance"],
                               [[o.name, _Raw('<span class="pass">PASS</span>' if o.passed else f'<span class="fail">FAIL</span> {_e(o.problem)}'),
                                 o.max_abs, o.mean_abs, o.max_rel, o.cosine, o.outside] for o in comparison.outputs], {2, 3, 4, 5, 6}))
        if comparison.layers:
            first = comparison.first_failing_layer
            sections.append(f"<p>first layer outside tolerance: <b>{_e(first.layer)}</b> ({_e(first.op)}), output {_e(first.name)}</p>"
                            if first else f"<p>all {len(comparison.layers)} intermediate tensors that survived fusion are within tolerance</p>")
            worst = sorted(comparison.layers, key=lambda c: -c.max_abs)[:MAX_LAYER_ROWS]
            rows = [(f"{c.name} ({c.op})", c.max_abs, "#b00020" if not c.passed else "#1b7f3b") for c in comparison.layers if c in worst]
            sections.append(bar_chart_svg(rows, "max absolute error", log=True))
        else:
            sections.append('<p class="note">no intermediate tensors compared</p>')
    else:
        sections.append('<p class="note">not compared: give the .onnx model (--model) to compare against onnxruntime</p>')

    sections.append("<h2>Memory</h2>")
    if memory:
        line = f"peak host memory {format_bytes(memory.get('peak_host_bytes'))}"
        if memory.get("peak_device_bytes") is not None:
            line += f", peak device memory {format_bytes(memory['peak_device_bytes'])}"
        sections.append(f"<p>{_e(line)}</p>")
    sections.append(timeline_svg(timeline or []))

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n" + "\n".join(sections) +
            f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def make_report(path: str, output: str, config=None, *, model: str | None = None, feed_given: dict | None = None,
                shapes: dict | None = None, seed: int = 0, warmup_ms: float = 200.0, iterations: int = 10,
                duration_s: float = 1.0, atol: float = 1e-4, rtol: float = 1e-3) -> dict:
    """Build (or load) the engine, time and profile it, compare it layer by layer, and write the HTML to `output`."""
    from .bench import benchmark, open_engine, sample_feed
    from .compare import compare
    from .memory import MemoryMonitor

    device = getattr(config, "device", "cpu")
    is_model = str(path).endswith(".onnx")
    reference = model or (path if is_model else None)
    notes = []
    with MemoryMonitor(device=device) as monitor:
        engine = open_engine(path, config, monitor)
        feed = sample_feed(engine, seed, shapes, feed_given)
        comparison = None
        if reference is not None:
            monitor.mark("compare")
            comparison, _, _ = compare(reference, engine, feed, atol=atol, rtol=rtol, layerwise=True)
        else:
            notes.append("per-layer errors need the ONNX model the engine was built from: kiln report ENGINE --model MODEL.onnx")
        bench = benchmark(engine, feed, warmup_ms=warmup_ms, iterations=iterations, duration_s=duration_s, profile=True,
                          monitor=monitor)
    text = render(title=f"kiln report: {Path(path).name}", engine=engine, bench=bench, comparison=comparison,
                  memory=monitor.summary(), timeline=monitor.timeline, notes=notes)
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as error:
        raise KilnError(f"cannot write {output!r}: {error.strerror}", code="KILN-E203", hint="give a path in a writable directory") from None
    return {"output": output, "bench": bench, "comparison": comparison, "memory": monitor.summary()}
