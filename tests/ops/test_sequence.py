"""Sequence and optional values: the Sequence*/Optional* operators, engines that take and return Python
lists and None, and engine files that keep those binding kinds; checked against onnxruntime and ONNX's node cases."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import kiln
from helpers import assert_close, build_for_data, onnx_node_cases, run_onnxruntime

F = TensorProto.FLOAT
SEQ_F = helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, None))


def _model(nodes, inputs, outputs, opset=18):
    graph = helper.make_graph(nodes, "sequences", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _sequence_ops_model():
    # Split x into a sequence, insert y at the front, erase the last element, read one element, count them,
    # then stack what is left: every Sequence* operator on one path.
    nodes = [helper.make_node("SplitToSequence", ["x"], ["pieces"], axis=1, keepdims=0),
             helper.make_node("Constant", [], ["front"], value=helper.make_tensor("front", TensorProto.INT64, [], [0])),
             helper.make_node("SequenceInsert", ["pieces", "y", "front"], ["with_y"]),
             helper.make_node("SequenceErase", ["with_y"], ["trimmed"]),
             helper.make_node("Constant", [], ["minus2"], value=helper.make_tensor("minus2", TensorProto.INT64, [], [-2])),
             helper.make_node("SequenceAt", ["trimmed", "minus2"], ["second_last"]),
             helper.make_node("SequenceLength", ["trimmed"], ["count"]),
             helper.make_node("ConcatFromSequence", ["trimmed"], ["stacked"], axis=-1, new_axis=1),
             helper.make_node("SequenceConstruct", ["second_last", "y"], ["pair"]),
             helper.make_node("ConcatFromSequence", ["pair"], ["joined"], axis=0)]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [3, 4]), helper.make_tensor_value_info("y", F, [3])],
                  [helper.make_tensor_value_info("stacked", F, None), helper.make_tensor_value_info("second_last", F, None),
                   helper.make_tensor_value_info("count", TensorProto.INT64, None),
                   helper.make_tensor_value_info("joined", F, None), helper.make_value_info("pieces", SEQ_F)])


def test_sequence_operators_match_onnxruntime(tmp_path):
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((3, 4)).astype(np.float32), "y": rng.standard_normal(3).astype(np.float32)}
    model = _sequence_ops_model()
    expected = run_onnxruntime(model, feed)
    engine = kiln.build(model)
    engine.save(tmp_path / "m.kiln")
    for current in (engine, kiln.load(tmp_path / "m.kiln")):
        got = current.run(feed)
        for name in ("stacked", "second_last", "count", "joined"):
            assert got[name].shape == expected[name].shape, name
            assert_close(got[name], expected[name], rtol=0, atol=0, what=name)
        assert isinstance(got["pieces"], list) and len(got["pieces"]) == 4
        for piece, want in zip(got["pieces"], expected["pieces"]):
            assert_close(piece, want, rtol=0, atol=0, what="pieces")


def _sequence_in_out_model():
    nodes = [helper.make_node("SequenceLength", ["items"], ["count"]),
             helper.make_node("SequenceInsert", ["items", "extra"], ["more"])]
    return _model(nodes, [helper.make_value_info("items", SEQ_F), helper.make_tensor_value_info("extra", F, [2])],
                  [helper.make_tensor_value_info("count", TensorProto.INT64, []), helper.make_value_info("more", SEQ_F)])


def test_sequence_bindings_take_and_return_lists(tmp_path):
    engine = kiln.build(_sequence_in_out_model())
    engine.save(tmp_path / "m.kiln")
    loaded = kiln.load(tmp_path / "m.kiln")
    items = [np.arange(3, dtype=np.float32), np.ones((2, 2), np.float32)]
    extra = np.full(2, 7.0, np.float32)
    assert {b.name: b.kind for b in loaded.inputs} == {"items": "sequence", "extra": "tensor"}
    out = loaded.run({"items": items, "extra": extra})
    assert int(out["count"]) == 2 and isinstance(out["more"], list) and len(out["more"]) == 3
    for got, want in zip(out["more"], items + [extra]):
        np.testing.assert_array_equal(got, want)
    out["more"][0][0] = 100.0  # outputs are the caller's own copies
    assert items[0][0] == 0.0
    import torch

    as_torch = loaded.run({"items": [torch.zeros(1)], "extra": torch.zeros(2)})
    assert all(isinstance(t, torch.Tensor) for t in as_torch["more"])
    assert int(loaded.run({"items": [], "extra": extra})["count"]) == 0


def test_a_tensor_fed_to_a_sequence_binding_is_a_kiln_error():
    engine = kiln.build(_sequence_in_out_model())
    with pytest.raises(kiln.KilnError) as caught:
        engine.run({"items": np.zeros(3, np.float32), "extra": np.zeros(2, np.float32)})
    assert caught.value.code == "KILN-E403" and "list" in str(caught.value)
    with pytest.raises(kiln.KilnError) as caught:  # an element of the wrong dtype
        engine.run({"items": [np.zeros(3, np.int64)], "extra": np.zeros(2, np.float32)})
    assert caught.value.code == "KILN-E403"


def test_optional_input_takes_none_or_a_tensor():
    optional_f = helper.make_optional_type_proto(helper.make_tensor_type_proto(F, [2]))
    nodes = [helper.make_node("OptionalHasElement", ["maybe"], ["present"])]
    model = _model(nodes, [helper.make_value_info("maybe", optional_f)],
                   [helper.make_tensor_value_info("present", TensorProto.BOOL, [])], opset=18)
    engine = kiln.build(model)
    assert engine.inputs[0].kind == "optional"
    assert bool(engine.run({"maybe": None})["present"]) is False
    assert bool(engine.run({"maybe": np.zeros(2, np.float32)})["present"]) is True


# ONNX's own node test cases for sequences and optionals (inputs, expected outputs and tolerances).
NODE_CASES = ["test_identity_sequence", "test_sequence_insert_at_back", "test_sequence_insert_at_front",
              "test_split_to_sequence_1", "test_split_to_sequence_2", "test_split_to_sequence_nokeepdims",
              "test_sequence_map_identity_1_sequence", "test_sequence_map_identity_2_sequences",
              "test_sequence_map_identity_1_sequence_1_tensor", "test_sequence_map_add_2_sequences",
              "test_sequence_map_add_1_sequence_1_tensor", "test_sequence_map_extract_shapes",
              "test_sequence_map_add_2_sequences_expanded", "test_optional_get_element_optional_tensor",
              "test_optional_get_element_tensor", "test_optional_get_element_optional_sequence",
              "test_optional_get_element_sequence", "test_optional_has_element_tensor_input",
              "test_optional_has_element_optional_input", "test_optional_has_element_empty_no_input_name_tensor_input",
              "test_optional_has_element_empty_no_input_tensor_input", "test_optional_has_element_empty_optional_input",
              "test_optional_has_element_empty_no_input_name_optional_input",
              "test_optional_has_element_empty_no_input_optional_input"]


def _all_node_cases() -> dict:
    return onnx_node_cases("identity", "sequenceinsert", "splittosequence", "sequence_map", "optionalgetelement",
                           "optionalhaselement")


def _assert_matches(got, expected, rtol: float, atol: float, what: str) -> None:
    if expected is None or isinstance(expected, list):
        assert (got is None) == (expected is None) and (expected is None or len(got) == len(expected)), what
        for index, (a, b) in enumerate(zip(got or [], expected or [])):
            _assert_matches(a, b, rtol, atol, f"{what}[{index}]")
        return
    assert np.asarray(got).shape == np.asarray(expected).shape, what
    assert_close(got, expected, rtol=rtol, atol=atol, what=what)


@pytest.mark.parametrize("name", NODE_CASES)
def test_onnx_node_case(name):
    case = _all_node_cases()[name]
    engine = build_for_data(case)
    names = [i.name for i in case.model.graph.input]
    for inputs, outputs in case.data_sets:
        got = engine.run(dict(zip(names, inputs)))
        for value, expected in zip(case.model.graph.output, outputs):
            _assert_matches(got[value.name], expected, case.rtol, case.atol, f"{name}: {value.name}")
