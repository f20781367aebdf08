//! Twins of cuda/sampling.cu.
//!
//! `argmax`, `probabilities` and `verify_greedy` are the runtime's own functions. The
//! draws (`sample`, the residual and bonus draws of `verify_sampled`) sum in a fixed
//! "blocked" order a GPU can reproduce in parallel: chunks of [`SAMPLE_CHUNK`] entries
//! summed left to right in f64, tiles of [`SAMPLE_TILE`] entries summing their chunk sums
//! in order, the total summing the tiles in order; a draw walks tiles, then chunks, then
//! entries. For at most 32 entries this is exactly `Rng::sample`'s sequential order;
//! beyond, the two agree unless the uniform lands within f64 rounding of a boundary.

use crate::sampling::SamplingParams;
use crate::spec::verify::{accept_probability, Verdict};

pub const SAMPLE_CHUNK: usize = 32;
pub const SAMPLE_TILE: usize = 1024;

/// First index of the maximum (the runtime's `generate::argmax`).
pub fn argmax(x: &[f32]) -> usize {
    crate::generate::argmax(x)
}

/// softmax(logits / T) → top-k → top-p, renormalised (the runtime's `sampling::probabilities`).
pub fn probabilities(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    crate::sampling::probabilities(logits, params)
}

/// Greedy verification (the runtime's `spec::verify::verify_greedy`).
pub fn verify_greedy(drafts: &[u32], target_argmax: &[u32]) -> Verdict {
    crate::spec::verify::verify_greedy(drafts, target_argmax)
}

/// Sequential f64 sum of the entries of one chunk, and its last positive index.
fn chunk_sum(w: &[f32]) -> (f64, Option<usize>) {
    let mut s = 0.0f64;
    let mut last = None;
    for (i, &x) in w.iter().enumerate() {
        s += x as f64;
        if x > 0.0 {
            last = Some(i);
        }
    }
    (s, last)
}

/// The blocked total of w: chunk sums → tile sums → total, each left to right.
pub fn blocked_sum(w: &[f32]) -> f64 {
    w.chunks(SAMPLE_TILE).map(tile_sum).fold(0.0, |a, t| a + t)
}

fn tile_sum(tile: &[f32]) -> f64 {
    tile.chunks(SAMPLE_CHUNK)
        .map(|c| chunk_sum(c).0)
        .fold(0.0, |a, c| a + c)
}

fn last_positive(w: &[f32]) -> Option<usize> {
    w.iter().rposition(|&x| x > 0.0)
}

/// One draw from the non-negative weights `w` with the uniform `u01` ∈ [0, 1), in the
/// blocked order (see the module doc). No positive weight: 0.
pub fn sample(w: &[f32], u01: f64) -> usize {
    let mut u = u01 * blocked_sum(w);
    for (t, tile) in w.chunks(SAMPLE_TILE).enumerate() {
        let ts = tile_sum(tile);
        if u < ts {
            let base = t * SAMPLE_TILE;
            for (c, chunk) in tile.chunks(SAMPLE_CHUNK).enumerate() {
                let (cs, _) = chunk_sum(chunk);
                if u < cs {
                    let base = base + c * SAMPLE_CHUNK;
                    let mut last = 0;
                    for (i, &x) in chunk.iter().enumerate() {
                        if x > 0.0 {
                            last = base + i;
                            if u < x as f64 {
                                return last;
                            }
                            u -= x as f64;
                        }
                    }
                    return last;
                }
                u -= cs;
            }
            return base + last_positive(tile).unwrap_or(0);
        }
        u -= ts;
    }
    last_positive(w).unwrap_or(0)
}

/// normalize(max(0, p − q)) with the blocked sum (q is 0 past its end); p when the
/// residual is 0 everywhere.
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    let r: Vec<f32> = p
        .iter()
        .enumerate()
        .map(|(i, &pi)| (pi - q.get(i).copied().unwrap_or(0.0)).max(0.0))
        .collect();
    let sum = blocked_sum(&r);
    if sum <= 0.0 {
        return p.to_vec();
    }
    r.iter().map(|&x| (x as f64 / sum) as f32).collect()
}

/// Rejection-sampling verification with the host RNG's next draws passed in, in the order
/// `spec::verify::verify_sampled` takes them: `uniforms[i]` for the accept test of draft
/// i, then the next one for the final draw (the residual's after a rejection at i:
/// `uniforms[i + 1]`; the bonus from p[γ] otherwise: `uniforms[γ]`); γ + 1 uniforms. drafts: [γ]; q: [γ, nq]
/// (row-major); p: [γ + 1, np]. The RNG consumed accepted + 1 draws if every draft was
/// accepted, accepted + 2 otherwise (see [`uniforms_consumed`]).
pub fn verify_sampled(drafts: &[u32], q: &[f32], p: &[f32], uniforms: &[f64], nq: usize, np: usize) -> Verdict {
    let gamma = drafts.len();
    for (i, &d) in drafts.iter().enumerate() {
        let (d, prow, qrow) = (d as usize, &p[i * np..][..np], &q[i * nq..][..nq]);
        let (pd, qd) = (prow.get(d).copied().unwrap_or(0.0), qrow.get(d).copied().unwrap_or(0.0));
        if uniforms[i] >= accept_probability(pd, qd) as f64 {
            return Verdict {
                accepted: i,
                next: sample(&residual(prow, qrow), uniforms[i + 1]) as u32,
            };
        }
    }
    Verdict {
        accepted: gamma,
        next: sample(&p[gamma * np..][..np], uniforms[gamma]) as u32,
    }
}

/// Uniforms the CPU's `spec::verify::verify_sampled` draws for a verdict over γ drafts.
pub fn uniforms_consumed(v: Verdict, gamma: usize) -> usize {
    if v.accepted == gamma {
        gamma + 1
    } else {
        v.accepted + 2
    }
}
