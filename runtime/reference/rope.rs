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
        let angles: Vec<(f32, f32)> = inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()).collect();
        for xh in xt.chunks_exact_mut(head_dim) {
            rotate_half(xh, half, &angles);
        }
    }
}

/// Multimodal RoPE (Qwen2.5-VL): like `rope`, but rotary pair i takes its position from
/// one of three axes (temporal, height, width): the first `section[0]` pairs from
/// `positions[0]`, the next `section[1]` from `positions[1]`, the rest from
/// `positions[2]`. positions: [3, tokens] row-major; section sums to head_dim / 2.
pub fn mrope(x: &mut [f32], positions: &[i32], section: [usize; 3], heads: usize, head_dim: usize, theta: f32) {
    let inv_freq = rope_inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let n = positions.len() / 3;
    let axis = |i: usize| (i >= section[0]) as usize + (i >= section[0] + section[1]) as usize;
    for (t, xt) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let angles: Vec<(f32, f32)> = inv_freq
            .iter()
            .enumerate()
            .map(|(i, &f)| (positions[axis(i) * n + t] as f32 * f).sin_cos())
            .collect();
        for xh in xt.chunks_exact_mut(head_dim) {
            rotate_half(xh, half, &angles);
        }
    }
}

/// 2-D RoPE of the vision tower: the first head_dim/4 pairs rotate with the patch's row,
/// the next head_dim/4 with its column, each with frequencies 1 / theta^(2j / (head_dim/2)).
pub fn rope_vision(x: &mut [f32], rows: &[i32], cols: &[i32], heads: usize, head_dim: usize, theta: f32) {
    let inv_freq = rope_inv_freq(head_dim / 2, theta);
    let (half, quarter) = (head_dim / 2, head_dim / 4);
    for ((xt, &r), &c) in x.chunks_exact_mut(heads * head_dim).zip(rows).zip(cols) {
        let angles: Vec<(f32, f32)> = (0..half)
            .map(|i| {
                if i < quarter {
                    r as f32 * inv_freq[i]
                } else {
                    c as f32 * inv_freq[i - quarter]
                }
                .sin_cos()
            })
            .collect();
        for xh in xt.chunks_exact_mut(head_dim) {
            rotate_half(xh, half, &angles);
        }
    }
}

/// A decoder layer's RoPE and cache write, as one op after the QKV projection: the
/// queries rotated into `q_out`, the keys rotated and the values written at positions
/// len.. of the caches; `mrope` with `section`, else `rope`. qkv: [tokens, (hq + 2·hkv) ·
/// head_dim], each token's row its q heads, k heads, v heads; q_out: [tokens, hq ·
/// head_dim]; positions as `rope` / `mrope` read them.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    qkv: &[f32],
    positions: &[i32],
    section: Option<[usize; 3]>,
    q_out: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    len: usize,
    (hq, hkv, head_dim): (usize, usize, usize),
    theta: f32,
) {
    let (qr, kvr) = (hq * head_dim, hkv * head_dim);
    let part = |at: usize, width: usize| -> Vec<f32> {
        qkv.chunks_exact(qr + 2 * kvr)
            .flat_map(|row| &row[at..at + width])
            .copied()
            .collect()
    };
    let (mut q, mut k, v) = (part(0, qr), part(qr, kvr), part(qr + kvr, kvr));
    for (x, heads) in [(&mut q, hq), (&mut k, hkv)] {
        match section {
            Some(s) => mrope(x, positions, s, heads, head_dim, theta),
            None => rope(x, positions, heads, head_dim, theta),
        }
    }
    q_out[..q.len()].copy_from_slice(&q);
    super::kv_append(&k, &v, k_cache, v_cache, len, kvr);
}

fn rotate_half(xh: &mut [f32], half: usize, angles: &[(f32, f32)]) {
    for (i, &(s, c)) in angles.iter().enumerate() {
        let (x1, x2) = (xh[i], xh[i + half]);
        xh[i] = x1 * c - x2 * s;
        xh[i + half] = x2 * c + x1 * s;
    }
}
