"""What an int8 build tells its user: layers per precision (and why), warnings, the sensitivity table."""
from __future__ import annotations


def describe(quantization: dict) -> str:
    if "layers" not in quantization:
        return f"  int8: {quantization.get('mode', 'explicit')}"
    layers = quantization["layers"]
    int8 = [name for name, row in layers.items() if row.get("precision") == "int8"]
    lines = [f"  int8: {len(int8)} of {len(layers)} quantizable layers in int8 ({quantization['calibrator']} calibrator)"]
    for name, row in layers.items():
        timing = f", int8 {row['int8_ms']:.3f} ms vs fp32 {row['fp32_ms']:.3f} ms" if "int8_ms" in row else ""
        lines.append(f"    {name:<32} {row.get('precision', '?'):<5} ({row.get('why', '')}{timing})")
    if "table" in quantization:
        accuracy = quantization["accuracy"]
        lines.append(f"  accuracy budget {accuracy['metric']} <= {accuracy['budget']:g}: engine error {accuracy['error']:.4g}")
        lines.append(quantization["table"])
    lines += [f"  warning: {text}" for text in quantization.get("warnings", [])]
    return "\n".join(lines)
