"""The kept rows, prefix first: x_kept (B, p + K, C) and qkv_kept (B, p + K, 3C), contiguous:
the p prefix tokens in their order, then the K kept patches keep_idx.

Grid: (images, blocks of BLOCK_R output rows). Each program copies its rows in
(BLOCK_R, BLOCK_C) tiles, in the input dtype, so the kept rows are bit-identical to the input.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows(src_ptr, src_rows, stride_src, dst_ptr, dst_rows, row_ok, n_cols,
               BLOCK_C: tl.constexpr):
    cc = tl.arange(0, BLOCK_C)
    for c0 in range(0, n_cols, BLOCK_C):
        mask = row_ok[:, None] & (c0 + cc < n_cols)[None, :]
        tile = tl.load(src_ptr + src_rows[:, None] * stride_src + c0 + cc[None, :], mask=mask)
        tl.store(dst_ptr + dst_rows[:, None] * n_cols + c0 + cc[None, :], tile, mask=mask)


@triton.jit
def _gather_rows_kernel(
    x_ptr, qkv_ptr, keep_idx_ptr, x_out_ptr, qkv_out_ptr,
    C, NUM_PREFIX, KEPT,
    stride_x_b, stride_x_t, stride_qkv_b, stride_qkv_t,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)   # output rows
    row_ok = r < NUM_PREFIX + KEPT
    # Output row r < p is prefix token r; row r >= p is patch keep_idx[b, r - p].
    is_patch = r >= NUM_PREFIX
    src = tl.load(keep_idx_ptr + b * KEPT + r - NUM_PREFIX, mask=row_ok & is_patch, other=0)
    src = tl.where(is_patch, src, r)
    dst = b * (NUM_PREFIX + KEPT) + r
    _copy_rows(x_ptr + b * stride_x_b, src, stride_x_t, x_out_ptr, dst, row_ok, C, BLOCK_C)
    _copy_rows(qkv_ptr + b * stride_qkv_b, src, stride_qkv_t, qkv_out_ptr, dst, row_ok, 3 * C,
               BLOCK_C)


def gather_rows(x, qkv, keep_idx, num_prefix=1):
    """(x_kept, qkv_kept): rows 0..p-1, then keep_idx, of x (B, T, C) and qkv (B, T, 3C)."""
    B, T, C = x.shape
    rows = num_prefix + keep_idx.shape[1]
    x_kept = torch.empty(B, rows, C, device=x.device, dtype=x.dtype)
    qkv_kept = torch.empty(B, rows, 3 * C, device=x.device, dtype=qkv.dtype)
    BLOCK_R = 8
    _gather_rows_kernel[(B, triton.cdiv(rows, BLOCK_R))](
        x, qkv, keep_idx, x_kept, qkv_kept,
        C, num_prefix, keep_idx.shape[1],
        x.stride(0), x.stride(1), qkv.stride(0), qkv.stride(1),
        BLOCK_R=BLOCK_R, BLOCK_C=min(512, triton.next_power_of_2(C)), num_warps=4,
    )
    return x_kept, qkv_kept
