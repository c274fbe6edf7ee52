"""Image operators: Resize (every ONNX mode), Upsample, GridSample, LpPool, Col2Im, MaxUnpool, RoiAlign.

Resize is computed as one dense interpolation matrix per resized axis (output x input), built from ONNX's
coordinate transformation, tap positions and filter weights, and applied with tensordot in float64: every
mode (nearest, linear, cubic, antialias, exclude_outside, tf_crop_and_resize) is then the same small code.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .nn import _pool_output_pads, _torch_pad, resolve_pads
from .registry import register


def _source_coordinates(mode, out_len, in_len, scale, roi_start, roi_end):
    """ONNX's mapping of output positions to input positions along one axis, and which fall outside (crop mode)."""
    x = np.arange(out_len, dtype=np.float64)
    length = scale * in_len  # ONNX uses the unrounded output length here
    outside = np.zeros(out_len, dtype=bool)
    if mode == "align_corners":
        source = np.zeros(out_len) if length == 1 else x * (in_len - 1) / (length - 1)
    elif mode == "asymmetric":
        source = x / scale
    elif mode == "tf_crop_and_resize":
        if out_len == 1:
            source = np.full(out_len, (roi_end - roi_start) * (in_len - 1) / 2)
        else:
            source = x * (roi_end - roi_start) * (in_len - 1) / (out_len - 1)
        source = source + roi_start * (in_len - 1)
        outside = (source < 0) | (source > in_len - 1)
    elif mode == "pytorch_half_pixel":
        source = (x + 0.5) / scale - 0.5 if out_len != 1 else np.full(out_len, -0.5)
    elif mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / length)
        source = offset + (x + 0.5) / scale - 0.5
    else:  # half_pixel
        source = (x + 0.5) / scale - 0.5
    return source, outside


def _cubic(a):
    def kernel(d):
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    return kernel


def _weights(source, in_len, scale, mode, nearest_mode, cubic_coeff_a, antialias, exclude_outside):
    """The (output x input) interpolation matrix of one axis."""
    out_len = len(source)
    matrix = np.zeros((out_len, in_len))
    integral = source == np.floor(source)
    # ONNX's reference takes the taps nearest to the position; for an integral position that puts it second.
    base = np.where(integral, source - 1, np.floor(source)).astype(np.int64)
    ratio = source - base
    if mode == "nearest":
        pick = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5, "floor": np.zeros_like(ratio, bool),
                "ceil": np.ones_like(ratio, bool)}[nearest_mode]
        pick = np.where(integral, True, pick)
        index = np.clip(base + pick.astype(np.int64), 0, in_len - 1)
        matrix[np.arange(out_len), index] = 1.0
        return matrix
    stretch = min(scale, 1.0) if antialias else 1.0
    if mode == "linear":
        kernel, reach = (lambda d: np.clip(1 - np.abs(d), 0, 1)), 1
    else:
        kernel, reach = _cubic(cubic_coeff_a), 2
    start = int(math.floor(-reach / stretch) + 1)
    taps = np.arange(start, 2 - start)  # ONNX's footprint: 2 - 2 * start taps around the position
    for row in range(out_len):
        positions = base[row] + taps
        w = kernel((taps - ratio[row]) * stretch)
        w = w / w.sum()
        if exclude_outside:
            w = np.where((positions < 0) | (positions >= in_len), 0.0, w)
            w = w / w.sum()
        np.add.at(matrix[row], np.clip(positions, 0, in_len - 1), w)
    return matrix


def _output_sizes(x, axes, scales, sizes, policy):
    shape = list(x.shape)
    if sizes is not None and sizes.numel():
        wanted = [int(s) for s in sizes.tolist()]
        ratios = [w / shape[a] for w, a in zip(wanted, axes)]
        if policy != "stretch":
            pick = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [pick] * len(axes)
            wanted = [int(pick * shape[a] + 0.5) for a in axes]
        return wanted, ratios
    ratios = [float(s) for s in scales.tolist()]
    return [int(math.floor(shape[a] * r)) for a, r in zip(axes, ratios)], ratios


