//! The CPU backend: the reference ops of `crate::reference`, parallelised with rayon,
//! and GEMMs through the `gemm` crate. f32 throughout.

use rayon::prelude::*;

use crate::reference;

/// Rows per rayon task for the cheap row-wise ops: enough work to amortise a task.
const ROWS_PER_TASK: usize = 16;

/// y[n, m] = x[n, k] · w[m, k]ᵀ + bias: every nn.Linear of the models.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<f32> {
    let n = x.len() / k;
    let m = w.len() / k;
    debug_assert_eq!(x.len(), n * k, "linear: x is not a whole number of rows");
    debug_assert_eq!(w.len(), m * k, "linear: w is not a whole number of rows");
    let mut y = vec![0.0f32; n * m];
    if let Some(b) = bias {
        for row in y.chunks_exact_mut(m) {
            row.copy_from_slice(b);
        }
    }
    if n == 0 || m == 0 {
        return y;
    }
    // SAFETY: the strides describe x as row-major [n, k], wᵀ as [k, m] read from the
    // row-major w [m, k], and y as row-major [n, m]; all three buffers have those sizes
    // (checked above) and y does not alias the inputs.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            m as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    y
}

pub fn rmsnorm(x: &[f32], w: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    y.par_chunks_mut(dim * ROWS_PER_TASK)
        .zip(x.par_chunks(dim * ROWS_PER_TASK))
        .for_each(|(y, x)| reference::rmsnorm(x, w, y, dim, eps));
    y
}

pub fn swiglu(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let mut out = vec![0.0; gate_up.len() / 2];
    out.par_chunks_mut(inter * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * inter * ROWS_PER_TASK))
        .for_each(|(o, gu)| reference::swiglu(gu, o, inter));
    out
}

pub fn rope(x: &mut [f32], positions: &[i32], heads: usize, head_dim: usize, theta: f32) {
    x.par_chunks_mut(heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(xt, p)| reference::rope(xt, std::slice::from_ref(p), heads, head_dim, theta));
}

/// M-RoPE; positions: [3, n] (see `reference::mrope`).
pub fn mrope(x: &mut [f32], positions: &[i32], section: [usize; 3], heads: usize, head_dim: usize, theta: f32) {
    let n = positions.len() / 3;
    x.par_chunks_mut(heads * head_dim).enumerate().for_each(|(t, xt)| {
        let p = [positions[t], positions[n + t], positions[2 * n + t]];
        reference::mrope(xt, &p, section, heads, head_dim, theta)
    });
}

pub fn rope_vision(x: &mut [f32], rows: &[i32], cols: &[i32], heads: usize, head_dim: usize, theta: f32) {
    x.par_chunks_mut(heads * head_dim)
        .zip(rows.par_iter().zip(cols.par_iter()))
        .for_each(|(xt, (r, c))| {
            reference::rope_vision(
                xt,
                std::slice::from_ref(r),
                std::slice::from_ref(c),
                heads,
                head_dim,
                theta,
            )
        });
}

pub fn gelu(x: &mut [f32]) {
    x.par_chunks_mut(4096).for_each(reference::gelu);
}

/// Non-causal attention within the segments of `cu_seqlens`, one rayon task per segment.
pub fn attention_varlen(q: &[f32], k: &[f32], v: &[f32], cu_seqlens: &[usize], heads: usize, d: usize) -> Vec<f32> {
    let row = heads * d;
    let parts: Vec<Vec<f32>> = cu_seqlens
        .par_windows(2)
        .map(|seg| {
            let (lo, hi) = (seg[0] * row, seg[1] * row);
            let mut o = vec![0.0; hi - lo];
            reference::attention_varlen(
                &q[lo..hi],
                &k[lo..hi],
                &v[lo..hi],
                &mut o,
                &[0, seg[1] - seg[0]],
                heads,
                d,
            );
            o
        })
        .collect();
    parts.concat()
}

/// Causal GQA attention of n new queries against the cache (see `reference::attention`),
/// one rayon task per query token.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    start: usize,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let row = q_heads * d;
    let mut out = vec![0.0; q.len()];
    out.par_chunks_mut(row)
        .zip(q.par_chunks(row))
        .enumerate()
        .for_each(|(t, (o, qt))| {
            reference::attention(qt, k, v, o, start + t, q_heads, kv_heads, d, window);
        });
    out
}

/// Attention of n new queries under an explicit mask (token trees; see
/// `reference::attention_verify`). Tree blocks are small: one pass, no rayon.
#[allow(clippy::too_many_arguments)]
pub fn attention_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[u8],
    mask_start: usize,
    start: usize,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
) -> Vec<f32> {
    let mut out = vec![0.0; q.len()];
    reference::attention_verify(q, k, v, &mut out, mask, mask_start, start, q_heads, kv_heads, d);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn gemm_linear_matches_naive_loops() {
        for &(n, k, m) in &[(1, 7, 5), (3, 64, 33), (17, 96, 130)] {
            let x = pseudo(n * k, 1);
            let w = pseudo(m * k, 2);
            let b = pseudo(m, 3);
            let got = linear(&x, &w, Some(&b), k);
            let mut want = vec![0.0; n * m];
            reference::linear(&x, &w, Some(&b), &mut want, k);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{g} vs {w} at n={n} k={k} m={m}"
                );
            }
        }
    }

    #[test]
    fn parallel_attention_equals_reference() {
        let (n, start, qh, kvh, d) = (5, 3, 4, 2, 8);
        let q = pseudo(n * qh * d, 4);
        let k = pseudo((start + n) * kvh * d, 5);
        let v = pseudo((start + n) * kvh * d, 6);
        let got = attention(&q, &k, &v, start, qh, kvh, d, None);
        let mut want = vec![0.0; q.len()];
        reference::attention(&q, &k, &v, &mut want, start, qh, kvh, d, None);
        assert_eq!(got, want);
    }

    #[test]
    fn sliding_window_drops_old_keys() {
        // With window 1 every query sees only its own key, so the output is its own value.
        let (n, qh, d) = (4, 2, 4);
        let q = pseudo(n * qh * d, 7);
        let k = pseudo(n * d, 8);
        let v = pseudo(n * d, 9);
        let out = attention(&q, &k, &v, 0, qh, 1, d, Some(1));
        for t in 0..n {
            for h in 0..qh {
                assert_eq!(&out[(t * qh + h) * d..][..d], &v[t * d..][..d]);
            }
        }
    }
}
