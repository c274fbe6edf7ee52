"""The KilnError hierarchy: every failure a user can cause, with a stable code and a hint."""
from __future__ import annotations


class KilnError(Exception):
    """A failure the user can act on: `code` is stable (KILN-Exxx), `hint` says what to do."""

    code = "KILN-E000"

    def __init__(self, message: str, *, hint: str = "", code: str | None = None, where: str = ""):
        self.message = message
        self.hint = hint
        self.where = where
        if code is not None:
            self.code = code
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        if self.where:
            text += f"\n  where: {self.where}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ParseError(KilnError):
    """E1xx: the model cannot be read or is not supported as given."""

    code = "KILN-E100"


class BuildError(KilnError):
    """E2xx: the graph could not be optimized or lowered."""

    code = "KILN-E200"


class PrecisionError(KilnError):
    """E3xx: a requested precision is unavailable or cannot meet its accuracy rules."""

    code = "KILN-E300"


class BindingError(KilnError):
    """E4xx: the inputs given to Engine.run do not match the engine's bindings."""

    code = "KILN-E400"


class EngineFileError(KilnError):
    """E5xx: an engine file is unreadable, damaged, foreign or built for another target."""

    code = "KILN-E500"


class ResourceError(KilnError):
    """E6xx: the work does not fit the memory or device available."""

    code = "KILN-E600"


# Every code kiln raises, with a one-line meaning; `kiln doctor` and the docs read this table.
CODES = {
    "KILN-E101": "model uses operators kiln does not support",
    "KILN-E102": "model opset cannot be converted to kiln's canonical opset",
    "KILN-E103": "model opset is newer than kiln supports",
    "KILN-E104": "model file cannot be read or is not a valid ONNX model",
    "KILN-E105": "model graph is malformed (dangling value, cycle, bad attribute)",
    "KILN-E106": "model format is not supported (e.g. .uff, pickled .pt)",
    "KILN-E107": "framework export failed (torch.export, tf2onnx)",
    "KILN-E108": "the model's frontend needs an optional extra that is not installed (pip install kiln[tensorflow])",
    "KILN-E201": "a node failed while being evaluated during the build (constant folding or shape check)",
    "KILN-E202": "a dynamic input has no optimization profile",
    "KILN-E203": "invalid builder configuration",
    "KILN-E204": "a plugin is incomplete or its kernel cannot be loaded (no infer rule, CUDA kernel not importable)",
    "KILN-E301": "precision not supported on the target device",
    "KILN-E302": "calibration data missing or unusable",
    "KILN-E303": "accuracy budget cannot be met",
    "KILN-E401": "required input missing",
    "KILN-E402": "unknown input name",
    "KILN-E403": "input dtype does not match the binding",
    "KILN-E404": "input rank does not match the binding",
    "KILN-E405": "input dimension does not match the binding",
    "KILN-E406": "input shape is outside every optimization profile",
    "KILN-E407": "a layer failed while running (bad values or inconsistent shapes)",
    "KILN-E408": "the reference (onnxruntime) cannot run the model, or the backend cannot expose what a check needs",
    "KILN-E501": "file is not a kiln engine (wrong magic)",
    "KILN-E502": "engine file is truncated",
    "KILN-E503": "engine file is corrupted (checksum mismatch)",
    "KILN-E504": "engine file format version is newer than this kiln",
    "KILN-E505": "engine was built for another target device",
    "KILN-E506": "engine needs a plugin that is not registered",
    "KILN-E507": "engine file cannot be written (missing directory, a directory given, no permission, disk full)",
    "KILN-E601": "not enough memory for the build or the run",
}
