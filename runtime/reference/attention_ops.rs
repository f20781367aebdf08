//! Twins of the named attention kernels of cuda/attention.cu. Prefill and decode are
//! `attention` (causal GQA against the cache) at two shapes; verify adds an explicit mask
//! for the query block (causal for a chain, ancestors for a tree).

use super::attention;

/// Causal attention of n queries at cache positions start..start + n (see `attention`).
#[allow(clippy::too_many_arguments)]
pub fn attention_prefill(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    start: usize,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    window: Option<usize>,
) {
    attention(q, k, v, out, start, q_heads, kv_heads, d, window);
}

/// One query (q: [q_heads, d]) against the `len` cached keys, the new one included.
pub fn attention_decode(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], q_heads: usize, kv_heads: usize, d: usize) {
    let len = k.len() / (kv_heads * d);
    attention(q, k, v, out, len - 1, q_heads, kv_heads, d, None);
}

/// A block of n queries (q: [n, q_heads, d]) whose keys/values were written at cache
/// positions start..start + n. Query t sees every key before `mask_start` and key
/// mask_start + j iff mask[t * span + j] != 0, span = start + n − mask_start (≤ start:
/// with mask_start = start the mask is [n, n] over the block, causal for a chain and
/// ancestors for a tree; a drafter expanding a tree depth by depth masks its earlier
/// depths too). k, v: [start + n, kv_heads, d]. A key-less row gives zeros.
#[allow(clippy::too_many_arguments)]
pub fn attention_verify(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    mask: &[u8],
    mask_start: usize,
    start: usize,
    q_heads: usize,
    kv_heads: usize,
    d: usize,
) {
    let group = q_heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let n = q.len() / (q_heads * d);
    let span = start + n - mask_start;
    let mut keys = Vec::new();
    let mut scores = Vec::new();
    for t in 0..n {
        keys.clear();
        keys.extend(0..mask_start);
        keys.extend((0..span).filter(|&j| mask[t * span + j] != 0).map(|j| mask_start + j));
        for h in 0..q_heads {
            let kh = h / group;
            let qv = &q[(t * q_heads + h) * d..][..d];
            scores.clear();
            scores.extend(keys.iter().map(|&j| {
                let kv = &k[(j * kv_heads + kh) * d..][..d];
                qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
            }));
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[(t * q_heads + h) * d..][..d];
            o.fill(0.0);
            for (&j, &p) in keys.iter().zip(&scores) {
                let vv = &v[(j * kv_heads + kh) * d..][..d];
                for (oi, &vi) in o.iter_mut().zip(vv) {
                    *oi += p / sum * vi;
                }
            }
        }
    }
}
