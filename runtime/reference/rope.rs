//! Twin of cuda/rope.cu.

/// Inverse frequencies of the rotary pairs, in f32 as transformers computes them:
/// 1 / theta^(2i / head_dim).
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Rotates x: [tokens, heads, head_dim] in place, rotate-half convention: pair i of a
/// head is (x[i], x[i + head_dim/2]) turned by positions[t] · inv_freq[i].
pub fn rope(x: &mut [f32], positions: &[i32], heads: usize, head_dim: usize, theta: f32) {
    let inv_freq = rope_inv_freq(head_dim, theta);
    let half = head_dim / 2;
    for (xt, &pos) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        for xh in xt.chunks_exact_mut(head_dim) {
            for (i, &f) in inv_freq.iter().enumerate() {
                let (s, c) = (pos as f32 * f).sin_cos();
                let (x1, x2) = (xh[i], xh[i + half]);
                xh[i] = x1 * c - x2 * s;
                xh[i + half] = x2 * c + x1 * s;
            }
        }
    }
}
