//! The speculative engine: lossless at T = 0, the target's distribution at T > 0, and
//! caches that equal a fresh prefill after any accept/reject pattern.

mod common;

use std::collections::BTreeMap;

use common::{chi2, chi2_critical, exact_sequences, fixture};
use massv::model::qwen2::Logits;
use massv::sampling::{Rng, SamplingParams};
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv::spec::verify::{residual, verify_sampled};

const TARGET: &str = "qwen2-tiny-gqa4-tied";
const PROMPTS: [&str; 3] = ["Hello there, how are you?", "hi", "Tell me a story about a cat."];

fn engine(target: &str, drafter: Option<&str>) -> Engine {
    Engine::load(&fixture(target), drafter.map(fixture).as_deref()).unwrap()
}

fn greedy(max_new: usize, gamma: usize) -> GenerateParams {
    GenerateParams {
        gamma,
        max_new_tokens: max_new,
        ..Default::default()
    }
}

#[test]
fn text_drafters_are_lossless_at_t0() {
    let baseline = engine(TARGET, None);
    // A drafter identical to the target accepts everything; a different model mostly nothing.
    for drafter in [TARGET, "qwen2-tiny-mha-untied", "qwen2-tiny-gqa2-sharded"] {
        let spec = engine(TARGET, Some(drafter));
        for prompt in PROMPTS {
            let want = baseline
                .generate(prompt, None, &greedy(20, 5), Hooks::default())
                .unwrap();
            assert_eq!(want.metrics.mal, 1.0);
            for gamma in [1, 3, 5, 8] {
                let got = spec
                    .generate(prompt, None, &greedy(20, gamma), Hooks::default())
                    .unwrap();
                assert_eq!(got.tokens, want.tokens, "{drafter} γ={gamma} {prompt:?}");
                assert_eq!(got.text, want.text);
                let m = &got.metrics;
                assert!(
                    m.mal >= 1.0 && m.mal <= (gamma + 1) as f64,
                    "{drafter} γ={gamma}: mal {}",
                    m.mal
                );
                assert!(m.accept_rate_by_pos.len() <= gamma);
                if drafter == TARGET {
                    assert!(
                        m.accept_rate_by_pos.iter().all(|&r| r == 1.0),
                        "self-drafting accepts all"
                    );
                    let passes = (want.tokens.len() - 1).div_ceil(gamma + 1);
                    assert_eq!(m.target_passes, passes, "γ={gamma}");
                }
            }
        }
    }
}

#[test]
fn sampling_keeps_the_target_distribution() {
    // A drafter that disagrees with the target (another random model), top-k 2 so three
    // tokens have at most 8 outcomes; every run drafts in its second pass.
    let spec = engine(TARGET, Some("qwen2-tiny-mha-untied"));
    let sp = SamplingParams {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
    };
    let prompt = spec
        .tokenizer
        .encode(&spec.tokenizer.user_prompt("hi", false).unwrap())
        .unwrap();
    let expected = exact_sequences(&spec, &prompt, &sp);
    let n = 3000;
    let mut observed: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
    let mut rejected = 0;
    for seed in 0..n {
        let params = GenerateParams {
            gamma: 3,
            tree: None,
            sampling: sp,
            seed: seed as u64,
            max_new_tokens: 3,
            draft_mode: None,
        };
        let out = spec.generate_ids(&prompt, &[], &params, Hooks::default()).unwrap();
        assert_eq!(out.tokens.len(), 3, "no stop token among these outcomes");
        rejected += out.metrics.accept_rate_by_pos.iter().filter(|&&r| r < 1.0).count();
        *observed.entry(out.tokens).or_default() += 1;
    }
    assert!(
        rejected > n / 10,
        "the test needs rejections to mean anything ({rejected})"
    );
    let df = expected.len() - 1;
    let stat = chi2(&observed, &expected, n);
    // 99.9% quantiles of χ² for df ≤ 7.
    let crit = chi2_critical(df);
    assert!(
        stat < crit,
        "χ² = {stat:.2} ≥ {crit} (df {df}): {observed:?} vs {expected:?}"
    );
}

/// Pure verification with fixed p and q: the first emitted token must follow p[0].
fn first_token_chi2(rule: fn(&[f32], &[f32]) -> Vec<f32>) -> f64 {
    let p = vec![vec![0.5, 0.3, 0.15, 0.05], vec![0.25; 4]];
    let q = vec![vec![0.1, 0.2, 0.3, 0.4]];
    let mut rng = Rng::new(7);
    let n = 40_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        let d = rng.sample(&q[0]) as u32;
        let v = verify_sampled(&[d], &q, &p, &mut rng, rule);
        counts[if v.accepted == 1 { d } else { v.next } as usize] += 1;
    }
    counts
        .iter()
        .zip(&p[0])
        .map(|(&c, &pi)| (c as f64 - pi as f64 * n as f64).powi(2) / (pi as f64 * n as f64))
        .sum()
}

