"""The supported-operator table (kiln ops, docs/operators.md): the registry plus the stored conformance run.

Per operator: the opsets kiln registers kernels from, the element types, how many of ONNX's node test
cases for it pass (from kiln/tools/conformance.json, which tests/conformance/regenerate.py writes), and notes
(why the others fail). The dtypes column lists what the registry restricts the kernel to, else the element
types of the conformance cases that pass ("any" where the kernel is generic and no case exercises it).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

CONFORMANCE = Path(__file__).with_name("conformance.json")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "operators.md"


def load_conformance() -> dict:
    """{"summary": {...}, "ops": {op: {"pass", "total", "dtypes", "notes"}}}; empty when never generated."""
    if CONFORMANCE.exists():
        return json.loads(CONFORMANCE.read_text())
    return {"summary": {}, "ops": {}}


def summarize(results: list[dict]) -> dict:
    """Fold per-case results (tests/conformance/results.json) into per-operator counts and notes."""
    ops: dict[str, dict] = defaultdict(lambda: {"pass": 0, "total": 0, "dtypes": set(), "notes": []})
    for result in results:
        if result["kind"] != "node" or not result["op"]:
            continue
        entry = ops[result["op"]]
        entry["total"] += 1
        if result["kiln"] == "pass":
            entry["pass"] += 1
            entry["dtypes"].update(result.get("dtypes", []))
        elif len(entry["notes"]) < 2:
            entry["notes"].append(f"{result['name']}: {result.get('reason') or result['kiln_reason'][:90]}")
    node = [r for r in results if r["kind"] == "node"]
    models = [r for r in results if r["kind"] != "node"]
    summary = {"node_cases": len(node), "kiln_pass": sum(r["kiln"] == "pass" for r in node),
               "onnxruntime_pass": sum(r["onnxruntime"] == "pass" for r in node),
               "model_cases": len(models), "kiln_model_pass": sum(r["kiln"] == "pass" for r in models),
               "onnxruntime_model_pass": sum(r["onnxruntime"] == "pass" for r in models)}
    return {"summary": summary,
            "ops": {op: {**e, "dtypes": sorted(e["dtypes"])} for op, e in sorted(ops.items())}}


def operator_rows() -> list[dict]:
    from ..ops import registry

    conformance = load_conformance()["ops"]
    grouped = defaultdict(list)
    for definition in registry.all_ops():
        grouped[definition.key].append(definition)
    rows = []
    for (domain, op), definitions in sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1])):
        last = definitions[-1]
        tested = conformance.get(op if domain == "" else f"{domain}::{op}", {})
        dtypes = sorted(last.dtypes) if last.dtypes else tested.get("dtypes") or ["any"]
        rows.append({"domain": domain or "ai.onnx", "op": op, "opsets": [d.since for d in definitions],
                     "dtypes": dtypes, "passed": tested.get("pass"), "cases": tested.get("total"),
                     "notes": "; ".join(tested.get("notes", [])),
                     "plugin": f"{last.plugin.name} {last.plugin.version}" if last.plugin else ""})
    registered = {(r["domain"], r["op"]) for r in rows}
    for key, tested in conformance.items():  # operators ONNX tests that kiln has no kernel for
        domain, _, op = key.rpartition("::")
        if (domain or "ai.onnx", op) not in registered:
            how = "runs as ONNX's function body, expanded at parse" if _has_function_body(op, domain) else "not supported"
            rows.append({"domain": domain or "ai.onnx", "op": op, "opsets": [], "dtypes": tested["dtypes"],
                         "passed": tested["pass"], "cases": tested["total"],
                         "notes": "; ".join([how] + tested["notes"][:1]), "plugin": ""})
    return sorted(rows, key=lambda r: (r["domain"], r["op"]))


def _has_function_body(op: str, domain: str) -> bool:
    import onnx

    try:
        schema = onnx.defs.get_schema(op, onnx.defs.onnx_opset_version(), domain)
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


def _cases(row: dict) -> str:
    return f"{row['passed']}/{row['cases']}" if row["cases"] else "-"


def _summary_line() -> str:
    s = load_conformance()["summary"]
    if not s:
        return "No conformance run stored yet (tests/conformance/regenerate.py writes one)."
    return (f"ONNX node test cases: kiln passes {s['kiln_pass']} of {s['node_cases']} "
            f"({100 * s['kiln_pass'] / s['node_cases']:.1f}%); onnxruntime {s['onnxruntime_pass']} through the same harness. "
            f"Model tests (onnx/backend/test/data): kiln {s['kiln_model_pass']} of {s['model_cases']}, "
            f"onnxruntime {s['onnxruntime_model_pass']}.")


def format_markdown(rows: list[dict]) -> str:
    lines = ["| domain | operator | since opsets | dtypes | cases passed | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        notes = (f"plugin {r['plugin']}; " if r["plugin"] else "") + r["notes"]
        notes = notes.replace("|", "\\|")
        lines.append(f"| {r['domain']} | {r['op']} | {', '.join(map(str, r['opsets'])) or '-'} | "
                     f"{', '.join(r['dtypes']) or '-'} | {_cases(r)} | {notes} |")
    return "\n".join(lines)


def format_text(rows: list[dict]) -> str:
    lines = [f"{'operator':<28} {'domain':<16} {'since opsets':<16} {'cases':<8} dtypes"]
    for r in rows:
        lines.append(f"{r['op']:<28} {r['domain']:<16} {', '.join(map(str, r['opsets'])) or '-':<16} {_cases(r):<8} "
                     f"{', '.join(r['dtypes']) or '-'}" + (f"  (plugin {r['plugin']})" if r["plugin"] else "")
                     + (f"\n{'':<4}{r['notes'][:150]}" if r["notes"] else ""))
    supported = sum(1 for r in rows if r["opsets"])
    lines.append(f"{supported} operators supported")
    lines.append(_summary_line())
    return "\n".join(lines)


def markdown_document() -> str:
    return "\n".join([
        "# Operators",
        "",
        "Generated by `tests/conformance/regenerate.py` from kiln's operator registry and the stored run of ONNX's",
        "conformance suite (kiln/tools/conformance.json); `kiln ops --markdown` prints the same table. Do not edit by hand.",
        "",
        _summary_line(),
        "",
        "\"cases passed\" counts ONNX's node test cases whose graph is that one operator (expanded function-body cases",
        "and multi-node cases count in the total above, not per operator). Notes name up to two failing cases and why;",
        "tests/conformance/expected_failures.txt lists them all.",
        "",
        format_markdown(operator_rows()),
        "",
    ])


def write_docs(results_path: str | Path | None = None) -> None:
    """Store the per-operator summary of a conformance run and regenerate docs/operators.md."""
    if results_path is not None:
        CONFORMANCE.write_text(json.dumps(summarize(json.loads(Path(results_path).read_text())), indent=1) + "\n")
    DOCS.write_text(markdown_document())
