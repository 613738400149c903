"""Exact top-count selection with ties to the lower index, for one row held in registers.

`tl.sort` returns values, not indices, so instead of sorting we find the count-th largest score
by bisection and resolve ties with a running count (which walks the row in index order):
    1. map each float score to an int32 whose integer order is the float order;
    2. bisect the 2^32 int32 range (32 steps, one row reduction each) for the largest v with
       #{ordered >= v} >= count: v is the count-th largest value;
    3. keep every entry above v, and of the entries equal to v the lowest-index ones, as many as
       are still missing.
That is exactly the set a stable descending sort (SPEC.md's tie rule) puts first.
`store_top_anchors` wraps it for step 1, whichever anchor rule made the scores.
"""
import triton
import triton.language as tl


@triton.jit
def order_key(value, valid):
    """int32 with the order of float32 `value`; NaN ranks above +inf (as in torch.sort), and
    invalid entries below -inf, so they can never be selected while enough valid ones exist."""
    value = value.to(tl.float32)
    # -0.0 and +0.0 compare equal, so they must share one key (the tie rule then decides).
    value = tl.where(value == 0.0, 0.0, value)
    bits = value.to(tl.int32, bitcast=True)
    # Negative floats order backwards by their magnitude bits: flip those 31 bits.
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    ordered = tl.where(value != value, 0x7FFFFFFF, ordered)   # every NaN: one key, above +inf
    return tl.where(valid, ordered, -2147483648)                # -inf maps above this


@triton.jit
def top_count_mask(value, valid, count):
    """True at the `count` largest `value`s among the `valid` entries of a 1-D block, ties to
    the lower index; none when count == 0. Callers guarantee count <= #valid."""
    ordered = order_key(value, valid)
    # Invariant: #{ordered >= lo} >= count, and the answer lies in [lo, hi].
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((ordered >= mid).to(tl.int32), axis=0) >= count
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = ordered > lo
    missing = count - tl.sum(above.to(tl.int32), axis=0)
    tie = valid & (ordered == lo)
    return valid & (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= missing)))


@triton.jit
def store_top_anchors(score, tok, tok_ok, patch, count, anchor_mask_ptr, anchor_idx_ptr):
    """Step 1's bookkeeping for one image's row of anchor scores: the `count` largest among the
    `patch` entries (prefix tokens and padding excluded) as an int8 mask over the T tokens and
    as a list in ascending token order (each anchor's slot is its running count)."""
    is_anchor = top_count_mask(score, patch, count)
    tl.store(anchor_mask_ptr + tok, is_anchor.to(tl.int8), mask=tok_ok)
    slot = tl.cumsum(is_anchor.to(tl.int32), axis=0) - 1
    tl.store(anchor_idx_ptr + slot, tok, mask=is_anchor)
