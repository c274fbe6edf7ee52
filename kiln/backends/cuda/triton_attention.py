"""kiln's own flash-style attention forward kernel in Triton, for kiln::Attention on the GPU: each program
takes a block of query rows of one (batch, head) and walks the keys block by block with an online
softmax (running max and sum, fp32 accumulation), so the [Sq, Sk] score matrix is never written out.

Imported only when a CUDA engine is lowered (it needs triton). The tactic chooser times its launch
variants (query block, key block, warps, pipeline stages) against torch's SDPA backends.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_HEAD_DIM = 128  # q/k and v rows live in registers whole: wider heads go to SDPA
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second axis, which carries batch * heads


@triton.jit
def _flash_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, heads, q_len, k_len, head_dim, value_dim, scale,
                            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                            sob, soh, som, sod, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    value_dims = tl.arange(0, BLOCK_DV)
    row_in = rows < q_len
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :] * sqd,
                mask=row_in[:, None] & (dims[None, :] < head_dim), other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_base = mask_ptr + b * smb + h * smh
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(0, k_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_in = cols < k_len
        k = tl.load(k_base + cols[None, :] * skn + dims[:, None] * skd,
                    mask=col_in[None, :] & (dims[:, None] < head_dim), other=0.0)
        # scores stay in natural units (not pre-scaled by log2 e) so that a -3.4e38 mask does not overflow to -inf:
        # a row that the mask rules out entirely then averages its values, as the reference does
        scores = tl.dot(q, k, input_precision=PRECISION) * scale
        if HAS_MASK:
            scores += tl.load(m_base + rows[:, None] * smm + cols[None, :] * smn,
                              mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        scores = tl.where(col_in[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # -inf - -inf would be NaN
        p = tl.exp2((scores - safe_max[:, None]) * 1.4426950408889634)  # exp(x) as exp2(x * log2 e)
        alpha = tl.exp2((running_max - safe_max) * 1.4426950408889634)
        running_sum = running_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + value_dims[None, :] * svd,
                    mask=col_in[:, None] & (value_dims[None, :] < value_dim), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * som + value_dims[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_in[:, None] & (value_dims[None, :] < value_dim))


def flash_supported(q, k, v, mask) -> bool:
    """Whether flash_attention takes these inputs: 3-D or 4-D, heads up to 128 wide, one float dtype for q/k/v,
    a float (additive) mask if any, nothing empty, and batch * heads within the grid."""
    import torch

    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return False
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False
    if k.shape[-1] != q.shape[-1] or k.shape[-2] != v.shape[-2]:
        return False
    # kiln::Attention adds its mask; a bool mask would mean "+1 where True", which SDPA would read differently
    if mask is not None and (not mask.dtype.is_floating_point or mask.dim() > q.dim()):
        return False
    try:
        shape = _scores_shape(q, k, v, mask)
    except RuntimeError:  # batch dims that do not broadcast: let the reference raise its own error
        return False
    batch_heads = shape[0] * (shape[1] if len(shape) == 4 else 1)
    return 0 not in shape and q.shape[-1] > 0 and v.shape[-1] > 0 and batch_heads <= MAX_GRID_Y


def _scores_shape(q, k, v, mask) -> tuple:
    """[*batch, Sq, Sk]: q/k/v batch dims (and a mask's) broadcast against each other, as torch.matmul does."""
    import torch

    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    shape = (*batch, q.shape[-2], k.shape[-2])
    return tuple(torch.broadcast_shapes(shape, mask.shape)) if mask is not None else shape


def flash_attention(q, k, v, mask, scale: float, out_dtype, block_m: int = 64, block_n: int = 64, warps: int = 4,
                    stages: int = 2, precision: str = "tf32"):
    """softmax(q @ k^T * scale + mask) @ v over [B, H, S, D] or [B*H, S, D] tensors (any strides; batch dims
    and the mask broadcast through stride 0), written in out_dtype. `precision` is how fp32 products run
    ("ieee" or "tf32"); half inputs use the tensor cores' own rounding. Call only where flash_supported holds."""
    import torch

    scores_shape = _scores_shape(q, k, v, mask)
    batch, q_len, k_len = scores_shape[:-2], scores_shape[-2], scores_shape[-1]
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    q = q.expand(*batch, q_len, head_dim)
    k = k.expand(*batch, k_len, head_dim)
    v = v.expand(*batch, k_len, value_dim)
    result = out = torch.empty((*batch, q_len, value_dim), dtype=out_dtype, device=q.device)
    if mask is not None:
        mask = mask.expand(scores_shape)
    if len(batch) == 1:  # [B*H, S, D]: one head per batch entry
        q, k, v, out = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), out.unsqueeze(1)
        mask = mask.unsqueeze(1) if mask is not None else None
    heads = q.shape[1]
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(q_len, block_m), q.shape[0] * heads)
    # tl.dot needs blocks of at least 16: narrower heads are padded with masked-out columns
    _flash_attention_kernel[grid](q, k, v, mask if mask is not None else q, out, heads, q_len, k_len, head_dim, value_dim,
                                  scale, *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
                                  HAS_MASK=mask is not None, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                                  BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                                  BLOCK_DV=max(16, triton.next_power_of_2(value_dim)), num_warps=warps, num_stages=stages)
    return result
