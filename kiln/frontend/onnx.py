"""The ONNX frontend: read a model (with external data), bring it to kiln's canonical opset, infer
shapes, expand functions, and translate it into kiln's IR, reporting every unsupported node at once."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from .. import log
from ..errors import ParseError
from ..ir import DType, Graph, Node, Value, subgraphs
from ..ir.dtypes import CARRIED, from_numpy
from ..plugins import apply_infer_rules
from .functions import expand_schema_functions, inline_local_functions
from .onnx_file import FLOAT_WEIGHTS, read_skeleton
from .unsupported import describe_unsupported

# Models below this opset are converted up to it; models between it and the newest opset the
# installed onnx knows run as they are, each node with the newest kernel version not above the model's opset.
CANONICAL_OPSET = 18

_FOREIGN_FORMATS = {
    ".uff": ("UFF is TensorRT's obsolete TensorFlow exchange format (TensorRT itself removed it)",
             "convert the TensorFlow model instead: kiln build saved_model_dir/ (pip install kiln[tensorflow]) "
             "or export it to ONNX with tf2onnx"),
    ".pt": ("pickled PyTorch files are never loaded: unpickling can execute arbitrary code",
            "give kiln an entry point that builds the model instead: kiln build my_package.models:make_model, "
            "where make_model() returns (module, example_inputs); or export to ONNX with torch.onnx.export"),
    ".pth": None, ".pkl": None, ".caffemodel": ("Caffe models are not read directly", "convert to ONNX first"),
    ".engine": ("this looks like a TensorRT engine, which only TensorRT can run", "build from the ONNX model instead"),
    ".plan": None,
    ".h5": ("legacy Keras HDF5 files are not read directly",
            "load it with keras.models.load_model and pass the model to kiln.build, or re-save it as name.keras "
            "or model.export(dir) and build that (pip install kiln[tensorflow])"),
}
_FOREIGN_FORMATS[".pth"] = _FOREIGN_FORMATS[".pt"]
_FOREIGN_FORMATS[".pkl"] = _FOREIGN_FORMATS[".pt"]
_FOREIGN_FORMATS[".plan"] = _FOREIGN_FORMATS[".engine"]


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX model from a path (external data next to it) or take a ModelProto as is."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = _model_path(source)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 (protobuf raises several unrelated types for damaged files)
        raise _unreadable(path, error) from None
    _load_external_data(model, path)
    return model


def load_skeleton(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(the model's skeleton, its large float weights by name), as split_weights gives them. From a file, the weights
    are numpy views of the file's bytes, read once (kiln/frontend/onnx_file.py), and protobuf parses the rest."""
    model, found = source, {}
    if not isinstance(source, onnx.ModelProto):
        path = _model_path(source)
        try:
            data, found = read_skeleton(path.read_bytes(), SHAPE_DATA_ELEMENTS)
            model = onnx.ModelProto.FromString(data)
        except Exception as error:  # noqa: BLE001 (a damaged file fails the wire walk or protobuf's parse)
            raise _unreadable(path, error) from None
        _load_external_data(model, path)
        declared = {i.name for i in model.graph.input}
        model.graph.input.extend(helper.make_tensor_value_info(name, data_type, dims)
                                 for name, (_, dims, data_type) in found.items() if name not in declared)
    skeleton, rest = split_weights(model)  # from a file: the float weights written in typed fields, not raw_data
    weights = {name: array for name, (array, _, _) in found.items()}
    weights.update((t.name, onnx.numpy_helper.to_array(t)) for t in rest)
    return skeleton, weights


