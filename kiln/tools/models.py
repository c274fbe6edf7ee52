"""The nine ImageNet models of ONNX's test data (onnx/backend/test/data/light) with real numbers in them: their
shipped weights are ConstantOfShape placeholders (every weight 0.02), which make every output alike, so the demo,
the benchmarks and the tests put fixed-seed random weights in their place and compare logits, not a saturated
Softmax."""
from __future__ import annotations

from pathlib import Path

import numpy as np

LIGHT_NAMES = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
               "vgg19", "zfnet512")


def light_path(name: str) -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"


def randomized_light_model(name: str, seed: int = 0, batch: int | None = None):
    """light_`name` at kiln's canonical opset with fixed-seed random weights (batch-norm scales and variances in
    [0.5, 1.5], other vectors N(0, 0.1), matrices and kernels N(0, 1/fan_in)), its output the logits before its
    final Softmax (DenseNet-121 has none), at `batch` if given (the model's own batch of 1 otherwise)."""
    import onnx
    from onnx import TensorProto, helper

    from ..frontend.onnx import normalize_opset

    model = onnx.load(str(light_path(name)))
    rng = np.random.default_rng(seed)
    sizes = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    role = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            role.update({n: kind for n, kind in zip(node.input[1:], ("scale", "bias", "mean", "var"))})
    kept, weights = [], []
    logits = model.graph.output[0].name
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in sizes:
            shape = tuple(int(d) for d in sizes[node.input[0]])
            if role.get(node.output[0]) in ("scale", "var"):
                array = rng.uniform(0.5, 1.5, shape)
            elif len(shape) <= 1:
                array = 0.1 * rng.standard_normal(shape)
            else:
                array = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            weights.append(onnx.numpy_helper.from_array(array.astype(np.float32), node.output[0]))
        elif node.op_type == "Softmax":  # opset 9: one node, the last
            logits = node.input[0]
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {n for node in kept for n in node.input}
    initializers = [t for t in model.graph.initializer if t.name in used] + weights
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    names = {t.name for t in initializers}
    inputs = [i for i in model.graph.input if i.name in used and i.name not in names]  # IR 3 listed weights too
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(logits, TensorProto.FLOAT, None))
    del model.graph.value_info[:]
    if batch is not None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
        for node in model.graph.node:  # the Reshape to (1, -1) before the classifier keeps the batch
            if node.op_type == "Reshape":
                for tensor in model.graph.initializer:
                    if tensor.name == node.input[1]:
                        shape = onnx.numpy_helper.to_array(tensor).copy()
                        if shape[0] == 1:
                            shape[0] = batch
                            tensor.CopyFrom(onnx.numpy_helper.from_array(shape, tensor.name))
    model.ir_version = 8
    return normalize_opset(model)
