//! Turning logits into the distribution tokens are drawn from (temperature, top-k,
//! top-p, in transformers' order), and the seeded RNG that drafter and target share so
//! a run is reproducible.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off; in (0, 1].
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The processed distribution: softmax(logits / T), then top-k, then top-p (the smallest
/// set of most likely tokens whose mass reaches top_p), renormalised. Greedy params give
/// the one-hot distribution of the argmax.
pub fn probabilities(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let mut p = vec![0.0f32; logits.len()];
    if logits.is_empty() {
        return p;
    }
    if params.is_greedy() {
        p[crate::generate::argmax(logits)] = 1.0;
        return p;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for (pi, &l) in p.iter_mut().zip(logits) {
        *pi = ((l - max) / params.temperature).exp();
        sum += *pi as f64;
    }
    for pi in p.iter_mut() {
        *pi = (*pi as f64 / sum) as f32;
    }
    if params.top_k > 0 && params.top_k < p.len() || params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..p.len()).collect();
        // Stable sort: among equal probabilities the lower id ranks first.
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let k = if params.top_k > 0 {
            params.top_k.min(p.len())
        } else {
            p.len()
        };
        let mut keep = 0;
        let mut mass = 0.0f64;
        while keep < k {
            mass += p[order[keep]] as f64;
            keep += 1;
            if mass >= params.top_p as f64 {
                break;
            }
        }
        for &i in &order[keep..] {
            p[i] = 0.0;
        }
        let total: f64 = order[..keep].iter().map(|&i| p[i] as f64).sum();
        for &i in &order[..keep] {
            p[i] = (p[i] as f64 / total) as f32;
        }
    }
    p
}

/// SplitMix64: tiny, fast, and fully determined by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The generator's state: `Rng::new(state)` continues the same sequence.
    pub fn state(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A draw from the (unnormalised, non-negative) weights `w`.
    pub fn sample(&mut self, w: &[f32]) -> usize {
        draw(w, self.uniform())
    }

    /// The next `n` uniforms, without consuming them: what a device consumer is handed
    /// before it says how many it used ([`Rng::skip_uniforms`]).
    pub fn peek_uniforms(&self, n: usize) -> Vec<f64> {
        let mut peek = self.clone();
        (0..n).map(|_| peek.uniform()).collect()
    }

    /// Consumes `n` uniforms.
    pub fn skip_uniforms(&mut self, n: usize) {
        for _ in 0..n {
            self.uniform();
        }
    }
}

/// The id that uniform `u` in [0, 1) selects from weights `w`: a cumulative scan of
/// u × total mass in id order, skipping zero weights (what `Rng::sample` and the device's
/// `sample` kernel both compute).
pub fn draw(w: &[f32], u: f64) -> usize {
    let total: f64 = w.iter().map(|&x| x as f64).sum();
    let mut u = u * total;
    let mut last = 0;
    for (i, &x) in w.iter().enumerate() {
        if x > 0.0 {
            last = i;
            if u < x as f64 {
                return i;
            }
            u -= x as f64;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_one_hot_at_argmax() {
        let p = probabilities(&[0.1, 3.0, 2.0], &SamplingParams::default());
        assert_eq!(p, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nans() {
        use crate::generate::argmax;
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 5.0, f32::NAN, 5.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn temperature_top_k_top_p() {
        let logits = [1.0f32, 2.0, 3.0, 4.0];
        let t1 = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let p = probabilities(&logits, &t1);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (pi, l) in p.iter().zip(logits) {
            assert!((pi - l.exp() / z).abs() < 1e-6);
        }
        let p = probabilities(&logits, &SamplingParams { top_k: 2, ..t1 });
        assert_eq!(p[0], 0.0);
        assert_eq!(p[1], 0.0);
        assert!((p[2] + p[3] - 1.0).abs() < 1e-6 && p[3] > p[2]);
        // Top token alone has 0.64 of the mass: top_p 0.5 keeps only it, 0.7 keeps two.
        assert_eq!(
            probabilities(&logits, &SamplingParams { top_p: 0.5, ..t1 }),
            vec![0.0, 0.0, 0.0, 1.0]
        );
        let p = probabilities(&logits, &SamplingParams { top_p: 0.7, ..t1 });
        assert!(p[2] > 0.0 && p[1] == 0.0);
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -0.1,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.8
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn rng_is_reproducible_and_samples_the_weights() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        assert_eq!(
            (0..10).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..10).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        let w = [0.0, 0.25, 0.0, 0.75];
        let mut counts = [0usize; 4];
        for _ in 0..20000 {
            counts[a.sample(&w)] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0, "zero-weight ids are never drawn");
        assert!((counts[3] as f64 / 20000.0 - 0.75).abs() < 0.02);
    }
}
