//! Twin of cuda/gemv.cu.

use super::linear;

/// y[b, n] = x[b, :] · w[n, :] (+ bias[n]) for the b = x.len() / k rows of x: the decode
/// GEMV (bf16 weights on the device, f32 here), the nn.Linear convention of `linear`.
pub fn gemv_bf16(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], k: usize) {
    linear(x, w, bias, y, k);
}