def _model_path(source: str | os.PathLike) -> Path:
    """The path of an ONNX file, or ParseError naming what it is instead."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in _FOREIGN_FORMATS:
        what, hint = _FOREIGN_FORMATS[suffix]
        raise ParseError(f"{path.name}: {what}", code="KILN-E106", hint=hint)
    if not path.exists():
        raise ParseError(f"model file {str(path)!r} does not exist", code="KILN-E104",
                         hint="check the path; kiln build takes an .onnx or .keras file, a SavedModel directory, or "
                              "a PyTorch entry point written as a dotted module path: my_package.models:make_model")
    if path.is_dir():
        raise ParseError(f"{str(path)!r} is a directory, not an ONNX file", code="KILN-E104",
                         hint="kiln build takes an .onnx file, a .keras file, or a TensorFlow SavedModel directory "
                              "(one with saved_model.pb; needs pip install kiln[tensorflow])")
    return path


def _unreadable(path: Path, error: Exception) -> ParseError:
    return ParseError(f"{path.name} is not a readable ONNX model ({type(error).__name__}: {error})",
                      code="KILN-E104", hint="check that the file is complete and really ONNX (onnx.checker.check_model)")


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    from onnx import external_data_helper

    tensors = [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    if not tensors:
        return
    locations = {entry.value for t in tensors for entry in t.external_data if entry.key == "location"}
    missing = sorted(loc for loc in locations if not (path.parent / loc).is_file())
    if missing:
        raise ParseError(f"{path.name} keeps weights in external data file(s) that are missing: {', '.join(missing)}",
                         code="KILN-E104", where=str(path.parent),
                         hint="keep the external data files next to the .onnx file, with the names the model records")
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as error:  # noqa: BLE001
        raise ParseError(f"{path.name}: its external data cannot be read ({error})", code="KILN-E104",
                         hint="the external data file is shorter than the model says, or unreadable; re-save the model") from None


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def normalize_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = model_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ParseError(f"model uses ONNX opset {opset}, newer than this kiln supports (opset {newest}, onnx {onnx.__version__})",
                         code="KILN-E103", hint=f"re-export the model with opset {newest} or lower, or upgrade kiln and onnx")
    if opset >= CANONICAL_OPSET:
        return model
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        return model  # nothing in ONNX's default domain to convert (ai.onnx.ml or training-only models)
    from onnx import version_converter

    log.verbose("converting model from opset %d to kiln's canonical opset %d", opset, CANONICAL_OPSET)
    if _same_schemas(model, opset):
        return _with_opset(model, CANONICAL_OPSET)  # no operator changed between the two opsets: nothing to rewrite
    try:
        converted = version_converter.convert_version(model, CANONICAL_OPSET)
    except Exception as error:  # noqa: BLE001 (the converter raises RuntimeError/ConvertError with its reason)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if _runs_at_own_opset(model):  # e.g. Scan-8 with sequence_lens, which the converter refuses
            log.warning("onnx's version converter cannot convert the model (%s); kiln runs it at its opset %d", reason, opset)
            return model
        foreign = _not_in_opset(model, opset)
        if any(lacks for _, lacks in foreign.values()):
            # The converter stops at the first node of an operator its opset lacks (not an ONNX operator, or one
            # from a later opset). Kiln checks the model at its own opset instead: the unsupported-operator error
            # (KILN-E101) then names every node kiln cannot run, these among them, each with its way out.
            log.warning("onnx's version converter cannot convert the model (%s is not in opset %d); kiln checks it "
                        "at its own opset", ", ".join(sorted(foreign)), opset)
            return model
        if foreign:  # a plugin runs them, but the converter still cannot convert around them
            nodes = ", ".join(f"{op} (node {name!r})" for op, (name, _) in sorted(foreign.items()))
            raise ParseError(f"cannot convert the model from opset {opset} to opset {CANONICAL_OPSET}: onnx's version "
                             f"converter stops at {nodes}, not an operator of ONNX opset {opset}",
                             code="KILN-E102", where=", ".join(name for name, _ in foreign.values()),
                             hint="give a custom operator its own domain (e.g. com.example) in the model and in its "
                                  f"plugin, which the converter leaves alone, or re-export at opset {CANONICAL_OPSET} or newer") from None
        raise ParseError(f"cannot convert the model from opset {opset} to opset {CANONICAL_OPSET}: {reason}",
                         code="KILN-E102", hint=f"re-export the model from its framework at opset {CANONICAL_OPSET} or newer") from None
    if _interface(converted) != _interface(model):
        # onnx's converter has adapters that rewrite the graph's inputs (Scan 8 -> 9 drops the batch axis):
        # a model whose interface changed is not the user's model any more, so it runs at its own opset.
        log.warning("onnx's version converter changed the model's inputs or outputs; keeping opset %d", opset)
        return model
    return converted


def _every_node(graph: onnx.GraphProto):
    """The graph's nodes and those of its subgraphs (If branches, Loop and Scan bodies), recursively."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                yield from _every_node(sub)


