//! Twin of the attention kernels (prefill, decode and verify are one computation with
//! different shapes): causal grouped-query attention of new queries against a cache.

/// q: [n, q_heads, d] for the tokens at cache positions `start..start + n`;
/// k, v: [len, kv_heads, d] with len >= start + n (the new tokens already written).
/// Query t attends to keys `lo..=start + t`, where lo = 0 or, with a sliding `window`,
/// start + t + 1 - window. out: [n, q_heads, d]. Softmax in f32 with max subtraction.
#[allow(clippy::too_many_arguments)]
pub fn attention(
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
    let group = q_heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let n = q.len() / (q_heads * d);
    let mut scores = Vec::new();
    for t in 0..n {
        let last = start + t;
        let lo = window.map_or(0, |w| (last + 1).saturating_sub(w));
        for h in 0..q_heads {
            let kh = h / group;
            let qv = &q[(t * q_heads + h) * d..][..d];
            scores.clear();
            for j in lo..=last {
                let kv = &k[(j * kv_heads + kh) * d..][..d];
                scores.push(qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale);
            }
            softmax_in_place(&mut scores);
            let o = &mut out[(t * q_heads + h) * d..][..d];
            o.fill(0.0);
            for (j, &p) in (lo..=last).zip(scores.iter()) {
                let vv = &v[(j * kv_heads + kh) * d..][..d];
                for (oi, &vi) in o.iter_mut().zip(vv) {
                    *oi += p * vi;
                }
            }
        }
    }
}

/// Non-causal attention within segments (the vision tower's window and full attention):
/// tokens `cu_seqlens[s]..cu_seqlens[s + 1]` attend only to each other.
/// q, k, v, out: [n, heads, d].
pub fn attention_varlen(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    cu_seqlens: &[usize],
    heads: usize,
    d: usize,
) {
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores = Vec::new();
    for seg in cu_seqlens.windows(2) {
        let (lo, hi) = (seg[0], seg[1]);
        for t in lo..hi {
            for h in 0..heads {
                let qv = &q[(t * heads + h) * d..][..d];
                scores.clear();
                scores.extend((lo..hi).map(|j| {
                    qv.iter()
                        .zip(&k[(j * heads + h) * d..][..d])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale
                }));
                softmax_in_place(&mut scores);
                let o = &mut out[(t * heads + h) * d..][..d];
                o.fill(0.0);
                for (j, &p) in (lo..hi).zip(scores.iter()) {
                    for (oi, &vi) in o.iter_mut().zip(&v[(j * heads + h) * d..][..d]) {
                        *oi += p * vi;
                    }
                }
            }
        }
    }
}

fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in x.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in x.iter_mut() {
        *s /= sum;
    }
}
