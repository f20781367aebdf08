//! The op layer of training: the forward ops of `massv::reference` / `massv::backend::cpu`
//! (re-used as they are, so training computes exactly what inference computes) and, for
//! each, its backward, llm.c style: plain functions on f32 slices with explicit shapes.
//!
//! Conventions: every backward *adds* into its gradient outputs (`+=`), so a caller zeroes
//! a buffer once and lets several paths accumulate into it (residual branches, tied
//! embeddings, GQA heads sharing a KV head). Shapes are row-major.
//!
//! This module is the only place the model code (`lm`, `vision`) touches arithmetic: a CUDA
//! backend slots in by providing the same functions over device buffers, without changing
//! the models, the objectives or the phases.

use rayon::prelude::*;

pub use massv::backend::cpu::{gelu, linear, mrope, rmsnorm, rope, swiglu};

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// dst[m, n] (row-major, +=) += a[m, k] · b[k, n], through the `gemm` crate.
fn matmul_acc(m: usize, n: usize, k: usize, dst: &mut [f32], a: View, b: View) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let last = |v: View, rows: usize, cols: usize| (rows - 1) * v.rs + (cols - 1) * v.cs;
    assert!(dst.len() >= m * n, "matmul: destination too small");
    assert!(last(a, m, k) < a.data.len(), "matmul: lhs out of bounds");
    assert!(last(b, k, n) < b.data.len(), "matmul: rhs out of bounds");
    // SAFETY: the asserts above keep every index the strides describe inside the three
    // slices; dst is borrowed mutably so it cannot alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// Backward of `linear` (y[n, m] = x[n, k] · w[m, k]ᵀ + b): dx += dy · w, dw += dyᵀ · x,
/// db += Σ_rows dy. Any of the three may be skipped (frozen weights, inputs that need no
/// gradient).
pub fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    k: usize,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let m = w.len() / k;
    let n = dy.len() / m.max(1);
    if let Some(dx) = dx {
        matmul_acc(
            n,
            k,
            m,
            dx,
            View { data: dy, rs: m, cs: 1 },
            View { data: w, rs: k, cs: 1 },
        );
    }
    if let Some(dw) = dw {
        matmul_acc(
            m,
            k,
            n,
            dw,
            View { data: dy, rs: 1, cs: m },
            View { data: x, rs: k, cs: 1 },
        );
    }
    if let Some(db) = db {
        for row in dy.chunks_exact(m) {
            for (g, &d) in db.iter_mut().zip(row) {
                *g += d;
            }
        }
    }
}

/// Backward of `rmsnorm` (y = w ∘ x · r, r = 1/√(mean(x²) + eps)), per row of `dim`:
/// dx += r·(w∘dy) − x · r³/dim · Σ(w∘dy∘x), dw += Σ_rows dy ∘ x · r.
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    dim: usize,
    eps: f32,
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
) {
    let inv: Vec<f32> = x
        .par_chunks(dim)
        .map(|xr| 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / dim as f32 + eps).sqrt())
        .collect();
    if let Some(dx) = dx {
        dx.par_chunks_mut(dim)
            .zip(dy.par_chunks(dim).zip(x.par_chunks(dim)))
            .zip(inv.par_iter())
            .for_each(|((dxr, (dyr, xr)), &r)| {
                let dot: f32 = dyr.iter().zip(w).zip(xr).map(|((d, g), v)| d * g * v).sum();
                let c = r * r * r * dot / dim as f32;
                for (((o, &d), &g), &v) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                    *o += r * g * d - c * v;
                }
            });
    }
    if let Some(dw) = dw {
        for ((dyr, xr), &r) in dy.chunks_exact(dim).zip(x.chunks_exact(dim)).zip(&inv) {
            for ((g, &d), &v) in dw.iter_mut().zip(dyr).zip(xr) {
                *g += d * v * r;
            }
        }
    }
}