def _runs_at_own_opset(model: onnx.ModelProto) -> bool:
    """Whether kiln has a kernel for every node (subgraphs included) at the opsets the model declares."""
    from ..ops import registry

    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
    return all(registry.lookup(node.op_type, "" if node.domain == "ai.onnx" else node.domain,
                               opsets.get("" if node.domain == "ai.onnx" else node.domain, 1)) is not None
               for node in _every_node(model.graph))


def _not_in_opset(model: onnx.ModelProto, opset: int) -> dict[str, tuple[str, bool]]:
    """{op: (first node's name, whether kiln lacks a kernel for it)} for the default-domain operators of the model
    that ONNX does not define at `opset`: unknown to ONNX, or added in a later opset."""
    from ..ops import registry

    found: dict[str, tuple[str, bool]] = {}
    for index, node in enumerate(_every_node(model.graph)):
        if node.domain not in ("", "ai.onnx") or node.op_type in found:
            continue
        try:
            onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            found[node.op_type] = (node.name or f"{node.op_type}_{index}", registry.lookup(node.op_type, "", opset) is None)
    return found


def _same_schemas(model: onnx.ModelProto, opset: int) -> bool:
    """True when every default-domain operator in the model (subgraphs included) has the same schema version at
    `opset` and at the canonical opset: the converter would only change the opset number, and it is slow (most of
    the build time of a small model)."""
    if model.functions:
        return False
    for node in _every_node(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            if onnx.defs.get_schema(node.op_type, opset).since_version != \
                    onnx.defs.get_schema(node.op_type, CANONICAL_OPSET).since_version:
                return False
        except onnx.defs.SchemaError:
            return False
    return True


def _with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for entry in copy.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    return copy


def _interface(model: onnx.ModelProto) -> list:
    return [(i.name, i.type.SerializeToString()) for i in model.graph.input] + [o.name for o in model.graph.output]


SHAPE_DATA_ELEMENTS = 64  # float weights up to this size stay in the model shape inference sees


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation) over the model's structure, not its weights.

    onnx serializes the model it is given, twice: for a BERT-base that is 440 MB each way and most of a build's
    time. Shape inference reads the weights' types and shapes, and the values only of the small integer tensors
    that shapes are computed from, so it runs on the model's skeleton (split_weights) and the weights are put back
    into the result. Models over 2 GB thereby get inferred too. `parse` keeps the two apart instead, and never
    copies the weights at all."""
    skeleton, weights = split_weights(model)
    inferred = _infer_skeleton(skeleton)
    if inferred is skeleton:
        return model
    if weights:
        declared = {t.name for t in weights} - {i.name for i in model.graph.input}
        kept = [i for i in inferred.graph.input if i.name not in declared]
        del inferred.graph.input[:]
        inferred.graph.input.extend(kept)
        del inferred.graph.initializer[:]
        inferred.graph.initializer.extend(model.graph.initializer)  # the model's own order
    return inferred


def _infer_skeleton(skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """The skeleton with inferred types, or the skeleton itself where inference cannot run.

    A model with symbolic input dimensions goes through onnxruntime's symbolic shape inference first: ONNX's own
    gives every dimension it computes from shape arithmetic a fresh name (the length of Range(0, Shape(ids)[1])
    becomes unk__0, not `seq`; a Reshape(-1) flatten loses its static 256), which leaves bindings and the memory
    plan with sizes no profile defines. The symbolic one keeps the input's names, and writes dimensions it derives
    as expressions of them (`2*batch`), which the memory planner evaluates at the profiles' sizes."""
    if skeleton.ByteSize() > 1_900_000_000:
        return skeleton  # onnx's in-memory shape inference stops at 2 GB; kiln's kernels compute shapes at build
    if _has_symbolic_inputs(skeleton):
        try:
            inferred = _symbolic_shapes(skeleton)
            if inferred is not None:
                return inferred
            log.verbose("symbolic shape inference left shapes unknown; using ONNX's")
        except Exception as error:  # noqa: BLE001 (operators it does not know, custom domains: ONNX's inference then)
            log.verbose("symbolic shape inference stopped (%s: %s); using ONNX's", type(error).__name__, error)
    try:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001
        log.warning("ONNX shape inference failed (%s); continuing with the shapes the model declares", error)
        return skeleton


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference, run as its SymbolicShapeInference.infer_shapes runs it, less the
    file that one writes into the working directory before raising when some shape stays unknown (kiln writes
    nothing there); None in that case. Its steps are onnxruntime's own methods: where a release changes them, the
    caller's fallback to ONNX's inference takes over."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_ if complete else None