#[test]
fn chi2_accepts_the_rule_and_catches_a_broken_residual() {
    let crit = 16.27; // χ², df 3, 99.9%
    let good = first_token_chi2(residual);
    assert!(good < crit, "correct rule: χ² = {good}");
    fn broken(p: &[f32], _q: &[f32]) -> Vec<f32> {
        p.to_vec() // resample from p instead of max(0, p − q)
    }
    let bad = first_token_chi2(broken);
    assert!(bad > 10.0 * crit, "broken rule must be caught: χ² = {bad}");
}

#[test]
fn bad_parameters_are_errors() {
    let spec = engine(TARGET, Some("qwen2-tiny-mha-untied"));
    let check = |p: GenerateParams, needle: &str| {
        let e = spec
            .generate("hi", None, &p, Hooks::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(needle), "{e}");
    };
    check(
        GenerateParams {
            gamma: 0,
            ..Default::default()
        },
        "gamma",
    );
    let bad_t = SamplingParams {
        temperature: -1.0,
        ..Default::default()
    };
    check(
        GenerateParams {
            sampling: bad_t,
            ..Default::default()
        },
        "temperature",
    );
    let bad_p = SamplingParams {
        temperature: 1.0,
        top_p: 0.0,
        ..Default::default()
    };
    check(
        GenerateParams {
            sampling: bad_p,
            ..Default::default()
        },
        "top-p",
    );
    check(
        GenerateParams {
            max_new_tokens: 0,
            ..Default::default()
        },
        "max-new-tokens",
    );
    let massv = GenerateParams {
        draft_mode: Some(massv::spec::draft::DraftMode::Massv),
        ..Default::default()
    };
    check(massv, "no massv.json");
}

#[test]
fn caches_after_accept_reject_patterns_equal_a_fresh_prefill() {
    use massv::spec::draft::{DraftMode, DraftState, Drafter, VisionTokens};
    let target = engine(TARGET, None);
    let drafter = Drafter::load(&fixture("qwen2-tiny-mha-untied")).unwrap();
    let tok = &target.tokenizer;
    let prompt = tok
        .encode(&tok.user_prompt("Hello there, how are you?", false).unwrap())
        .unwrap();
    let vt = VisionTokens {
        vision_start: u32::MAX,
        vision_end: u32::MAX,
        image_pad: u32::MAX,
    };
    let embeds = |ids: &[u32]| drafter.prompt_embeddings(DraftMode::Text, ids, ids, &[], &vt).unwrap();

    let (_, mut session) = target.target.prefill(&prompt, &[], &[], 64, Logits::Last).unwrap();
    let first = 7u32;
    let mut state = DraftState::prefill(&drafter, embeds(&prompt), first, 64).unwrap();
    let mut committed = vec![first];
    let mut rng = Rng::new(3);
    // (γ, accepted): none, some, all, γ = 1 all, γ = 1 none.
    for (gamma, accepted) in [(4, 0), (4, 2), (3, 3), (1, 1), (1, 0), (5, 5)] {
        let (drafts, _) = state
            .draft(&drafter, gamma, &SamplingParams::default(), &mut rng)
            .unwrap();
        let base = session.cache.len();
        let block: Vec<u32> = std::iter::once(*committed.last().unwrap())
            .chain(drafts.iter().copied())
            .collect();
        target.target.decode(&block, &mut session, Logits::All).unwrap();
        session.cache.rollback_to(base + 1 + accepted).unwrap();
        let next = 11 + committed.len() as u32;
        state.commit(&drafts, accepted, next).unwrap();
        committed.extend_from_slice(&drafts[..accepted]);
        committed.push(next);

        // Target: the cache holds every committed token but the last.
        let seen: Vec<u32> = prompt
            .iter()
            .chain(&committed[..committed.len() - 1])
            .copied()
            .collect();
        let (_, fresh) = target.target.prefill(&seen, &[], &[], 0, Logits::Last).unwrap();
        assert_eq!(session.cache.len(), fresh.cache.len());
        for l in 0..2 {
            let (k1, v1) = session.cache.layer(l).unwrap();
            let (k2, v2) = fresh.cache.layer(l).unwrap();
            assert!(
                common::max_abs_diff(k1, k2) < 1e-4 && common::max_abs_diff(v1, v2) < 1e-4,
                "target layer {l}"
            );
        }
        // Drafter: the cache holds every committed token but the pending ones.
        let upto = committed.len() - state.pending.len();
        assert_eq!(&committed[upto..], &state.pending[..]);
        let dseen: Vec<u32> = prompt.iter().chain(&committed[..upto]).copied().collect();
        let fresh = DraftState::prefill(&drafter, embeds(&dseen), 0, 0).unwrap();
        assert_eq!(state.cache.len(), fresh.cache.len(), "γ={gamma} accepted={accepted}");
        for l in 0..drafter.lm.cfg.num_hidden_layers {
            let (k1, v1) = state.cache.layer(l).unwrap();
            let (k2, v2) = fresh.cache.layer(l).unwrap();
            assert!(
                common::max_abs_diff(k1, k2) < 1e-4 && common::max_abs_diff(v1, v2) < 1e-4,
                "drafter layer {l}"
            );
        }
    }
}

