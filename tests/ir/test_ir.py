"""The IR: immutable nodes, the verifier's invariants, the printer."""
import numpy as np
import pytest

import kiln
from kiln.ir import DType, Graph, Node, Value, format_graph, verify


def small_graph():
    nodes = [Node("MatMul", ("x", "w"), ("y",), name="mm"), Node("Relu", ("y",), ("z",), name="relu")]
    return Graph(nodes, [Value("x", DType.float32, ("batch", 4))], [Value("z", DType.float32, ("batch", 3))],
                 initializers={"w": np.ones((4, 3), np.float32)})


def test_nodes_are_immutable_and_replace_returns_a_copy():
    node = Node("Relu", ("a",), ("b",), name="r")
    other = node.replace(op="Sigmoid")
    assert node.op == "Relu" and other.op == "Sigmoid" and other.inputs == ("a",)
    with pytest.raises(Exception):
        node.op = "Tanh"


def test_verifier_accepts_a_well_formed_graph_and_names_what_is_wrong():
    verify(small_graph())
    broken = small_graph()
    broken.nodes.reverse()
    with pytest.raises(kiln.ParseError) as error:
        verify(broken)
    assert error.value.code == "KILN-E105" and "relu" in str(error.value)
    twice = small_graph()
    twice.nodes.append(Node("Relu", ("y",), ("z",), name="again"))
    with pytest.raises(kiln.ParseError, match="defined twice"):
        verify(twice)


def test_printer_shows_types_symbolic_dims_and_ops():
    text = format_graph(small_graph())
    assert "x: float32[batchx4]" in text and "MatMul(x, w)" in text and "# relu" in text


def test_symbolic_dims_and_static_shapes():
    assert not Value("x", DType.float32, ("batch", 3)).is_static
    assert Value("x", DType.float32, (2, 3)).is_static and Value("x", DType.float32, (2, 3)).rank == 2
    assert small_graph().value("w").shape == (4, 3)