def _has_symbolic_inputs(model: onnx.ModelProto) -> bool:
    weights = {t.name for t in model.graph.initializer}
    return any(dim.HasField("dim_param") or not dim.HasField("dim_value")
               for value in model.graph.input if value.name not in weights and value.type.HasField("tensor_type")
               for dim in value.type.tensor_type.shape.dim)


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """(the model's skeleton, its large float weights): the skeleton is the model without its large float
    initializers, each declared as a graph input of its type instead; the weights are the model's own TensorProtos,
    not copies. Without such weights, (model, [])."""
    weights = [t for t in model.graph.initializer
               if t.data_type in FLOAT_WEIGHTS and math.prod(t.dims) > SHAPE_DATA_ELEMENTS and t.data_location != TensorProto.EXTERNAL]
    if not weights:
        return model, []
    removed = {t.name for t in weights}
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    skeleton.graph.initializer.extend(t for t in model.graph.initializer if t.name not in removed)
    inputs = {i.name for i in skeleton.graph.input}
    skeleton.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                for t in weights if t.name not in inputs)
    return skeleton, weights


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of one protobuf message into another of its type, but the one named `skip`."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        repeated = getattr(descriptor, "is_repeated", None)  # protobuf 6 drops `label`; older ones lack is_repeated
        if repeated if repeated is not None else descriptor.label == descriptor.LABEL_REPEATED:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def prepare_dynamic_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """For a model with a dynamic input: give each unnamed dynamic dimension of a graph input the name
    `<input>_dim<axis>`, so that it stays one symbol through shape inference (onnx would invent a new `unk__N` at
    every use) and profiles and errors can name it; and forget the fixed shapes value_info records for
    intermediates (element types stay), because tools that make a batch dynamic often edit only the inputs and
    leave value_info at the old size, which constant folding would then bake in. ONNX shape inference
    recomputes them from the inputs. The caller's model is left as it was."""
    weights = {t.name for t in model.graph.initializer}

    def dims(info) -> list:
        if info.name in weights or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            return []
        return list(info.type.tensor_type.shape.dim)

    if all(dim.HasField("dim_value") for info in model.graph.input for dim in dims(info)):
        return model
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    for info in prepared.graph.input:
        for axis, dim in enumerate(dims(info)):
            if not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{info.name}_dim{axis}"
    for info in prepared.graph.value_info:
        shape = dims(info)
        if shape and all(dim.HasField("dim_value") for dim in shape):
            info.type.tensor_type.ClearField("shape")
    return prepared


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    types = {}
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        types[info.name] = info.type
    return types


def _dims(tensor_type) -> tuple | None:
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _value(name: str, type_proto: onnx.TypeProto | None) -> Value:
    if type_proto is None:
        return Value(name)
    kind = "tensor"
    if type_proto.HasField("optional_type"):
        kind, type_proto = "optional", type_proto.optional_type.elem_type
    if type_proto.HasField("sequence_type"):
        kind, type_proto = ("optional_sequence" if kind == "optional" else "sequence"), type_proto.sequence_type.elem_type
    if not type_proto.HasField("tensor_type"):
        return Value(name, kind=kind)
    tensor = type_proto.tensor_type
    dtype = DType.from_onnx(tensor.elem_type) if tensor.elem_type else None
    return Value(name, dtype, _dims(tensor), kind)


def _attribute(attribute: onnx.AttributeProto, opsets: dict[str, int]) -> Any:
    kind = attribute.type
    if kind == onnx.AttributeProto.GRAPH:
        return _graph(attribute.g, opsets, {})
    if kind == onnx.AttributeProto.GRAPHS:
        return [_graph(g, opsets, {}) for g in attribute.graphs]
    if kind == onnx.AttributeProto.TENSOR:
        return onnx.numpy_helper.to_array(attribute.t)
    if kind == onnx.AttributeProto.TENSORS:
        return [onnx.numpy_helper.to_array(t) for t in attribute.tensors]
    if kind == onnx.AttributeProto.STRING:
        return attribute.s.decode("utf-8", errors="replace")
    if kind == onnx.AttributeProto.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in attribute.strings]
    if kind == onnx.AttributeProto.INTS:
        return [int(v) for v in attribute.ints]
    if kind == onnx.AttributeProto.FLOATS:
        return [float(v) for v in attribute.floats]
    if kind == onnx.AttributeProto.SPARSE_TENSOR:
        return _dense(attribute.sparse_tensor)
    if kind == onnx.AttributeProto.TYPE_PROTO:
        return attribute.tp.tensor_type.elem_type
    return onnx.helper.get_attribute_value(attribute)