/// Backward of `swiglu` (out = silu(g) · u, gate/up fused per row as [g | u]):
/// dg += dout · u · σ(g)(1 + g(1 − σ(g))), du += dout · silu(g).
pub fn swiglu_backward(dout: &[f32], gate_up: &[f32], inter: usize, d_gate_up: &mut [f32]) {
    d_gate_up
        .par_chunks_mut(2 * inter)
        .zip(gate_up.par_chunks(2 * inter).zip(dout.par_chunks(inter)))
        .for_each(|(dgu, (gu, d))| {
            let (g, u) = gu.split_at(inter);
            let (dg, du) = dgu.split_at_mut(inter);
            for i in 0..inter {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                du[i] += d[i] * g[i] * s;
                dg[i] += d[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
}

/// Backward of the exact GELU at pre-activations `x`: dx += dy · (Φ(x) + x·φ(x)).
pub fn gelu_backward(dy: &[f32], x: &[f32], dx: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    dx.par_chunks_mut(4096)
        .zip(dy.par_chunks(4096).zip(x.par_chunks(4096)))
        .for_each(|(o, (d, x))| {
            for ((o, &d), &v) in o.iter_mut().zip(d).zip(x) {
                let cdf = 0.5 * (1.0 + libm::erf(v as f64 * std::f64::consts::FRAC_1_SQRT_2) as f32);
                let pdf = INV_SQRT_2PI * (-0.5 * v * v).exp();
                *o += d * (cdf + v * pdf);
            }
        });
}

/// Backward of `rope` (a rotation by +angle per pair): the transpose is the rotation by
/// −angle, i.e. the same op at negated positions. In place on dx [tokens, heads, head_dim].
pub fn rope_backward(dx: &mut [f32], positions: &[i32], heads: usize, head_dim: usize, theta: f32) {
    let neg: Vec<i32> = positions.iter().map(|p| -p).collect();
    rope(dx, &neg, heads, head_dim, theta);
}

/// Backward of `mrope`; positions [3, tokens].
pub fn mrope_backward(
    dx: &mut [f32],
    positions: &[i32],
    section: [usize; 3],
    heads: usize,
    head_dim: usize,
    theta: f32,
) {
    let neg: Vec<i32> = positions.iter().map(|p| -p).collect();
    mrope(dx, &neg, section, heads, head_dim, theta);
}

/// Shapes of one causal self-attention call over a whole sequence.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub tokens: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (keys `t + 1 − window ..= t`), None for full causal attention.
    pub window: Option<usize>,
}

impl AttnShape {
    fn lo(&self, t: usize) -> usize {
        self.window.map_or(0, |w| (t + 1).saturating_sub(w))
    }
}

/// Causal GQA self-attention (what `reference::attention` computes at start 0) that also
/// returns the log-sum-exp of each query's scores, [tokens, q_heads], for the backward.
/// q: [n, Hq, d]; k, v: [n, Hkv, d]; out: [n, Hq, d].
pub fn attention_forward(q: &[f32], k: &[f32], v: &[f32], s: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let AttnShape {
        tokens: n,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        ..
    } = s;
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    // One task per head; each fills its own [n, d] block, scattered afterwards.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..hq)
        .into_par_iter()
        .map(|h| {
            let kh = h / group;
            let mut o = vec![0.0f32; n * d];
            let mut lse = vec![0.0f32; n];
            let mut scores = Vec::with_capacity(n);
            for t in 0..n {
                let qv = &q[(t * hq + h) * d..][..d];
                let lo = s.lo(t);
                scores.clear();
                for j in lo..=t {
                    let kv = &k[(j * hkv + kh) * d..][..d];
                    scores.push(qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale);
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let ot = &mut o[t * d..][..d];
                for (j, &p) in (lo..=t).zip(&scores) {
                    let p = p / sum;
                    for (oi, &vi) in ot.iter_mut().zip(&v[(j * hkv + kh) * d..][..d]) {
                        *oi += p * vi;
                    }
                }
                lse[t] = max + sum.ln();
            }
            (o, lse)
        })
        .collect();
    let mut out = vec![0.0f32; n * hq * d];
    let mut lse = vec![0.0f32; n * hq];
    for (h, (o, l)) in per_head.iter().enumerate() {
        for t in 0..n {
            out[(t * hq + h) * d..][..d].copy_from_slice(&o[t * d..][..d]);
            lse[t * hq + h] = l[t];
        }
    }
    (out, lse)
}

/// Backward of `attention_forward`, recomputing the probabilities from q, k and the saved
/// log-sum-exp: dq, dk, dv += the gradients (dk, dv summed over the query heads of a group).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    lse: &[f32],
    s: AttnShape,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttnShape {
        tokens: n,
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        ..
    } = s;
    let group = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    // Per query head: its dq block and its contribution to its KV head's dk, dv.
    let per_head: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..hq)
        .into_par_iter()
        .map(|h| {
            let kh = h / group;
            let (mut gq, mut gk, mut gv) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0f32; n * d]);
            let mut p = Vec::with_capacity(n);
            let mut dp = Vec::with_capacity(n);
            for t in 0..n {
                let qv = &q[(t * hq + h) * d..][..d];
                let dov = &dout[(t * hq + h) * d..][..d];
                let l = lse[t * hq + h];
                let lo = s.lo(t);
                p.clear();
                dp.clear();
                for j in lo..=t {
                    let kv = &k[(j * hkv + kh) * d..][..d];
                    let vv = &v[(j * hkv + kh) * d..][..d];
                    let sc = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                    p.push((sc - l).exp());
                    dp.push(dov.iter().zip(vv).map(|(a, b)| a * b).sum::<f32>());
                }
                let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (idx, j) in (lo..=t).enumerate() {
                    let pj = p[idx];
                    for (g, &o) in gv[j * d..][..d].iter_mut().zip(dov) {
                        *g += pj * o;
                    }
                    let ds = pj * (dp[idx] - dot) * scale;
                    let kv = &k[(j * hkv + kh) * d..][..d];
                    for (g, &kk) in gq[t * d..][..d].iter_mut().zip(kv) {
                        *g += ds * kk;
                    }
                    for (g, &qq) in gk[j * d..][..d].iter_mut().zip(qv) {
                        *g += ds * qq;
                    }
                }
            }
            (gq, gk, gv)
        })
        .collect();
    for (h, (gq, gk, gv)) in per_head.iter().enumerate() {
        let kh = h / group;
        for t in 0..n {
            for (a, &b) in dq[(t * hq + h) * d..][..d].iter_mut().zip(&gq[t * d..][..d]) {
                *a += b;
            }
            for (a, &b) in dk[(t * hkv + kh) * d..][..d].iter_mut().zip(&gk[t * d..][..d]) {
                *a += b;
            }
            for (a, &b) in dv[(t * hkv + kh) * d..][..d].iter_mut().zip(&gv[t * d..][..d]) {
                *a += b;
            }
        }
    }
}

