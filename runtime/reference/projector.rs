//! Twins of cuda/projector.cu (gelu itself is in gelu.rs).

use super::{gelu, rmsnorm};

/// x[r, c] = gelu(x[r, c] + bias[c]) in place: fc1's bias and activation after its GEMM.
pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    bias_add(x, bias);
    gelu(x);
}

/// x[r, c] += bias[c] in place.
pub fn bias_add(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// RMSNorm of each vision patch (x: [patches, dv], weight w: [dv]) laid out as rows of
/// m² consecutive patches (y: [patches / m², m² · dv]): the input of the projector's fc1.
/// The concatenation is a reshape of the row-major layout, so this is RMSNorm per patch.
pub fn projector_norm_gather(x: &[f32], w: &[f32], y: &mut [f32], dv: usize, eps: f32) {
    rmsnorm(x, w, y, dv, eps);
}
