"""Re-run the whole conformance suite through kiln and onnxruntime; rewrite results.json and expected_failures.txt.

    .venv/bin/python tests/conformance/regenerate.py [--jobs 2]

Reasons already written in expected_failures.txt by hand (after "# ") are kept for cases that still fail;
new failures get the error's first line. docs/operators.md is regenerated from the new results.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import harness  # noqa: E402
import onnx  # noqa: E402

_CASES: dict = {}


def _work(args):
    kind, index = args
    if kind not in _CASES:
        _CASES[kind] = harness.node_cases() if kind == "node" else harness.all_model_cases()
    case = _CASES[kind][index]
    kiln = harness.run_case(case, "kiln")
    ort = harness.run_case(case, "onnxruntime")
    dtypes = sorted({onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
                     for i in case.model.graph.input[:1] if i.type.HasField("tensor_type")})
    return {"name": case.name, "kind": case.kind, "op": harness.case_operator(case), "dtypes": dtypes,
            "kiln": kiln[0], "kiln_reason": kiln[1], "onnxruntime": ort[0], "onnxruntime_reason": ort[1]}


# Why whole groups of cases fail, by case name; anything else gets its error's first line.
KNOWN = [
    (r"bernoulli|training_dropout",
     "random: the expected values come from numpy's generator, which kiln's torch sampling does not reproduce"),
    (r"gradient_of", "Gradient (ai.onnx.preview.training) needs automatic differentiation of the graph: out of scope"),
    (r"quantizelinear_(u?int[24])",
     "QuantizeLinear into 2/4-bit types saturates to the 8-bit range (kiln/ops/quantize.py, INT8 engineer's)"),
    (r"attention_4d_causal_fp16", "fp16: 2 of 192 values differ by one fp16 ulp (0.0005) from the reference, "
                                  "with or without optimization; the case's atol 1e-7 allows none"),
    (r"flexattention_score_mod", "the optimizer's attention fusion (kiln::Attention) makes a layer that fails on this "
                                 "score_mod graph (IndexError, 0-d operand); passes with optimize=False"),
]


def _known_reason(result: dict) -> str | None:
    import re

    for pattern, reason in KNOWN:
        if re.search(pattern, result["name"]):
            return reason
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    counts = {"node": len(harness.node_cases()), "model": len(harness.all_model_cases())}
    work = [("node", i) for i in range(counts["node"])] + [("model", i) for i in range(counts["model"])]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_work, work, chunksize=16))
    results.sort(key=lambda r: (r["kind"] != "node", r["kind"], r["name"]))

    old = {name: reason for name, reason in harness.read_expected_failures().items()
           if not reason.startswith(("error:", "wrong:"))}  # reasons written by hand are kept
    lines = ["# Cases kiln does not pass, one per line: name  # reason.",
             "# tests/conformance/test_conformance.py enforces this list both ways; regenerate with",
             "# .venv/bin/python tests/conformance/regenerate.py"]
    for r in results:
        if r["kiln"] != "pass":
            r["reason"] = _known_reason(r) or old.get(r["name"]) or f"{r['kiln']}: {r['kiln_reason']}"
            lines.append(f"{r['name']}  # {r['reason']}")
    harness.EXPECTED_FAILURES.write_text("\n".join(lines) + "\n")
    harness.RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    for kind in ("node", "model"):
        subset = [r for r in results if (r["kind"] == "node") == (kind == "node")]
        k, o = Counter(r["kiln"] for r in subset), Counter(r["onnxruntime"] for r in subset)
        print(f"{kind}: {len(subset)} cases; kiln pass {k['pass']} wrong {k['wrong']} error {k['error']}; "
              f"onnxruntime pass {o['pass']} wrong {o['wrong']} error {o['error']}")
    from kiln.tools.ops_table import write_docs

    write_docs(harness.RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
