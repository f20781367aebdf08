//! Twin of cuda/gemv.cu.

use super::{linear, rms_scale, rope_kv_append, swiglu};

/// What a GEMV fuses around its dot products (cuda/gemv.cu's `rms_eps` and `add_to_y`),
/// sparing a decoder layer the RMSNorm launches between its sublayers.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GemvFuse {
    /// x is the residual stream: each row is RMS-normalised on the way in, with this eps.
    /// The norm's weight is not applied: the caller folded it into w's columns
    /// (w'[n, k] = w[n, k] · norm[k]), so what is left is the row's scale.
    pub rms_eps: Option<f32>,
    /// y += the result instead of y = the result (the residual add).
    pub add_to_y: bool,
}

impl GemvFuse {
    pub const NONE: GemvFuse = GemvFuse {
        rms_eps: None,
        add_to_y: false,
    };
    pub const fn rms(eps: f32) -> GemvFuse {
        GemvFuse {
            rms_eps: Some(eps),
            add_to_y: false,
        }
    }
    pub const ADD: GemvFuse = GemvFuse {
        rms_eps: None,
        add_to_y: true,
    };
}

/// [`rms_scale`] of each row of x ([rows, k]).
pub fn rms_row_scales(x: &[f32], k: usize, eps: f32) -> Vec<f32> {
    x.chunks_exact(k).map(|r| rms_scale(r, eps)).collect()
}

/// y[b, n] = (x[b, :] · w[n, :]) · s_b (+ bias[n]) for the b = x.len() / k rows of x, s_b
/// = the row's RMS scale under `fuse.rms_eps`, else 1; added to y under `fuse.add_to_y`.
/// The decode GEMV (bf16 weights on the device, f32 here), the nn.Linear convention of
/// `linear`.
pub fn gemv_bf16(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], k: usize, fuse: GemvFuse) {
    let n = w.len() / k;
    let mut out = vec![0.0; x.len() / k * n];
    linear(x, w, None, &mut out, k);
    let scales = fuse.rms_eps.map(|eps| rms_row_scales(x, k, eps));
    for (b, (yr, o)) in y.chunks_exact_mut(n).zip(out.chunks_exact(n)).enumerate() {
        let s = scales.as_ref().map_or(1.0, |s| s[b]);
        for (j, (yv, &ov)) in yr.iter_mut().zip(o).enumerate() {
            let v = ov * s + bias.map_or(0.0, |bs| bs[j]);
            *yv = if fuse.add_to_y { *yv + v } else { v };
        }
    }
}

/// [`gemv_bf16`] (without `add_to_y`), then each row's [`super::argmax`]: the LM head of
/// greedy decoding with its argmax fused (`CudaDevice::gemv_bf16_argmax`).
pub fn gemv_bf16_argmax(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    k: usize,
    fuse: GemvFuse,
) -> Vec<usize> {
    gemv_bf16(x, w, bias, y, k, fuse);
    let n = w.len() / k;
    if n == 0 {
        return vec![0; x.len() / k];
    }
    y.chunks_exact(n).map(super::argmax).collect()
}

/// The QKV projection with RoPE and the cache write fused (`gemv_rope_kv_append` in
/// cuda/gemv.cu): qkv = [`gemv_bf16`] of x's rows (RMS-scaled under `rms_eps`) by the
/// stacked projection w ([(hq + 2·hkv) · head_dim, k], + bias), rounded to bf16 as the
/// device's qkv rows hold it, then [`rope_kv_append`] of it (its arguments after qkv).
#[allow(clippy::too_many_arguments)]
pub fn gemv_rope_kv_append(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    rms_eps: Option<f32>,
    positions: &[i32],
    section: Option<[usize; 3]>,
    q_out: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    len: usize,
    heads: (usize, usize, usize),
    theta: f32,
) {
    let mut qkv = vec![0.0; x.len() / k * (w.len() / k)];
    let fuse = GemvFuse {
        rms_eps,
        add_to_y: false,
    };
    gemv_bf16(x, w, bias, &mut qkv, k, fuse);
    for v in &mut qkv {
        *v = half::bf16::from_f32(*v).to_f32();
    }
    rope_kv_append(&qkv, positions, section, q_out, k_cache, v_cache, len, heads, theta);
}

/// y[b, j] = silu(g) · u with g = (x[b] · w[j]) · s_b, u = (x[b] · w[inter + j]) · s_b: the
/// gate/up GEMV with SwiGLU as its epilogue; w: [2 · inter, k] (gate rows, then up rows),
/// y: [rows, inter]; s_b the row's RMS scale under `rms_eps` (as [`gemv_bf16`]), else 1.
pub fn gemv_swiglu(x: &[f32], w: &[f32], y: &mut [f32], k: usize, rms_eps: Option<f32>) {
    let mut gate_up = vec![0.0; x.len() / k * (w.len() / k)];
    let fuse = GemvFuse {
        rms_eps,
        add_to_y: false,
    };
    gemv_bf16(x, w, None, &mut gate_up, k, fuse);
    swiglu(&gate_up, y, w.len() / k / 2);
}
