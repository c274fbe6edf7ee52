"""Signal processing: DFT, STFT, window functions (Hann, Hamming, Blackman) and MelWeightMatrix.

Complex values follow ONNX's layout: a trailing axis of 2 (real, imaginary); a real input has a trailing 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .registry import register


def _as_complex(x) -> np.ndarray:
    # float32 signals transform in complex64 with numpy's pocketfft, as ONNX's reference does (torch's FFT rounds
    # differently in the last bit, and the cases' atol of 1e-7 sees it); float16 ones are widened first.
    real = x.double().numpy() if x.dtype == torch.float64 else x.float().numpy()
    imaginary = real[..., 1] if x.shape[-1] == 2 else np.zeros_like(real[..., 0])
    return real[..., 0] + 1j * imaginary.astype(real.dtype)


def _dft(x, length, axis, inverse, onesided):
    rank = x.dim() - 1  # the signal's rank, without the trailing real/imaginary axis
    axis %= rank
    signal = _as_complex(x)
    if inverse and onesided:  # half spectrum in, real signal out
        n = length if length is not None else 2 * (x.shape[axis] - 1)
        y = np.fft.irfft(signal, n=n, axis=axis)
        return torch.from_numpy(np.ascontiguousarray(y[..., None])).to(x.dtype)
    y = (np.fft.ifft if inverse else np.fft.fft)(signal, n=length, axis=axis)  # n pads with zeros or truncates
    if onesided:
        y = np.take(y, np.arange(y.shape[axis] // 2 + 1), axis=axis)
    return torch.from_numpy(np.stack([y.real, y.imag], -1)).to(x.dtype)


def _scalar(t):
    return None if t is None or t.numel() == 0 else int(t.reshape(-1)[0])


@register("DFT", since=20)
def dft(x, dft_length=None, axis=None, *, inverse=0, onesided=0):
    chosen = _scalar(axis)
    return _dft(x, _scalar(dft_length), -2 if chosen is None else chosen, inverse, onesided)


@register("DFT", since=17)
def dft_17(x, dft_length=None, *, axis=1, inverse=0, onesided=0):
    return _dft(x, _scalar(dft_length), axis, inverse, onesided)


@register("STFT", since=17)
def stft(signal, frame_step, window=None, frame_length=None, *, onesided=1):
    step = _scalar(frame_step)
    length = _scalar(frame_length) if frame_length is not None else window.shape[0]
    frames = (signal.shape[1] - length) // step + 1
    pieces = torch.stack([signal[:, f * step: f * step + length] for f in range(frames)], 1)  # [batch, frames, length, 1|2]
    if window is not None:
        pieces = pieces * window.to(pieces.dtype).reshape(1, 1, -1, 1)
    return _dft(pieces, None, 2, 0, onesided)


def _window(name):
    def kernel(size, *, output_datatype=1, periodic=1):
        from ..ir.dtypes import DType, to_torch

        n = int(size.reshape(-1)[0])
        period = n if periodic else n - 1
        k = torch.arange(n, dtype=torch.float64)
        phase = 2 * math.pi * k / period
        if name == "hann":
            w = 0.5 - 0.5 * torch.cos(phase)
        elif name == "hamming":
            alpha = 25 / 46
            w = alpha - (1 - alpha) * torch.cos(phase)
        else:
            w = 0.42 - 0.5 * torch.cos(phase) + 0.08 * torch.cos(2 * phase)
        return w.to(to_torch(DType.from_onnx(output_datatype)))

    return kernel


register("HannWindow", since=17)(_window("hann"))
register("HammingWindow", since=17)(_window("hamming"))
register("BlackmanWindow", since=17)(_window("blackman"))


@register("MelWeightMatrix", since=17)
def mel_weight_matrix(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz, *, output_datatype=1):
    """Triangular filters, equally spaced on the mel scale, over the dft_length // 2 + 1 spectrum bins (ONNX's spec)."""
    from ..ir.dtypes import DType, to_torch

    bins, length, rate = int(num_mel_bins), int(dft_length), int(sample_rate)
    to_mel = lambda hz: 2595 * np.log10(1 + hz / 700)  # noqa: E731
    low, high = to_mel(float(lower_edge_hertz)), to_mel(float(upper_edge_hertz))
    points = np.arange(bins + 2) * ((high - low) / (bins + 2)) + low
    hertz = 700 * (10 ** (points / 2595) - 1)
    edges = (((length + 1) * hertz) // rate).astype(int)
    weights = np.zeros((length // 2 + 1, bins))
    for i in range(bins):
        left, center, right = edges[i], edges[i + 1], edges[i + 2]
        if center == left:
            weights[center, i] = 1
        else:
            for j in range(left, center + 1):
                weights[j, i] = (j - left) / (center - left)
        for j in range(center, right):
            weights[j, i] = (right - j) / (right - center)
    return torch.from_numpy(weights).to(to_torch(DType.from_onnx(output_datatype)))