/// Cross-entropy of `logits` [rows, V] against `targets` (one per row): returns the summed
/// loss (f64) and writes dlogits = scale · (softmax − onehot).
pub fn cross_entropy(logits: &[f32], targets: &[u32], scale: f32, dlogits: &mut [f32]) -> f64 {
    let v = logits.len() / targets.len().max(1);
    dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v).zip(targets.par_iter()))
        .map(|(g, (row, &t))| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            for (gi, &l) in g.iter_mut().zip(row) {
                *gi = scale * ((l as f64 - lse).exp() as f32);
            }
            g[t as usize] -= scale;
            lse - row[t as usize] as f64
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

/// Softmax of one row at temperature 1, in f64 accumulation.
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = row.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&x| (x / sum) as f32).collect()
}

/// Backward of an embedding lookup: dtable[id] += dh[row] for each row whose `ids` entry
/// is Some (rows replaced by other inputs, or ids outside the table, pass None).
pub fn embedding_backward(dh: &[f32], ids: &[Option<u32>], dim: usize, dtable: &mut [f32]) {
    for (row, id) in dh.chunks_exact(dim).zip(ids) {
        if let Some(id) = id {
            for (g, &d) in dtable[*id as usize * dim..][..dim].iter_mut().zip(row) {
                *g += d;
            }
        }
    }
}

/// acc += x.
pub fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
