//! The acceptance rule of speculative decoding as small pure functions.
//!
//! T = 0: accept the longest prefix of drafts equal to the target's argmax, then emit
//! the target's own token. T > 0 (Leviathan et al. / Chen et al.): accept draft x with
//! probability min(1, p(x)/q(x)); at the first rejection draw from normalize(max(0, p − q));
//! if all are accepted draw the bonus token from the target's next distribution. The
//! emitted tokens are then distributed exactly as sampling from the target alone.
//!
//! p and q are the *processed* distributions (same temperature / top-k / top-p), q
//! exactly the one each draft was drawn from. The drafter's vocabulary may be shorter
//! than the target's: q is 0 beyond its end.

use crate::sampling::Rng;

/// How many drafts were accepted and the token the target adds after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub accepted: usize,
    pub next: u32,
}

/// Greedy verification: `target_argmax[i]` is the target's choice after the first i
/// drafts (γ + 1 entries).
pub fn verify_greedy(drafts: &[u32], target_argmax: &[u32]) -> Verdict {
    debug_assert_eq!(target_argmax.len(), drafts.len() + 1);
    let accepted = drafts.iter().zip(target_argmax).take_while(|(d, t)| d == t).count();
    Verdict {
        accepted,
        next: target_argmax[accepted],
    }
}

/// min(1, p/q). A draft the drafter could not have drawn (q = 0) is accepted only if the
/// target can emit it.
pub fn accept_probability(p: f32, q: f32) -> f32 {
    if q <= 0.0 {
        if p > 0.0 {
            1.0
        } else {
            0.0
        }
    } else {
        (p / q).min(1.0)
    }
}

/// normalize(max(0, p − q)) over the target's vocabulary (q is 0 past its end). When p ≤ q
/// everywhere (only possible up to rounding, since then every draft is accepted) it
/// falls back to p.
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    let mut r: Vec<f32> = p
        .iter()
        .enumerate()
        .map(|(i, &pi)| (pi - q.get(i).copied().unwrap_or(0.0)).max(0.0))
        .collect();
    let sum: f64 = r.iter().map(|&x| x as f64).sum();
    if sum <= 0.0 {
        return p.to_vec();
    }
    for x in r.iter_mut() {
        *x = (*x as f64 / sum) as f32;
    }
    r
}

/// Rejection-sampling verification of a chain of drafts. `q[i]` is the distribution
/// draft i was drawn from; `p[i]` the target's distribution after the first i drafts
/// (γ + 1 entries). `residual_rule` is [`residual`] in the engine; tests pass broken
/// rules to show the statistical tests catch them.
pub fn verify_sampled(
    drafts: &[u32],
    q: &[Vec<f32>],
    p: &[Vec<f32>],
    rng: &mut Rng,
    residual_rule: fn(&[f32], &[f32]) -> Vec<f32>,
) -> Verdict {
    debug_assert_eq!(p.len(), drafts.len() + 1);
    for (i, &d) in drafts.iter().enumerate() {
        let (pd, qd) = (
            p[i].get(d as usize).copied().unwrap_or(0.0),
            q[i].get(d as usize).copied().unwrap_or(0.0),
        );
        if rng.uniform() >= accept_probability(pd, qd) as f64 {
            let r = residual_rule(&p[i], &q[i]);
            return Verdict {
                accepted: i,
                next: rng.sample(&r) as u32,
            };
        }
    }
    let g = drafts.len();
    Verdict {
        accepted: g,
        next: rng.sample(&p[g]) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_edges() {
        assert_eq!(
            verify_greedy(&[1, 2, 3], &[1, 2, 3, 4]),
            Verdict { accepted: 3, next: 4 },
            "all accepted: bonus"
        );
        assert_eq!(
            verify_greedy(&[9, 2, 3], &[1, 2, 3, 4]),
            Verdict { accepted: 0, next: 1 },
            "all rejected"
        );
        assert_eq!(
            verify_greedy(&[1, 9, 3], &[1, 2, 3, 4]),
            Verdict { accepted: 1, next: 2 }
        );
        assert_eq!(verify_greedy(&[5], &[5, 6]), Verdict { accepted: 1, next: 6 }, "γ = 1");
        assert_eq!(
            verify_greedy(&[], &[7]),
            Verdict { accepted: 0, next: 7 },
            "γ = 0 is a plain step"
        );
    }

    #[test]
    fn accept_probability_edges() {
        assert_eq!(accept_probability(0.0, 0.5), 0.0, "p(x) = 0: always rejected");
        assert_eq!(accept_probability(0.3, 0.0), 1.0, "q(x) = 0 but p(x) > 0");
        assert_eq!(accept_probability(0.0, 0.0), 0.0);
        assert_eq!(accept_probability(0.6, 0.3), 1.0);
        assert!((accept_probability(0.2, 0.8) - 0.25).abs() < 1e-7);
    }

    #[test]
    fn residual_edges() {
        let r = residual(&[0.5, 0.3, 0.2], &[0.2, 0.6, 0.2]);
        assert_eq!(r, vec![1.0, 0.0, 0.0]);
        // A shorter drafter vocabulary: ids past it keep all of p's mass.
        let r = residual(&[0.25, 0.25, 0.5], &[0.5, 0.5]);
        assert!((r[2] - 1.0).abs() < 1e-6);
        assert_eq!(
            residual(&[0.5, 0.5], &[0.5, 0.5]),
            vec![0.5, 0.5],
            "p = q falls back to p"
        );
    }

    #[test]
    fn sampled_all_accepted_and_all_rejected() {
        let mut rng = Rng::new(1);
        // q = p: every draft is accepted, the bonus comes from p[γ].
        let p = vec![vec![0.5, 0.5], vec![0.5, 0.5], vec![0.0, 1.0]];
        let v = verify_sampled(&[0, 1], &p[..2], &p, &mut rng, residual);
        assert_eq!(v, Verdict { accepted: 2, next: 1 });
        // p(draft) = 0: rejected at once, next from the residual.
        let q = vec![vec![1.0, 0.0]];
        let p = vec![vec![0.0, 1.0], vec![1.0, 0.0]];
        assert_eq!(
            verify_sampled(&[0], &q, &p, &mut rng, residual),
            Verdict { accepted: 0, next: 1 }
        );
    }
}
