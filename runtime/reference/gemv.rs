//! Twin of cuda/gemv.cu.

use super::{linear, swiglu};

/// y[b, n] = x[b, :] · w[n, :] (+ bias[n]) for the b = x.len() / k rows of x: the decode
/// GEMV (bf16 weights on the device, f32 here), the nn.Linear convention of `linear`.
pub fn gemv_bf16(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], k: usize) {
    linear(x, w, bias, y, k);
}

/// y[b, j] = silu(x[b] · w[j]) · (x[b] · w[inter + j]): the gate/up GEMV with SwiGLU as
/// its epilogue; w: [2 · inter, k] (gate rows, then up rows), y: [rows, inter].
pub fn gemv_swiglu(x: &[f32], w: &[f32], y: &mut [f32], k: usize) {
    let mut gate_up = vec![0.0; x.len() / k * (w.len() / k)];
    linear(x, w, None, &mut gate_up, k);
    swiglu(&gate_up, y, w.len() / k / 2);
}
