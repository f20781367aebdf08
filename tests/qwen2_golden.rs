//! The Qwen2 LM on the CPU against transformers (tests/reference/make_qwen2_fixtures.py).

mod common;

use common::{fixture, max_abs_diff, Golden};
use massv::generate::argmax;
use massv::model::qwen2::{Logits, Qwen2};

const MODELS: [&str; 3] = [
    "qwen2-tiny-gqa4-tied",
    "qwen2-tiny-mha-untied",
    "qwen2-tiny-gqa2-sharded",
];
const TOL: f32 = 1e-4;

#[test]
fn prefill_logits_match_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let model = Qwen2::load(&dir).unwrap();
        let g = Golden::open(&dir.join("expected.safetensors"));
        let ids = g.ids("prefill.input_ids");
        let (shape, want) = g.f32("prefill.logits");
        assert_eq!(shape, vec![ids.len(), model.cfg.vocab_size]);
        let mut cache = model.new_cache(ids.len());
        let got = model.forward_tokens(&ids, &mut cache, Logits::All).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err <= TOL, "{name}: max |Δlogit| = {err}");
    }
}

#[test]
fn kv_cache_decoding_matches_transformers_generate() {
    for name in MODELS {
        let dir = fixture(name);
        let model = Qwen2::load(&dir).unwrap();
        let g = Golden::open(&dir.join("expected.safetensors"));
        let prompt = g.ids("prefill.input_ids");
        let want_tokens = g.ids("decode.tokens");
        let (_, want_logits) = g.f32("decode.logits");
        let v = model.cfg.vocab_size;
        let mut cache = model.new_cache(prompt.len() + want_tokens.len());
        let mut logits = model.forward_tokens(&prompt, &mut cache, Logits::Last).unwrap();
        for (step, &want) in want_tokens.iter().enumerate() {
            let err = max_abs_diff(&logits, &want_logits[step * v..][..v]);
            assert!(err <= TOL, "{name} step {step}: max |Δlogit| = {err}");
            assert_eq!(argmax(&logits) as u32, want, "{name} step {step}");
            logits = model.forward_tokens(&[want], &mut cache, Logits::Last).unwrap();
        }
    }
}

#[test]
fn token_by_token_equals_full_prefill() {
    let dir = fixture("qwen2-tiny-gqa4-tied");
    let model = Qwen2::load(&dir).unwrap();
    let g = Golden::open(&dir.join("expected.safetensors"));
    let seq: Vec<u32> = g
        .ids("prefill.input_ids")
        .into_iter()
        .chain(g.ids("decode.tokens"))
        .collect();
    let mut full_cache = model.new_cache(seq.len());
    let full = model.forward_tokens(&seq, &mut full_cache, Logits::All).unwrap();
    let mut cache = model.new_cache(seq.len());
    let v = model.cfg.vocab_size;
    // One row at a time sums in another order than the whole-sequence GEMM: the last bits
    // differ, so compare at 5e-5, far below any real mismatch (golden tolerance is 1e-4).
    for (i, &t) in seq.iter().enumerate() {
        let step = model.forward_tokens(&[t], &mut cache, Logits::All).unwrap();
        let err = max_abs_diff(&step, &full[i * v..][..v]);
        assert!(err <= 5e-5, "position {i}: {err}");
    }
    for l in 0..model.cfg.num_hidden_layers {
        let (k1, v1) = cache.layer(l);
        let (k2, v2) = full_cache.layer(l);
        assert!(
            max_abs_diff(k1, k2) <= 5e-5 && max_abs_diff(v1, v2) <= 5e-5,
            "layer {l} cache differs"
        );
    }
}

#[test]
fn rollback_then_replay_restores_the_cache() {
    let dir = fixture("qwen2-tiny-mha-untied");
    let model = Qwen2::load(&dir).unwrap();
    let g = Golden::open(&dir.join("expected.safetensors"));
    let prompt = g.ids("prefill.input_ids");
    let cont = g.ids("decode.tokens");
    let mut cache = model.new_cache(prompt.len() + cont.len());
    model.forward_tokens(&prompt, &mut cache, Logits::Last).unwrap();
    // A rejected speculative block: write garbage tokens, roll back, write the real ones.
    model.forward_tokens(&[5, 6, 7, 8], &mut cache, Logits::All).unwrap();
    cache.rollback_to(prompt.len()).unwrap();
    let after = model.forward_tokens(&cont, &mut cache, Logits::All).unwrap();
    let mut fresh = model.new_cache(prompt.len() + cont.len());
    model.forward_tokens(&prompt, &mut fresh, Logits::Last).unwrap();
    let want = model.forward_tokens(&cont, &mut fresh, Logits::All).unwrap();
    assert!(max_abs_diff(&after, &want) <= 1e-6);
    assert!(cache.rollback_to(cache.len() + 1).is_err(), "rolling forward must fail");
}

#[test]
fn context_overflow_and_bad_token_are_errors() {
    let model = Qwen2::load(&fixture("qwen2-tiny-gqa4-tied")).unwrap();
    let mut cache = model.new_cache(4);
    let e = model
        .forward_tokens(&[1, 2, 3, 4, 5], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(e.to_string().contains("exceeds the context of 4"), "{e}");
    let e = model.forward_tokens(&[100_000], &mut cache, Logits::Last).unwrap_err();
    assert!(e.to_string().contains("outside the model's vocabulary"), "{e}");
    assert_eq!(cache.len(), 0, "failed passes must not commit anything");
}
