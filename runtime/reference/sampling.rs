//! Twins of cuda/sampling.cu.
//!
//! `argmax`, `probabilities` and `verify_greedy` are the runtime's own functions, `top_k`
//! the T = 0 tree drafter's ranking on them, `top_k_probs` the same ranking of rows that
//! already are distributions (`spec::tree::top_tokens`). The draws (`sample`, the residual and bonus
//! draws of `verify_sampled`) sum in a fixed "blocked" order a GPU can reproduce in
//! parallel: chunks of [`SAMPLE_CHUNK`] entries summed left to right in f64, tiles of
//! [`SAMPLE_TILE`] entries summing their chunk sums in order, the total summing the tiles
//! in order; a draw walks tiles, then chunks, then entries. For at most 32 entries this is exactly `Rng::sample`'s sequential order;
//! beyond, the two agree unless the uniform lands within f64 rounding of a boundary.
//!
//! `verify_tree_greedy` / `verify_tree_sampled` take a token tree as the flat arrays the
//! device gets (tokens, parents, per-node rows of p, drafter rows of q with a per-node
//! row index) and follow `spec::tree::verify_tree_*` step for step, with the blocked sums
//! (the residual's and the "q without x" normalisations, the final draw).

use crate::sampling::SamplingParams;
use crate::spec::tree::{Proposal, TreeVerdict};
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

/// One draw from `probabilities(logits, params)` with the uniform u01, by `sample`: the
/// distribution and the drawn index (`CudaDevice::probabilities_sample`, a row).
pub fn probabilities_sample(logits: &[f32], params: &SamplingParams, u01: f64) -> (Vec<f32>, usize) {
    let p = probabilities(logits, params);
    let x = sample(&p, u01);
    (p, x)
}

/// The `k` most likely tokens of the plain softmax of `logits` (T = 1) that have a
/// non-zero probability, best first (ties: lower id), with their probabilities:
/// `spec::tree::top_tokens` on `probabilities`, what a T = 0 tree ranks children by.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let softmax = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let q = probabilities(logits, &softmax);
    crate::spec::tree::top_tokens(&q, k)
        .into_iter()
        .map(|t| (t, q[t as usize]))
        .collect()
}

/// The `k` most likely tokens of the distribution `q` with non-zero probability, best
/// first (ties: lower id), with their probabilities: `spec::tree::top_tokens` on `q`.
pub fn top_k_probs(q: &[f32], k: usize) -> Vec<(u32, f32)> {
    crate::spec::tree::top_tokens(q, k)
        .into_iter()
        .map(|t| (t, q[t as usize]))
        .collect()
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

/// The children of `node` in proposal order: the later nodes naming it as parent.
fn tree_children(parents: &[usize], node: usize) -> impl Iterator<Item = usize> + '_ {
    (node + 1..parents.len()).filter(move |&c| parents[c] == node)
}

/// Greedy tree verification (`spec::tree::verify_tree_greedy` on flat arrays): from the
/// root, follow the first child whose token is the target's argmax at its parent
/// (`argmax[node]`, one per node) while there is one; `next` is the argmax at the path's
/// end. tokens, parents, argmax: [n], node 0 the root (parents[0] ignored).
pub fn verify_tree_greedy(tokens: &[u32], parents: &[usize], argmax: &[u32]) -> TreeVerdict {
    let (mut node, mut path) = (0, Vec::new());
    loop {
        let want = argmax[node];
        match tree_children(parents, node).find(|&c| tokens[c] == want) {
            Some(c) => {
                path.push(c);
                node = c;
            }
            None => return TreeVerdict { path, next: want },
        }
    }
}

/// q with entry x removed, renormalised by its blocked sum (all zeros when nothing is
/// left): `spec::tree::without` in the blocked order.
fn without(q: &mut [f32], x: usize) {
    if let Some(v) = q.get_mut(x) {
        *v = 0.0;
    }
    let sum = blocked_sum(q);
    for v in q.iter_mut() {
        *v = if sum > 0.0 { (*v as f64 / sum) as f32 } else { 0.0 };
    }
}

/// The drawn children of m token-tree nodes at T > 0: node j draws `counts[j]` tokens
/// without replacement from `q` row `row0 + j` (`q`: [rows, n]) as
/// `spec::tree::draw_without_replacement` does (each draw takes the next uniform; the
/// drawn token is removed and the rest renormalised, here by the blocked sum; a node
/// stops when nothing positive is left, without using a uniform). Returns, per node,
/// the drawn tokens with their probabilities in the original row, and the uniforms used.
pub fn sample_without_replacement(
    q: &[f32],
    n: usize,
    row0: usize,
    counts: &[usize],
    uniforms: &[f64],
) -> (Vec<Vec<(u32, f32)>>, usize) {
    let mut used = 0;
    let drawn = counts
        .iter()
        .enumerate()
        .map(|(j, &k)| {
            let row = &q[(row0 + j) * n..][..n];
            let mut left = row.to_vec();
            let mut out = Vec::with_capacity(k);
            while out.len() < k && left.iter().any(|&v| v > 0.0) {
                let x = sample(&left, uniforms[used]);
                used += 1;
                out.push((x as u32, row[x]));
                without(&mut left, x);
            }
            out
        })
        .collect();
    (drawn, used)
}

