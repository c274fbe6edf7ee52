"""If, Loop and Scan: bodies that read outer-scope values, carried values that change shape, nesting,
engine files that keep their subgraphs; checked against onnxruntime and ONNX's own node test cases."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import kiln
from helpers import assert_close, build_for_data, onnx_node_cases, run_onnxruntime

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, "control", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10  # older onnxruntime builds (the GPU machine's) read IR versions up to 13 only
    return model


def _build(model, profile=None, **options):
    config = kiln.BuilderConfig(**options)
    if profile:
        config.add_profile(profile)
    return kiln.build(model, config)


def _check(model, feed, tmp_path=None, rtol=1e-6, atol=1e-6, profile=None, **options):
    """kiln's outputs equal onnxruntime's; with tmp_path, also after a save/load round trip."""
    engine = _build(model, profile, **options)
    expected = run_onnxruntime(model, feed)
    engines = [engine]
    if tmp_path is not None:
        engine.save(tmp_path / "m.kiln")
        engines.append(kiln.load(tmp_path / "m.kiln"))
    for current in engines:
        got = current.run(feed)
        for name, value in expected.items():
            assert got[name].shape == value.shape, name
            assert_close(got[name], value, rtol=rtol, atol=atol, what=name)
    return engine


def _if_model():
    # Both branches read x and bias from the outer graph; they have no inputs of their own.
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "bias"], ["then_out"])], "then", [],
                                    [helper.make_tensor_value_info("then_out", F, [2, 3])])
    else_branch = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["squared"]),
                                     helper.make_node("Sub", ["squared", "bias"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", F, [2, 3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", F, [], [0.0])),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("bias", F, [3])],
                  [helper.make_tensor_value_info("y", F, [2, 3])])


def _if_feeds():
    rng = np.random.default_rng(0)
    bias = rng.standard_normal(3).astype(np.float32)
    return [{"x": (sign * np.abs(rng.standard_normal((2, 3)))).astype(np.float32), "bias": bias} for sign in (1.0, -1.0)]


def test_if_branches_read_outer_values_and_survive_save_load(tmp_path):
    model = _if_model()
    for feed in _if_feeds():  # one feed takes each branch
        _check(model, feed, tmp_path)


def test_branches_read_outer_values_that_optimizations_rewrite():
    # The outer values the branches read come out of nodes the passes remove, merge or fuse (an Identity,
    # a repeated MatMul that CSE merges, MatMul + Add + Relu that becomes one fused Gemm): the rewrites must
    # follow those names into the branches.
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    then_branch = helper.make_graph([helper.make_node("Add", ["same", "fused"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", F, [2, 3])])
    else_branch = helper.make_graph([helper.make_node("Sub", ["copy", "again"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", F, [2, 3])])
    nodes = [helper.make_node("Identity", ["x"], ["same"]),
             helper.make_node("MatMul", ["x", "w"], ["product"]),
             helper.make_node("MatMul", ["x", "w"], ["again"]),
             helper.make_node("Add", ["product", "b"], ["biased"]),
             helper.make_node("Relu", ["biased"], ["fused"]),
             helper.make_node("Identity", ["product"], ["copy"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, "rewritten", [helper.make_tensor_value_info("x", F, [2, 3]),
                                                    helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, [2, 3])],
                              [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for flag in (True, False):
        _check(model, {"x": x, "flag": np.array(flag)}, rtol=1e-5, atol=1e-5)


ROWS = {"rows0": ((1, 4), (1, 4), (4, 4))}  # the initial rows: 1 to 4 of them


def _loop_model():
    # Each iteration appends a row to the carried `rows` (its shape changes every time), reads `step` from
    # the outer graph, stops by its own condition once the running sum passes `limit`, and emits a scan output.
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["i_float"], to=F),
         helper.make_node("Mul", ["i_float", "step"], ["scaled"]),
         helper.make_node("Add", ["total_in", "scaled"], ["total_out"]),
         helper.make_node("ReduceSum", ["total_out"], ["total_sum"], keepdims=0),
         helper.make_node("Less", ["total_sum", "limit"], ["cond_out"]),
         helper.make_node("Unsqueeze", ["scaled", "axes0"], ["row"]),
         helper.make_node("Concat", ["rows_in", "row"], ["rows_out"], axis=0),
         helper.make_node("Identity", ["total_out"], ["scan_total"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total_in", F, [4]), helper.make_tensor_value_info("rows_in", F, [None, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("total_out", F, [4]),
         helper.make_tensor_value_info("rows_out", F, [None, 4]), helper.make_tensor_value_info("scan_total", F, [4])],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "axes0")])
    nodes = [helper.make_node("Loop", ["trip_count", "", "total0", "rows0"], ["total", "rows", "totals"], body=body)]
    model = _model(nodes, [helper.make_tensor_value_info("trip_count", TensorProto.INT64, []),
                           helper.make_tensor_value_info("total0", F, [4]), helper.make_tensor_value_info("rows0", F, [None, 4]),
                           helper.make_tensor_value_info("step", F, [4]), helper.make_tensor_value_info("limit", F, [])],
                   [helper.make_tensor_value_info(n, F, None) for n in ("total", "rows", "totals")])
    return model


def _loop_feeds():
    """By trip count, by condition, and no iteration at all."""
    step = np.abs(np.random.default_rng(1).standard_normal(4)).astype(np.float32)
    return [{"trip_count": np.array(trips, np.int64), "total0": np.zeros(4, np.float32),
             "rows0": np.zeros((1, 4), np.float32), "step": step, "limit": np.array(limit, np.float32)}
            for trips, limit in ((6, 1e9), (50, 12.0), (0, 1e9))]


def test_loop_carries_a_growing_value_and_collects_scan_outputs(tmp_path):
    model = _loop_model()
    for feed in _loop_feeds():
        _check(model, feed, tmp_path if feed["trip_count"] == 6 else None, profile=ROWS)
    engine = _build(model, ROWS)
    assert engine.run({**feed, "trip_count": np.array(0, np.int64)})["totals"].shape == (0, 4)


def _nested_model():
    # The If inside the loop body reads `scale`, defined two scopes up.
    then_branch = helper.make_graph([helper.make_node("Mul", ["acc_in", "scale"], ["a"])], "then", [],
                                    [helper.make_tensor_value_info("a", F, [3])])
    else_branch = helper.make_graph([helper.make_node("Add", ["acc_in", "scale"], ["b"])], "else", [],
                                    [helper.make_tensor_value_info("b", F, [3])])
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["two"], value=helper.make_tensor("two", TensorProto.INT64, [], [2])),
         helper.make_node("Mod", ["i", "two"], ["parity"]),
         helper.make_node("Cast", ["parity"], ["odd"], to=TensorProto.BOOL),
         helper.make_node("If", ["odd"], ["acc_out"], then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", F, [3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", F, [3])])
    nodes = [helper.make_node("Constant", [], ["trips"], value=helper.make_tensor("trips", TensorProto.INT64, [], [5])),
             helper.make_node("Loop", ["trips", "", "acc0"], ["acc"], body=body)]
    model = _model(nodes, [helper.make_tensor_value_info("acc0", F, [3]), helper.make_tensor_value_info("scale", F, [3])],
                   [helper.make_tensor_value_info("acc", F, [3])])
    return model


def _nested_feed():
    rng = np.random.default_rng(2)
    return {"acc0": rng.standard_normal(3).astype(np.float32), "scale": rng.standard_normal(3).astype(np.float32)}


def test_if_nested_in_loop_reads_the_outermost_graph():
    _check(_nested_model(), _nested_feed())


def _scan_model(offset_shape=(2,)):
    # Running sum over axis 1 of x, walked backwards, with an outer-scope offset; outputs stacked on axis 1, reversed.
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "x_t"], ["sum_out"]), helper.make_node("Add", ["sum_out", "offset"], ["y_t"])],
        "body", [helper.make_tensor_value_info("sum_in", F, [2]), helper.make_tensor_value_info("x_t", F, [2])],
        [helper.make_tensor_value_info("sum_out", F, [2]), helper.make_tensor_value_info("y_t", F, [2])])
    nodes = [helper.make_node("Scan", ["init", "x"], ["final", "ys"], body=body, num_scan_inputs=1,
                              scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[-1],
                              scan_output_directions=[1])]
    return _model(nodes, [helper.make_tensor_value_info("init", F, [2]), helper.make_tensor_value_info("x", F, [2, 5]),
                          helper.make_tensor_value_info("offset", F, list(offset_shape))],
                  [helper.make_tensor_value_info("final", F, [2]), helper.make_tensor_value_info("ys", F, [2, 5])])


def _scan_feed():
    rng = np.random.default_rng(3)
    return {"init": rng.standard_normal(2).astype(np.float32), "x": rng.standard_normal((2, 5)).astype(np.float32),
            "offset": rng.standard_normal(2).astype(np.float32)}


def test_scan_with_axes_directions_and_outer_values(tmp_path):
    _check(_scan_model(), _scan_feed(), tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_control_flow_runs_in_cuda_engines(precision, tmp_path):
    """If, Loop (with a nested If) and Scan in CUDA engines: the bodies run on the GPU with the values in scope,
    graph capture is off for them, and a saved engine reloads; fp16 engines within half precision's rounding."""
    options = {"device": "cuda", "fp16": precision == "fp16"}
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if precision == "fp32" else {"rtol": 1e-2, "atol": 1e-2}
    cases = [(_if_model(), _if_feeds(), None), (_loop_model(), _loop_feeds(), ROWS),
             (_nested_model(), [_nested_feed()], None), (_scan_model(), [_scan_feed()], None)]
    for model, feeds, profile in cases:
        for index, feed in enumerate(feeds):
            engine = _check(model, feed, tmp_path if index == 0 else None, profile=profile, **tolerance, **options)
        assert not engine.program.use_cuda_graph


