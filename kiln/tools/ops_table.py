"""The supported-operator table, generated from the registry (kiln ops, docs/operators.md)."""
from __future__ import annotations

from collections import defaultdict


def operator_rows() -> list[dict]:
    from ..ops import registry

    grouped = defaultdict(list)
    for definition in registry.all_ops():
        grouped[definition.key].append(definition)
    rows = []
    for (domain, op), definitions in sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1])):
        last = definitions[-1]
        rows.append({"domain": domain or "ai.onnx", "op": op, "opsets": [d.since for d in definitions],
                     "dtypes": sorted(last.dtypes) if last.dtypes else ["any"],
                     "plugin": f"{last.plugin.name} {last.plugin.version}" if last.plugin else ""})
    return rows


def format_markdown(rows: list[dict]) -> str:
    lines = ["| domain | operator | since opsets | dtypes | plugin |", "|---|---|---|---|---|"]
    lines += [f"| {r['domain']} | {r['op']} | {', '.join(map(str, r['opsets']))} | {', '.join(r['dtypes'])} | {r['plugin']} |"
              for r in rows]
    return "\n".join(lines)


def format_text(rows: list[dict]) -> str:
    lines = [f"{'operator':<28} {'domain':<14} {'since opsets':<18} dtypes"]
    lines += [f"{r['op']:<28} {r['domain']:<14} {', '.join(map(str, r['opsets'])):<18} {', '.join(r['dtypes'])}"
              + (f"  (plugin {r['plugin']})" if r["plugin"] else "") for r in rows]
    lines.append(f"{len(rows)} operators")
    return "\n".join(lines)