def _dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _graph(proto: onnx.GraphProto, opsets: dict[str, int], extra_types: dict[str, onnx.TypeProto],
           weights: dict[str, np.ndarray] | None = None) -> Graph:
    types = {**extra_types, **_value_types(proto)}
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in proto.initializer}
    initializers.update(weights or {})
    for sparse in proto.sparse_initializer:
        initializers[sparse.values.name] = _dense(sparse)
    overridable = [i.name for i in proto.input if i.name in initializers]
    if overridable:
        log.verbose("%d graph input(s) have initializers and are treated as weights", len(overridable))
    inputs = [_value(i.name, i.type) for i in proto.input if i.name not in initializers]
    outputs = [_value(o.name, o.type) for o in proto.output]
    values = {name: _value(name, t) for name, t in types.items()}
    nodes = []
    taken = set()
    for index, node_proto in enumerate(proto.node):
        name = node_proto.name or f"{node_proto.op_type}_{index}"
        while name in taken:
            name = f"{name}_{index}"
        taken.add(name)
        attrs = {a.name: _attribute(a, opsets) for a in node_proto.attribute}
        domain = "" if node_proto.domain == "ai.onnx" else node_proto.domain
        op, node_inputs = node_proto.op_type, tuple(node_proto.input)
        if op == "QuantizeLinear" and domain == "":
            attrs = _with_quantized_type(node_proto, attrs, values, initializers)
        like = _carried_type(node_inputs[1], values, initializers) if op == "CastLike" and domain == "" else None
        if like is not None:  # the kernel would see `like` in its carrier (int8/uint8/float32) and cast into that
            op, attrs, node_inputs = "Cast", {**attrs, "to": like.value}, node_inputs[:1]
        nodes.append(Node(op, node_inputs, tuple(node_proto.output), attrs, name, domain, origin=(name,)))
    graph = Graph(nodes, inputs, outputs, values=values, initializers=initializers, opsets=opsets,
                  name=proto.name or "graph")
    _attach_gradient_bodies(graph)
    return graph


def _attach_gradient_bodies(graph: Graph) -> None:
    """Give each Gradient node (ai.onnx.preview.training) its `body`: a copy of the nodes that compute its y from
    its xs and zs, which its kernel differentiates with torch autograd. Being a copy, the body leaves the graph's own
    nodes free to be fused or removed by the optimizer, as an If branch does."""
    producers = graph.producers()
    for index, node in enumerate(graph.nodes):
        if node.op == "Gradient" and node.domain == "ai.onnx.preview.training" and isinstance(node.attrs.get("y"), str):
            graph.nodes[index] = node.replace(attrs={**node.attrs, "body": _gradient_body(node, graph, producers)})


def _gradient_body(node: Node, graph: Graph, producers: dict[str, Node]) -> Graph:
    """The subgraph from the node's xs and zs (its inputs, in that order) to its y. Walking back from y stops at them;
    anything else it reaches that no node produces (graph inputs, values of an enclosing graph) the body reads from
    the scope it runs in, as a constant of the differentiation; the weights it reads are copied into it."""
    sources = list(node.attrs.get("xs") or []) + list(node.attrs.get("zs") or [])
    y = node.attrs["y"]
    needed: set[str] = set()
    pending = [y]
    while pending:
        name = pending.pop()
        producer = producers.get(name)
        if name in sources or producer is None or producer.name in needed:
            continue
        needed.add(producer.name)
        pending.extend(n for n in producer.inputs if n)
        for sub in subgraphs(producer):
            pending.extend(sub.outer_references())
    nodes = [n for n in graph.nodes if n.name in needed]  # in the graph's (topological) order
    body = Graph(nodes, [graph.value(name) for name in sources], [graph.value(y)], opsets=graph.opsets,
                 name=f"{node.name}_body")
    reads = body.outer_references()
    body.initializers = {name: graph.initializers[name] for name in sorted(reads) if name in graph.initializers}
    named = reads | {o for n in nodes for o in n.outputs if o}
    body.values.update({name: graph.values[name] for name in named if name in graph.values})
    return body