#[test]
fn streaming_pieces_and_stopping_from_the_callback() {
    let spec = engine(TARGET, Some("qwen2-tiny-mha-untied"));
    let mut pieces = String::new();
    let mut ids = Vec::new();
    let mut cb = |id: u32, piece: &str| {
        ids.push(id);
        pieces.push_str(piece);
        true
    };
    let out = spec
        .generate(
            "Tell me a story about a cat.",
            None,
            &greedy(16, 3),
            Hooks {
                trace: None,
                on_token: Some(&mut cb),
            },
        )
        .unwrap();
    assert_eq!(ids, out.tokens);
    assert_eq!(pieces, out.text);
    let mut count = 0;
    let mut stop_after_3 = |_: u32, _: &str| {
        count += 1;
        count < 3
    };
    let out = spec
        .generate(
            "Tell me a story about a cat.",
            None,
            &greedy(16, 3),
            Hooks {
                trace: None,
                on_token: Some(&mut stop_after_3),
            },
        )
        .unwrap();
    assert_eq!(out.tokens.len(), 3);
}

#[test]
fn trace_has_one_span_per_stage_per_step() {
    let spec = engine(TARGET, Some("qwen2-tiny-mha-untied"));
    let mut trace = massv::metrics::Trace::default();
    let out = spec
        .generate(
            "hi",
            None,
            &greedy(10, 3),
            Hooks {
                trace: Some(&mut trace),
                on_token: None,
            },
        )
        .unwrap();
    let passes = out.metrics.target_passes;
    assert_eq!(
        trace.len(),
        3 + 3 * passes,
        "vision, prefill_target, prefill_draft, then draft/verify/accept per pass"
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.json");
    trace.write(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    assert!(events
        .iter()
        .all(|e| e["ph"] == "X" && e["dur"].as_f64().unwrap() >= 0.0));
    assert_eq!(events.iter().filter(|e| e["name"] == "verify").count(), passes);
}

/// The drafter's LM path on the CPU: beside a CPU target it loads on the CPU, ids past its
/// table (a larger target vocabulary's padding: the MASSV fixture's 432 rows under the
/// targets' 448) go in as zero rows where token ids are fed, and a cloned state drafts
/// the same.
#[test]
fn ids_past_the_drafters_vocabulary_draft_from_a_zero_row() {
    use massv::backend::Device;
    use massv::model::qwen2::Positions;
    use massv::sampling::probabilities;
    use massv::spec::draft::{DraftState, Drafter};
    let target = engine(TARGET, None);
    let drafter = Drafter::load_beside(&fixture("drafter-tiny-massv"), &target.target).unwrap();
    assert_eq!(drafter.device(), Device::Cpu);
    let (d, v) = (drafter.lm.cfg.hidden_size, drafter.lm.cfg.vocab_size);
    assert!(v < target.target.text_config().vocab_size);
    let t1 = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let prompt = drafter.embed_lossy(&[1, 2, 3, 4]);
    let past = v as u32 + 5;
    assert_eq!(drafter.embed_lossy(&[past]), vec![0.0; d]);
    let mut state = DraftState::prefill(&drafter, prompt.clone(), past, 8).unwrap();
    let mut copy = state.try_clone().unwrap();
    let (drafts, qs) = state.draft(&drafter, 1, &t1, &mut Rng::new(9)).unwrap();
    assert_eq!(
        copy.draft(&drafter, 1, &t1, &mut Rng::new(9)).unwrap(),
        (drafts, qs.clone())
    );
    // The same pass by hand: the prompt's rows, then a zero row.
    let mut hidden = prompt;
    hidden.extend(vec![0.0; d]);
    let positions: Vec<i32> = (0..(hidden.len() / d) as i32).collect();
    let lm = drafter.lm.cpu().unwrap();
    let mut cache = lm.new_cache(positions.len());
    let logits = lm
        .forward(hidden, Positions::Seq(&positions), &mut cache, Logits::Last)
        .unwrap();
    let err = common::max_abs_diff(&qs[0], &probabilities(&logits, &t1));
    assert!(err < 1e-6, "q after an id past the table: {err}");
}
