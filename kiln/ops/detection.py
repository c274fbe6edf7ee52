"""Detection post-processing and region operators: NonMaxSuppression, RoiAlign."""
from __future__ import annotations

import torch

from .registry import register


def _corners(boxes, center_point_box):
    """[N, 4] boxes as (y1, x1, y2, x2) with y1 <= y2 and x1 <= x2 (ONNX allows either diagonal)."""
    if center_point_box:
        xc, yc, w, h = boxes.unbind(-1)
        return torch.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1)
    y1, x1, y2, x2 = boxes.unbind(-1)
    return torch.stack([torch.minimum(y1, y2), torch.minimum(x1, x2), torch.maximum(y1, y2), torch.maximum(x1, x2)], -1)


def _iou(box, others):
    top = torch.maximum(box[0], others[:, 0])
    left = torch.maximum(box[1], others[:, 1])
    bottom = torch.minimum(box[2], others[:, 2])
    right = torch.minimum(box[3], others[:, 3])
    inter = (bottom - top).clamp(min=0) * (right - left).clamp(min=0)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(box) + area(others) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


@register("NonMaxSuppression", since=11)
def non_max_suppression(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None, score_threshold=None, *,
                        center_point_box=0):
    """Greedy per batch and class: highest score first, dropping boxes whose IoU with a kept one exceeds the threshold."""
    limit = int(max_output_boxes_per_class.reshape(-1)[0]) if max_output_boxes_per_class is not None and \
        max_output_boxes_per_class.numel() else 0
    iou_limit = float(iou_threshold.reshape(-1)[0]) if iou_threshold is not None and iou_threshold.numel() else 0.0
    floor = float(score_threshold.reshape(-1)[0]) if score_threshold is not None and score_threshold.numel() else None
    selected = []
    for b in range(boxes.shape[0]):
        corners = _corners(boxes[b].double(), center_point_box)
        for c in range(scores.shape[1]):
            if limit <= 0:
                break
            s = scores[b, c].double()
            order = torch.sort(s, descending=True, stable=True).indices
            if floor is not None:
                order = order[s[order] > floor]
            kept: list[int] = []
            for index in order.tolist():
                if len(kept) >= limit:
                    break
                if kept and bool((_iou(corners[index], corners[kept]) > iou_limit).any()):
                    continue
                kept.append(index)
            selected += [[b, c, k] for k in kept]
    return torch.tensor(selected, dtype=torch.int64).reshape(-1, 3)


@register("RoiAlign", since=16)
def roi_align(x, rois, batch_indices, *, coordinate_transformation_mode="half_pixel", mode="avg", output_height=1,
              output_width=1, sampling_ratio=0, spatial_scale=1.0):
    """Average (or max) of bilinear samples on a grid inside each region, per output cell (ONNX's RoiAlign)."""
    offset = 0.5 if coordinate_transformation_mode == "half_pixel" else 0.0
    _, channels, height, width = x.shape
    out = torch.zeros(rois.shape[0], channels, output_height, output_width, dtype=x.dtype)
    for r in range(rois.shape[0]):
        image = x[int(batch_indices[r])].double()
        x1, y1, x2, y2 = (float(v) * spatial_scale for v in rois[r])
        x1, y1, x2, y2 = x1 - offset, y1 - offset, x2 - offset, y2 - offset
        roi_w, roi_h = x2 - x1, y2 - y1
        if coordinate_transformation_mode != "half_pixel":  # legacy: regions at least one pixel
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / output_height, roi_w / output_width
        grid_h = sampling_ratio if sampling_ratio > 0 else int(-(-roi_h // output_height))
        grid_w = sampling_ratio if sampling_ratio > 0 else int(-(-roi_w // output_width))
        grid_h, grid_w = max(grid_h, 1), max(grid_w, 1)
        for ph in range(output_height):
            for pw in range(output_width):
                samples = []
                for iy in range(grid_h):
                    y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        xx = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        samples.append(_bilinear(image, y, xx, height, width, mode))
                stacked = torch.stack(samples)
                out[r, :, ph, pw] = (stacked.max(0).values if mode == "max" else stacked.mean(0)).to(x.dtype)
    return out


def _bilinear(image, y, x, height, width, mode):
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(image.shape[0], dtype=image.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    terms = [hy * hx * image[:, y0, x0], hy * lx * image[:, y0, x1], ly * hx * image[:, y1, x0], ly * lx * image[:, y1, x1]]
    if mode == "max":  # ONNX's max mode takes the largest weighted corner, not the interpolated value
        return torch.stack(terms).max(0).values
    return sum(terms)
