"""Frontends: turn a model in a framework's format into kiln's IR."""
from __future__ import annotations


def parse_any(model, config=None, **options):
    """kiln's IR from whatever the user brought: an ONNX path or ModelProto (other frontends hook in here)."""
    from .onnx import parse

    if options:
        from ..errors import BuildError

        raise BuildError(f"unexpected build option(s) {', '.join(sorted(options))} for an ONNX model", code="KILN-E203",
                         hint="example_inputs and dynamic_shapes apply to torch modules only")
    return parse(model)
