"""The operators table: docs/operators.md and `kiln ops` come from the registry plus the stored conformance run."""
from __future__ import annotations

import json

from kiln.cli import main
from kiln.tools import ops_table


def test_docs_are_regenerated_from_the_registry_and_the_stored_run():
    assert ops_table.DOCS.read_text() == ops_table.markdown_document(), \
        "docs/operators.md is stale: run .venv/bin/python tests/conformance/regenerate.py"


def test_rows_carry_opsets_dtypes_and_case_counts():
    rows = {(r["domain"], r["op"]): r for r in ops_table.operator_rows()}
    resize = rows[("ai.onnx", "Resize")]
    assert resize["opsets"] == [10, 11] and resize["cases"] >= 30 and resize["passed"] == resize["cases"]
    assert "float32" in rows[("ai.onnx", "Cast")]["dtypes"]
    untested = [r for r in rows.values() if r["cases"] is None]
    assert all(ops_table._cases(r) == "-" for r in untested)  # kiln-only operators (fused, plugins) show no count
    # every operator ONNX tests has a kernel, or runs as its ONNX function body
    assert all(r["opsets"] or r["notes"].startswith("runs as ONNX's function body") for r in rows.values() if r["cases"])
    assert rows[("ai.onnx", "RMSNormalization")]["passed"] == rows[("ai.onnx", "RMSNormalization")]["cases"] > 0
    summary = ops_table.load_conformance()["summary"]
    assert summary["node_cases"] >= 1884 and summary["kiln_pass"] >= summary["onnxruntime_pass"]


def test_kiln_ops_prints_the_same_table(capsys):
    assert main(["ops", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == ops_table.format_markdown(ops_table.operator_rows()).strip()
    assert main(["ops"]) == 0
    text = capsys.readouterr().out
    assert "operators supported" in text and "kiln passes" in text and "onnxruntime" in text
    assert main(["ops", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["op"] == "NonMaxSuppression" and r["passed"] == r["cases"] for r in rows)