/// Per node of [`sample_without_replacement`], the draws it makes when that is known
/// before drawing: min(counts[j], positive entries of q row row0 + j), or -1 when the row
/// could stop the node earlier: an entry negative or not finite, or a total of 1.5 or
/// more. (Each renormalisation divides by the total without the drawn token; below 2
/// that keeps every positive entry positive, and the renormalised row sums to 1 within
/// rounding.) The device draws the nodes at once when every count is known.
pub fn draw_counts(q: &[f32], n: usize, row0: usize, counts: &[usize]) -> Vec<i32> {
    counts
        .iter()
        .enumerate()
        .map(|(j, &k)| {
            let row = &q[(row0 + j) * n..][..n];
            let odd = row.iter().any(|&v| !(v >= 0.0 && v.is_finite()));
            let total: f64 = row.iter().map(|&v| v as f64).sum();
            if odd || total >= 1.5 {
                return -1;
            }
            k.min(row.iter().filter(|&&v| v > 0.0).count()) as i32
        })
        .collect()
}

/// Multi-candidate rejection sampling down a token tree (`spec::tree::verify_tree_sampled`
/// with `spec::verify::residual`) with the host RNG's next draws passed in.
///
/// tokens, parents: [n], node 0 the root; p: [n, np], the target's distribution after
/// the path to each node; q: [rows, nq] drafter distributions and `q_row[node]` the row
/// node's children were drawn from (-1 or out of range: none). With
/// [`Proposal::Sampled`] a child of a node with a row has that row, minus the siblings
/// already rejected and renormalised, as its proposal; otherwise (no row, or
/// [`Proposal::Fixed`]) the point mass at its token. `uniforms`: one per tested child in
/// test order, then one for the final draw (at most n; see [`tree_uniforms_consumed`]).
#[allow(clippy::too_many_arguments)]
pub fn verify_tree_sampled(
    tokens: &[u32],
    parents: &[usize],
    proposal: Proposal,
    q_row: &[i32],
    q: &[f32],
    p: &[f32],
    uniforms: &[f64],
    nq: usize,
    np: usize,
) -> TreeVerdict {
    let rows = q.len().checked_div(nq).unwrap_or(0);
    let (mut node, mut path, mut used) = (0, Vec::new(), 0);
    'down: loop {
        let mut pn = p[node * np..][..np].to_vec();
        let mut q_left = match (proposal, usize::try_from(q_row[node])) {
            (Proposal::Sampled, Ok(r)) if r < rows => Some(q[r * nq..][..nq].to_vec()),
            _ => None,
        };
        for c in tree_children(parents, node) {
            let x = tokens[c] as usize;
            let px = pn.get(x).copied().unwrap_or(0.0);
            let qx = match &q_left {
                Some(ql) => ql.get(x).copied().unwrap_or(0.0),
                None => 1.0,
            };
            let accept = uniforms[used] < accept_probability(px, qx) as f64;
            used += 1;
            if accept {
                path.push(c);
                node = c;
                continue 'down;
            }
            pn = match &q_left {
                Some(ql) => residual(&pn, ql),
                None => {
                    let mut point = vec![0.0; np];
                    if let Some(v) = point.get_mut(x) {
                        *v = 1.0;
                    }
                    residual(&pn, &point)
                }
            };
            if let Some(ql) = &mut q_left {
                without(ql, x);
            }
        }
        return TreeVerdict {
            path,
            next: sample(&pn, uniforms[used]) as u32,
        };
    }
}

/// Uniforms the CPU's `spec::tree::verify_tree_sampled` (and so the twin and the kernel)
/// draws for a verdict: at each node of the path the tests up to and including the
/// accepted child (its rank among its siblings + 1), at the path's end one test per
/// child, then one draw. At most n for a tree of n nodes.
pub fn tree_uniforms_consumed(parents: &[usize], v: &TreeVerdict) -> usize {
    let mut node = 0;
    let mut used = 1;
    for &c in &v.path {
        used += tree_children(parents, node).take_while(|&s| s != c).count() + 1;
        node = c;
    }
    used + tree_children(parents, node).count()
}
