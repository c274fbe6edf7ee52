"""ONNX's conformance suite through kiln's CPU engine, against the expected-failures list, both ways.

Every node case from onnx.backend.test.case.node.collect_testcases and every model test under
onnx/backend/test/data (pytorch-converted, pytorch-operator, simple, light) runs with its own rtol/atol.
A case that fails and is not listed in expected_failures.txt fails the test; so does a listed case that passes
(take it off the list), unless its reason starts "random:" (sampled values that may match the expected ones by chance). onnxruntime runs the same cases through the same harness, for the count beside kiln's.
"""
from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402

BATCHES = 6


@functools.lru_cache(maxsize=1)
def _node_cases():
    return harness.node_cases()


def _check(cases, capsys=None):
    listed = harness.read_expected_failures()
    kiln, ort = Counter(), Counter()
    unexpected, fixed = [], []
    for case in cases:
        status, reason = harness.run_case(case, "kiln")
        kiln[status] += 1
        ort[harness.run_case(case, "onnxruntime")[0]] += 1
        if status != "pass" and case.name not in listed:
            unexpected.append(f"{case.name}: {status}: {reason}")
        # a random operator's case listed as "random:" can pass by chance (test_bernoulli draws 10 bits): not a fix
        if status == "pass" and case.name in listed and not listed[case.name].startswith("random:"):
            fixed.append(case.name)
    print(f"{len(cases)} cases; kiln pass {kiln['pass']} wrong {kiln['wrong']} error {kiln['error']}; "
          f"onnxruntime pass {ort['pass']} wrong {ort['wrong']} error {ort['error']}")
    assert not unexpected, "cases failing that expected_failures.txt does not list:\n" + "\n".join(unexpected)
    assert not fixed, "cases now passing: take them off expected_failures.txt:\n" + "\n".join(fixed)


@pytest.mark.parametrize("batch", range(BATCHES))
def test_node_cases(batch):
    cases = _node_cases()
    assert len(cases) >= 1884  # onnx 1.23 generates 1,884; nothing dropped from the denominator
    _check(cases[batch::BATCHES])


def test_model_cases():
    cases = harness.all_model_cases()
    assert {c.kind for c in cases} == {"pytorch-converted", "pytorch-operator", "simple", "light"}
    _check(cases)


def test_stored_results_match_the_list_and_beat_onnxruntime():
    """The stored run (regenerate.py) agrees with the list, passes at least 97% of node cases and no fewer than
    onnxruntime through the same harness."""
    results = json.loads(harness.RESULTS.read_text())
    listed = harness.read_expected_failures()
    assert {r["name"] for r in results if r["kiln"] != "pass"} == set(listed)
    assert all(reason for reason in listed.values()), "every expected failure needs a one-line reason"
    node = [r for r in results if r["kind"] == "node"]
    kiln = sum(r["kiln"] == "pass" for r in node)
    ort = sum(r["onnxruntime"] == "pass" for r in node)
    print(f"node cases: kiln {kiln} / {len(node)} ({100 * kiln / len(node):.1f}%), onnxruntime {ort}")
    assert kiln >= ort and kiln >= 0.97 * len(node)


def test_case_comparison_catches_wrong_answers():
    import numpy as np

    harness.compare(np.ones(3, np.float32), np.ones(3, np.float32) + 1e-6, 1e-3, 1e-7)
    for bad in (np.ones(3, np.float64), np.ones(4, np.float32), np.full(3, 1.1, np.float32), [np.ones(3, np.float32)]):
        with pytest.raises(AssertionError):
            harness.compare(np.ones(3, np.float32), bad, 1e-3, 1e-7)
