"""The tile product every kernel shares: a @ b accumulated in float32, per input dtype."""
import torch
import triton
import triton.language as tl


@triton.jit
def dot_f32(a, b, MODE: tl.constexpr):
    """a @ b accumulated in float32, MODE from `dot_mode`.

    "ieee" (float32 inputs): exact fp32 products, no TF32, so GPU selections match the reference.
    "mma" (fp16/bf16 inputs): tensor cores; the products are exact in the float32 accumulator.
    "interpreter" (TRITON_INTERPRET=1): a broadcast product and sum. The interpreter's tl.dot is
    numpy's matmul, whose BLAS kernels round rows differently (identical tokens would get
    different scores, breaking SPEC's tie rule), and which multiplies bf16 as raw integer bits.
    """
    if MODE == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    elif MODE == "interpreter":
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b)


# Triton fixes interpreted-or-compiled when a function is decorated (TRITON_INTERPRET=1 then).
_INTERPRETED = type(dot_f32).__name__ == "InterpretedFunction"


def dot_mode(dtype):
    """The MODE of `dot_f32` for inputs of `dtype`."""
    if _INTERPRETED:
        return "interpreter"
    return "ieee" if dtype == torch.float32 else "mma"
