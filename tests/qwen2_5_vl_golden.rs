//! Qwen2.5-VL on the CPU against transformers (tests/reference/make_qwen2_5_vl_fixtures.py):
//! vision tower, M-RoPE positions, logits, KV-cache decoding; both checkpoint layouts.

mod common;

use common::{fixture, max_abs_diff, Golden};
use massv::generate::argmax;
use massv::model::qwen2::Logits;
use massv::model::qwen2_5_vl::{Layout, Qwen25Vl};

const IMAGE_CASES: [&str; 6] = [
    "ongrid_56x84",
    "nonsquare_150x100",
    "small_20x30",
    "big_300x200",
    "photo_90x70",
    "photo_64x64",
];
const TOL: f32 = 1e-4;

fn golden(case: &str) -> Golden {
    Golden::open(&fixture("qwen2_5_vl-tiny-hub").join(format!("expected_{case}.safetensors")))
}

fn grid(g: &Golden) -> [usize; 3] {
    let (_, v) = g.i64("image_grid_thw");
    [v[0] as usize, v[1] as usize, v[2] as usize]
}

#[test]
fn vision_tower_matches_transformers() {
    let model = Qwen25Vl::load(&fixture("qwen2_5_vl-tiny-hub")).unwrap();
    for case in IMAGE_CASES {
        let g = golden(case);
        let (_, px) = g.f32("pixel_values");
        let out = model.vision.forward(&px, grid(&g)).unwrap();
        let (_, wi) = g.i64("window_index");
        assert_eq!(
            out.window_index,
            wi.iter().map(|&v| v as usize).collect::<Vec<_>>(),
            "{case}"
        );
        let err = max_abs_diff(&out.pre_merger, &g.f32("vision_pre_merger").1);
        assert!(err <= TOL, "{case}: pre-merger {err}");
        let err = max_abs_diff(&out.embeds, &g.f32("vision_embeds").1);
        assert!(err <= TOL, "{case}: embeds {err}");
    }
}

/// The golden prompt with transformers' pixel values run through our vision tower.
fn prepare(model: &Qwen25Vl, case: &str, g: &Golden) -> massv::model::qwen2_5_vl::Prefill {
    let ids = g.ids("input_ids");
    if case == "textonly" {
        return model.prepare(ids, &[], vec![]).unwrap();
    }
    let embeds = model.encode_image(&g.f32("pixel_values").1, grid(g)).unwrap().embeds;
    model.prepare(ids, &[grid(g)], embeds).unwrap()
}

fn prefill_case(model: &Qwen25Vl, case: &str, g: &Golden) -> (massv::model::qwen2_5_vl::Prefill, Vec<f32>) {
    let ids = g.ids("input_ids");
    let p = prepare(model, case, g);
    let (_, want_pos) = g.i64("position_ids");
    assert_eq!(
        p.positions,
        want_pos.iter().map(|&v| v as i32).collect::<Vec<_>>(),
        "{case}: position ids"
    );
    assert_eq!(p.rope_delta as i64, g.i64("rope_deltas").1[0], "{case}: rope delta");
    let mut cache = model.new_cache(ids.len() + 8);
    let logits = model.prefill(&p, &mut cache, Logits::All).unwrap();
    (p, logits)
}

#[test]
fn logits_match_transformers_in_both_layouts() {
    let hub = Qwen25Vl::load(&fixture("qwen2_5_vl-tiny-hub")).unwrap();
    let t5 = Qwen25Vl::load(&fixture("qwen2_5_vl-tiny-t5")).unwrap();
    assert_eq!(hub.layout, Layout::Hub);
    assert_eq!(t5.layout, Layout::Transformers5);
    assert_eq!(hub.cfg, t5.cfg, "flat and nested configs parse to the same model");
    for case in IMAGE_CASES.iter().copied().chain(["textonly"]) {
        let g = golden(case);
        let (_, a) = prefill_case(&hub, case, &g);
        let err = max_abs_diff(&a, &g.f32("logits").1);
        assert!(err <= TOL, "{case}: max |Δlogit| = {err}");
        let (_, b) = prefill_case(&t5, case, &g);
        assert_eq!(a, b, "{case}: the two layouts must give identical logits");
    }
}

#[test]
fn kv_cache_decoding_matches_transformers_generate() {
    let model = Qwen25Vl::load(&fixture("qwen2_5_vl-tiny-hub")).unwrap();
    let v = model.cfg.text.vocab_size;
    for case in ["nonsquare_150x100", "big_300x200", "textonly"] {
        let g = golden(case);
        let ids = g.ids("input_ids");
        let p = prepare(&model, case, &g);
        let want = g.ids("decode.tokens");
        let (_, want_logits) = g.f32("decode.logits");
        let mut cache = model.new_cache(ids.len() + want.len());
        let mut logits = model.prefill(&p, &mut cache, Logits::Last).unwrap();
        for (step, &tok) in want.iter().enumerate() {
            let err = max_abs_diff(&logits, &want_logits[step * v..][..v]);
            assert!(err <= TOL, "{case} step {step}: {err}");
            assert_eq!(argmax(&logits) as u32, tok, "{case} step {step}");
            logits = model.decode(&[tok], p.rope_delta, &mut cache, Logits::Last).unwrap();
        }
    }
}

#[test]
fn placeholder_mismatches_are_errors() {
    let model = Qwen25Vl::load(&fixture("qwen2_5_vl-tiny-hub")).unwrap();
    let img = model.cfg.image_token_id;
    let g = golden("ongrid_56x84");
    let px = g.f32("pixel_values").1;
    let gr = grid(&g);
    // Two placeholders, one image.
    let e = model
        .expand_image_placeholders(&[1, img, 2, img], &[gr])
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 image placeholder(s) but 1 image(s)"), "{e}");
    // An image but no placeholder.
    let e = model.expand_image_placeholders(&[1, 2], &[gr]).unwrap_err().to_string();
    assert!(e.contains("0 image placeholder(s)"), "{e}");
    // Expanded placeholders that do not cover the image.
    let embeds = model.encode_image(&px, gr).unwrap().embeds;
    let e = model
        .prepare(vec![1, img, img, 2], &[gr], embeds)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("consecutive image placeholders"), "{e}");
    let expanded = model.expand_image_placeholders(&[1, img, 2], &[gr]).unwrap();
    assert_eq!(expanded.len(), 2 + gr.iter().product::<usize>() / 4);
}

#[test]
fn expected_names_for_the_real_7b_equal_its_index() {
    use massv::model::qwen2_5_vl::expected_tensors;
    let dir = common::real_model("Qwen2.5-VL-7B-Instruct");
    let cfg = massv::config::load_qwen2_5_vl(&dir.join("config.json")).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let real: std::collections::BTreeSet<String> = index["weight_map"].as_object().unwrap().keys().cloned().collect();
    let ours: std::collections::BTreeSet<String> = expected_tensors(&cfg, Layout::Hub).into_keys().collect();
    let missing: Vec<_> = real.difference(&ours).collect();
    let extra: Vec<_> = ours.difference(&real).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "not expected: {missing:?}; not in the index: {extra:?}"
    );
    assert_eq!(ours.len(), 729);
}
