"""kiln's Triton flash attention and elementwise chain kernels on the CPU, under Triton's interpreter, against
float64 references: odd sequence lengths, key and full masks, D of 64, 128 and not a power of two, 3-D and
4-D attention; chains with broadcast operands, reversed operand order and strided inputs; and the CUDA
lowering's candidates for both ops (names and fallbacks). The cases run in one subprocess
(triton_interpret_cases.py) so the interpreter's setting stays out of this process. Skipped without triton."""
import json
import os
import subprocess
import sys

import pytest
from backends.triton_interpret_cases import ATTENTION, ATTENTION_TOLERANCE, CANDIDATES, CHAIN_TOLERANCE, CHAINS

pytest.importorskip("triton")
pytest.importorskip("torch")

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def results() -> dict:
    root = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(HERE, "triton_interpret_cases.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_flash_attention_matches_float64(results, name):
    dtype = ATTENTION[name][5]
    assert results[f"attention:{name}"] < ATTENTION_TOLERANCE[dtype]


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_elementwise_chain_matches_float64(results, name):
    dtype = CHAINS[name][4]
    assert results[f"chain:{name}"] < CHAIN_TOLERANCE[dtype]


@pytest.mark.parametrize("name", CANDIDATES)
def test_candidates_are_offered_and_agree(results, name):
    errors = results[f"candidates:{name}"]
    if name.startswith("attention"):
        expected = {"triton-flash-m64-n64-w4-s2", "triton-flash-m128-n64-w4-s3", "triton-flash-m128-n128-w8-s2",
                    "triton-flash-m64-n32-w4-s3"}
        bound = 1e-5 if name.endswith("fp32") else 3e-3
    else:
        expected = {"torch", "triton-chain-b512-w4", "triton-chain-b1024-w4", "triton-chain-b2048-w8"}
        bound = 1e-6
    assert expected <= set(errors), errors
    assert all(error < bound for error in errors.values()), errors


def test_coalesce_merges_dims_every_input_walks_as_one():
    pytest.importorskip("triton")
    from kiln.backends.cuda.triton_elementwise import _coalesce

    # contiguous x and a last-axis bias [4]: [2, 3] merge for both, the last axis stays apart for the bias
    assert _coalesce([2, 3, 4], [[12, 4, 1], [0, 0, 1]]) == ([6, 4], [[4, 1], [0, 1]])
    assert _coalesce([2, 3, 4], [[12, 4, 1], [12, 4, 1]]) == ([24], [[1], [1]])
    assert _coalesce([1, 5, 1], [[5, 1, 1]]) == ([5], [[1]])  # size-1 dims dropped
    assert _coalesce([], [[], []]) == ([1], [[0], [0]])  # all scalars


def test_kernel_source_applies_ops_in_order_with_operand_sides():
    pytest.importorskip("triton")
    from kiln.backends.cuda.triton_elementwise import kernel_source, supported

    source = kernel_source("chain", ["Add", "Relu", "Sub"], [1, 0, -2], 2, 2)
    steps = [line.strip() for line in source.splitlines() if line.strip().startswith("v = ")]
    assert steps == ["v = x", "v = v + a1", "v = tl.maximum(v, 0.0)", "v = a2 - v"]
    assert supported(["Add", "Relu"], [1, 0]) and not supported(["Relu"], [1]) and not supported(["Mod"], [1])