@register("Resize", since=11)
def resize(x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None, coordinate_transformation_mode="half_pixel",
           cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
           mode="nearest", nearest_mode="round_prefer_floor"):
    rank = x.dim()
    axes = [a % rank for a in axes] if axes else list(range(rank))
    out_sizes, ratios = _output_sizes(x, axes, scales, sizes, keep_aspect_ratio_policy)
    roi_values = roi.tolist() if roi is not None and roi.numel() else None
    result = x.to(torch.float64)
    outside_any = torch.zeros(tuple(out_sizes), dtype=torch.bool) if coordinate_transformation_mode == "tf_crop_and_resize" else None
    for i, (axis, out_len, scale) in enumerate(zip(axes, out_sizes, ratios)):
        in_len = x.shape[axis]
        start, end = (roi_values[i], roi_values[i + len(axes)]) if roi_values else (0.0, 1.0)
        source, outside = _source_coordinates(coordinate_transformation_mode, out_len, in_len, scale, start, end)
        matrix = torch.from_numpy(_weights(source, in_len, scale, mode, nearest_mode, cubic_coeff_a, antialias,
                                           exclude_outside))
        result = torch.movedim(torch.tensordot(result, matrix, dims=([axis], [1])), -1, axis)
        if outside_any is not None and outside.any():
            view = [1] * len(axes)
            view[i] = out_len
            outside_any = outside_any | torch.from_numpy(outside).reshape(view)
    if outside_any is not None and outside_any.any():
        full = [1] * rank
        for i, axis in enumerate(axes):
            full[axis] = out_sizes[i]
        result = torch.where(outside_any.reshape(full), torch.tensor(extrapolation_value, dtype=torch.float64), result)
    if not x.is_floating_point():
        result = torch.round(result)
    return result.to(x.dtype)


@register("Resize", since=10)
def resize_10(x, scales, *, mode="nearest"):
    return resize(x, None, scales, None, coordinate_transformation_mode="asymmetric", mode=mode, nearest_mode="floor")


@register("Upsample", since=9)
def upsample(x, scales, *, mode="nearest"):
    return resize_10(x, scales, mode=mode)


@register("Upsample", since=7)
def upsample_7(x, *, mode="nearest", scales):
    return resize_10(x, torch.tensor(scales), mode=mode)