def _with_quantized_type(node_proto: onnx.NodeProto, attrs: dict, values: dict[str, Value],
                         initializers: dict[str, np.ndarray]) -> dict:
    """QuantizeLinear's output type is its zero point's. An int4/uint4/int2/uint2 zero point reaches the kernel
    carried in int8/uint8, which would saturate to the carrier's range: write the real type into `output_dtype`,
    which the spec allows where it equals the zero point's type."""
    if len(node_proto.input) < 3 or not node_proto.input[2] or attrs.get("output_dtype"):
        return attrs
    dtype = _carried_type(node_proto.input[2], values, initializers)
    if dtype not in (DType.int4, DType.uint4, DType.int2, DType.uint2):
        return attrs
    return {**attrs, "output_dtype": dtype.value}


def _carried_type(name: str, values: dict[str, Value], initializers: dict[str, np.ndarray]) -> DType | None:
    """The declared type of `name` where kernels would see it carried in a wider torch type (kiln/ir/dtypes.py
    CARRIED), else None."""
    if name in initializers:
        dtype = from_numpy(initializers[name].dtype)
    else:
        dtype = values[name].dtype if name in values else None
    return dtype if dtype in CARRIED else None


def to_ir(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None) -> Graph:
    """The IR of `model`; `weights` are the arrays of initializers load_skeleton took out of it (declared as its
    inputs)."""
    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}
    opsets.setdefault("", model_opset(model))
    return _graph(model.graph, opsets, {}, weights)


def parse(source: str | os.PathLike | onnx.ModelProto) -> Graph:
    """Read an ONNX model into kiln's IR, or raise ParseError saying precisely why not."""
    from ..ops import registry

    # The model is its skeleton: the steps below copy and serialize it, and a BERT-base's weights would make each
    # of those copies 440 MB. The weights rejoin it in the IR.
    model, weights = load_skeleton(source)
    if not model.graph.node and not model.graph.output:
        raise ParseError("the model has an empty graph", code="KILN-E104", hint="check that the export wrote the network")
    model = normalize_opset(model)
    model = inline_local_functions(model)
    model = prepare_dynamic_inputs(model)
    model = _infer_skeleton(model)
    model = apply_infer_rules(model, infer_shapes)  # custom-domain nodes: ONNX cannot type their outputs, plugins can
    opset = model_opset(model)
    opsets = {("" if o.domain == "ai.onnx" else o.domain): int(o.version) for o in model.opset_import}

    def lacks_kernel(node: onnx.NodeProto) -> bool:
        return registry.lookup(node.op_type, node.domain, opsets.get(node.domain, opset)) is None

    # a function body is built for its inputs' types: weights' included (declared or not)
    weight_types = {t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in model.graph.initializer}
    model, expanded = expand_schema_functions(model, lacks_kernel, {**weight_types, **_value_types(model.graph)})
    if expanded:
        model = _infer_skeleton(model)
    graph = to_ir(model, weights)
    _check_supported(graph)
    _check_bindings(graph)
    log.verbose("parsed %s: opset %d, %d nodes, %d weights, inputs %s", graph.name, graph.opset, len(graph.nodes),
                len(graph.initializers), ", ".join(graph.value(v.name).describe() for v in graph.inputs))
    return graph


def _check_supported(graph: Graph) -> None:
    from ..ops import registry

    problems = []
    for owner, node in graph.walk():
        opset = owner.opsets.get(node.domain, graph.opsets.get(node.domain, 1))
        reason = registry.why_unsupported(node, owner, opset)
        if reason is not None:
            problems.append((node, opset, reason))
    if problems:
        raise describe_unsupported(problems, graph)


def _check_bindings(graph: Graph) -> None:
    for value in graph.inputs + graph.outputs:
        if value.dtype is not None and value.dtype not in _bindable():
            raise ParseError(f"binding {value.name!r} has element type {value.dtype.name}, which kiln cannot bind",
                             code="KILN-E101", where=value.name,
                             hint="cast it inside the model to a numeric type (float32, int64, ...)")


def _bindable():
    from ..ir.dtypes import BINDABLE

    return BINDABLE


__all__ = ["CANONICAL_OPSET", "from_numpy", "load_model", "parse", "to_ir"]