def test_scan8_with_sequence_lengths_runs_at_its_own_opset():
    # onnx's converter refuses Scan-8 with sequence_lens; kiln has a Scan-8 kernel, so it runs the model as it is.
    # Each batch item is scanned backwards over its own length; outputs past it are zero.
    body = helper.make_graph([helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Mul", ["s_out", "x_t"], ["y_t"])],
                             "body", [helper.make_tensor_value_info("s_in", F, [2]), helper.make_tensor_value_info("x_t", F, [2])],
                             [helper.make_tensor_value_info("s_out", F, [2]), helper.make_tensor_value_info("y_t", F, [2])])
    node = helper.make_node("Scan", ["lens", "s0", "x"], ["s", "y"], body=body, num_scan_inputs=1, directions=[1])
    model = _model([node], [helper.make_tensor_value_info("lens", TensorProto.INT64, [3]), helper.make_tensor_value_info("s0", F, [3, 2]),
                            helper.make_tensor_value_info("x", F, [3, 4, 2])],
                   [helper.make_tensor_value_info("s", F, [3, 2]), helper.make_tensor_value_info("y", F, [3, 4, 2])], opset=8)
    model.ir_version = 3
    rng = np.random.default_rng(5)
    _check(model, {"lens": np.array([4, 2, 3], np.int64), "s0": rng.standard_normal((3, 2)).astype(np.float32),
                   "x": rng.standard_normal((3, 4, 2)).astype(np.float32)})


def test_a_body_failing_on_the_users_data_is_a_kiln_error():
    # The body adds the outer `offset` to a width-2 running sum: an offset of width 3 fails inside the body.
    engine = _build(_scan_model(offset_shape=("width",)), {"offset": ((1,), (2,), (4,))})
    with pytest.raises(kiln.KilnError) as caught:
        engine.run({"init": np.zeros(2, np.float32), "x": np.zeros((2, 5), np.float32), "offset": np.zeros(3, np.float32)})
    assert caught.value.code == "KILN-E407" and "Scan" in str(caught.value)


# ONNX's own node test cases for control flow (their inputs, expected outputs and tolerances). test_scan_sum is
# Scan-8 (batched), which runs at its own opset because onnx's converter to 9 changes the model's inputs.
NODE_CASES = ["test_if", "test_if_seq", "test_if_opt", "test_loop11", "test_loop13_seq", "test_loop16_seq_none",
              "test_scan_sum", "test_scan9_sum", "test_scan9_multi_state", "test_scan9_scalar",
              "test_range_float_type_positive_delta_expanded", "test_range_int32_type_negative_delta_expanded",
              "test_range_bfloat16_type_positive_delta_expanded"]  # 0-d bfloat16 inputs


def node_case(name: str):
    return onnx_node_cases("if_", "loop", "scan", "rangeop")[name]


def assert_matches(got, expected, rtol: float, atol: float, what: str) -> None:
    """Tensors, sequences (lists) and empty optionals (None), compared element by element."""
    if expected is None or isinstance(expected, list):
        assert (got is None) == (expected is None) and (expected is None or len(got) == len(expected)), what
        for index, (a, b) in enumerate(zip(got or [], expected or [])):
            assert_matches(a, b, rtol, atol, f"{what}[{index}]")
        return
    assert np.asarray(got).shape == np.asarray(expected).shape, what
    assert_close(got, expected, rtol=rtol, atol=atol, what=what)


def run_node_case(name: str) -> None:
    case = node_case(name)
    engine = build_for_data(case)
    names = [i.name for i in case.model.graph.input]
    for inputs, outputs in case.data_sets:
        got = engine.run(dict(zip(names, inputs)))
        for value, expected in zip(case.model.graph.output, outputs):
            assert_matches(got[value.name], expected, case.rtol, case.atol, f"{name}: {value.name}")


@pytest.mark.parametrize("name", NODE_CASES)
def test_onnx_node_case(name):
    run_node_case(name)