@register("GridSample", since=16)
def grid_sample(x, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    torch_mode = {"linear": "bilinear", "bilinear": "bilinear", "cubic": "bicubic", "bicubic": "bicubic"}.get(mode, mode)
    if torch_mode == "nearest":
        return _grid_sample_nearest(x, grid, bool(align_corners), padding_mode)
    return F.grid_sample(x, grid.to(x.dtype), mode=torch_mode, padding_mode=padding_mode, align_corners=bool(align_corners))


def _unnormalize(coordinate, size, align_corners):
    return (coordinate + 1) / 2 * (size - 1) if align_corners else ((coordinate + 1) * size - 1) / 2


def _reflect(coordinate, low, high):
    """ONNX's reflection of out-of-range coordinates into [low, high]."""
    span = high - low
    if span <= 0:
        return torch.zeros_like(coordinate) + low
    shifted = torch.abs(coordinate - low) % (2 * span)
    return low + torch.where(shifted > span, 2 * span - shifted, shifted)


def _grid_sample_nearest(x, grid, align_corners, padding_mode):
    """Nearest sampling rounding half to even, as ONNX's reference does (torch's kernel rounds differently)."""
    spatial = list(x.shape[2:])
    rank = len(spatial)
    indices, valid = [], torch.ones(grid.shape[:-1], dtype=torch.bool)
    for d in range(rank):
        size = spatial[rank - 1 - d]
        c = _unnormalize(grid[..., d].to(torch.float64), size, align_corners)
        if padding_mode == "border":
            c = c.clamp(0, size - 1)
        elif padding_mode == "reflection":
            c = _reflect(c, 0, size - 1) if align_corners else _reflect(c, -0.5, size - 0.5)
        c = torch.round(c).to(torch.int64)
        if padding_mode == "reflection":
            c = c.clamp(0, size - 1)
        valid &= (c >= 0) & (c < size)
        indices.append(c.clamp(0, size - 1))
    indices = indices[::-1]
    n = x.shape[0]
    out = []
    for b in range(n):
        picked = x[b][(slice(None),) + tuple(i[b] for i in indices)]
        out.append(torch.where(valid[b], picked, torch.zeros((), dtype=x.dtype)))
    return torch.stack(out)


@register("LpPool", since=18)
def lp_pool(x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape, p=2, pads=None, strides=None):
    rank = x.dim() - 2
    strides = list(strides or [1] * rank)
    dilations = list(dilations or [1] * rank)
    full = resolve_pads(auto_pad, list(x.shape[2:]), list(kernel_shape), strides, dilations, pads)
    extra = _pool_output_pads(list(x.shape[2:]), list(kernel_shape), strides, dilations, full, ceil_mode)
    full = full[:rank] + [e + q for e, q in zip(extra, full[rank:])]
    padded = F.pad(torch.abs(x) ** p, _torch_pad(full))
    weight = torch.ones((x.shape[1], 1) + tuple(kernel_shape), dtype=x.dtype)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return conv(padded, weight, None, strides, 0, dilations, x.shape[1]) ** (1.0 / p)


@register("LpPool", since=11)
def lp_pool_11(x, *, auto_pad="NOTSET", kernel_shape, p=2, pads=None, strides=None):
    return lp_pool(x, auto_pad=auto_pad, kernel_shape=kernel_shape, p=p, pads=pads, strides=strides)


@register("GlobalLpPool", since=2)
def global_lp_pool(x, *, p=2):
    dims = tuple(range(2, x.dim()))
    return (torch.abs(x) ** p).sum(dim=dims, keepdim=True) ** (1.0 / p)


@register("LpNormalization", since=1)
def lp_normalization(x, *, axis=-1, p=2):
    norm = (torch.abs(x) ** p).sum(dim=axis, keepdim=True) ** (1.0 / p)
    return torch.where(norm == 0, torch.zeros_like(x), x / norm)


@register("Col2Im", since=18)
def col2im(x, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    """Sum the columns' blocks back into an image of `image_shape` (any number of spatial axes)."""
    image = [int(v) for v in image_shape.tolist()]
    block = [int(v) for v in block_shape.tolist()]
    rank = len(image)
    dilations = list(dilations or [1] * rank)
    pads = list(pads or [0] * (2 * rank))
    strides = list(strides or [1] * rank)
    n, cb, _ = x.shape
    channels = cb // int(np.prod(block))
    padded = [image[i] + pads[i] + pads[i + rank] for i in range(rank)]
    counts = [(padded[i] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1 for i in range(rank)]
    out = torch.zeros((n, channels) + tuple(padded), dtype=x.dtype)
    columns = x.reshape((n, channels) + tuple(block) + tuple(counts))
    for offset in np.ndindex(*block):
        for position in np.ndindex(*counts):
            where = tuple(position[i] * strides[i] + offset[i] * dilations[i] for i in range(rank))
            out[(slice(None), slice(None)) + where] += columns[(slice(None), slice(None)) + offset + position]
    crop = tuple(slice(pads[i], pads[i] + image[i]) for i in range(rank))
    return out[(slice(None), slice(None)) + crop]


@register("MaxUnpool", since=11)
def max_unpool(x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    rank = x.dim() - 2
    strides = list(strides or [1] * rank)
    pads = list(pads or [0] * (2 * rank))
    spatial = [(x.shape[2 + i] - 1) * strides[i] - pads[i] - pads[i + rank] + kernel_shape[i] for i in range(rank)]
    shape = list(x.shape[:2]) + spatial
    # MaxPool's indices count over the whole default-sized tensor (batch and channel included);
    # a larger output_shape pads that result at the end of each spatial axis.
    out = torch.zeros(int(np.prod(shape)), dtype=x.dtype)
    out[indices.reshape(-1).to(torch.int64)] = x.reshape(-1)
    out = out.reshape(shape)
    if output_shape is not None:
        target = [int(v) for v in output_shape.tolist()][2:]
        out = F.pad(out, _torch_pad([0] * rank + [t - s for t, s in zip(target, spatial)]))
    return out


@register("DeformConv", since=19)
def deform_conv(x, w, offset, b=None, mask=None, *, dilations=None, group=1, kernel_shape=None, offset_group=1,
                pads=None, strides=None):
    """2-D deformable convolution: each kernel tap samples the input bilinearly (zeros outside) at its own offset."""
    n, channels = x.shape[:2]
    out_channels = w.shape[0]
    kh, kw = kernel_shape or list(w.shape[2:])
    sh, sw = strides or [1, 1]
    dh, dw = dilations or [1, 1]
    pt, pl = (pads or [0, 0, 0, 0])[:2]  # the output size (the offsets') already reflects the end pads
    oh, ow = offset.shape[2], offset.shape[3]
    offsets = offset.reshape(n, offset_group, kh * kw, 2, oh, ow).double()
    masks = mask.reshape(n, offset_group, kh * kw, oh, ow).double() if mask is not None else None
    base_y = (torch.arange(oh, dtype=torch.float64) * sh - pt).reshape(oh, 1)
    base_x = (torch.arange(ow, dtype=torch.float64) * sw - pl).reshape(1, ow)
    per_group = channels // offset_group
    source = x.double()
    columns = torch.zeros(n, channels, kh * kw, oh, ow, dtype=torch.float64)
    for g in range(offset_group):
        part = source[:, g * per_group:(g + 1) * per_group]
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            y = base_y + i * dh + offsets[:, g, k, 0]
            xx = base_x + j * dw + offsets[:, g, k, 1]
            sampled = _bilinear_zero(part, y, xx)
            if masks is not None:
                sampled = sampled * masks[:, g, k].unsqueeze(1)
            columns[:, g * per_group:(g + 1) * per_group, k] = sampled
    weight = w.double().reshape(group, out_channels // group, -1)
    columns = columns.reshape(n, group, (channels // group) * kh * kw, oh * ow)
    y = torch.einsum("gok,ngkp->ngop", weight, columns).reshape(n, out_channels, oh, ow)
    if b is not None:
        y = y + b.double().reshape(1, -1, 1, 1)
    return y.to(x.dtype)


def _bilinear_zero(image, y, x):
    """image [N, C, H, W] sampled at per-batch positions y, x [N, OH, OW]; corners outside the image count as 0."""
    n, c, height, width = image.shape
    y0, x0 = torch.floor(y), torch.floor(x)
    result = torch.zeros(n, c, *y.shape[1:], dtype=image.dtype)
    flat = image.reshape(n, c, height * width)
    for dy in (0, 1):
        for dx in (0, 1):
            cy, cx = y0 + dy, x0 + dx
            weight = (1 - torch.abs(y - cy)) * (1 - torch.abs(x - cx))
            inside = (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
            index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long().reshape(n, 1, -1).expand(n, c, -1)
            values = torch.gather(flat, 2, index).reshape(n, c, *y.shape[1:])
            result = result + values * (weight * inside).unsqueeze(1)
    return result


@register("ImageDecoder", since=20)
def image_decoder(encoded_stream, *, pixel_format="RGB"):
    """Decode an encoded image (JPEG, PNG, BMP, TIFF, WebP, ...) to uint8 HWC with Pillow (the "images" extra)."""
    import io

    try:
        from PIL import Image
    except ImportError:
        from ..errors import BuildError

        raise BuildError("ImageDecoder needs Pillow", code="KILN-E101",
                         hint="pip install 'kiln[images]' (or pillow)") from None
    image = Image.open(io.BytesIO(encoded_stream.numpy().tobytes()))
    if pixel_format == "Grayscale":
        return torch.from_numpy(np.asarray(image.convert("L"))[..., None].copy())
    pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy((pixels[..., ::-1] if pixel_format == "BGR" else pixels).copy())
