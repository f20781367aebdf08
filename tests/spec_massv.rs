//! MASSV drafters against the tiny Qwen2.5-VL target: the projector against torch, lossless
//! speculative decoding with images, and the number of target passes against an
//! independent loop written with transformers (tests/reference/make_drafter_fixtures.py).

mod common;

use common::{fixture, max_abs_diff, Golden};
use massv::image::ImageInput;
use massv::model::projector::Projector;
use massv::spec::draft::DraftMode;
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use serde_json::Value;

const TARGET: &str = "qwen2_5_vl-tiny-hub";

#[test]
fn projector_matches_torch() {
    let p = Projector::load(&fixture("drafter-tiny-massv"))
        .unwrap()
        .expect("a MASSV drafter");
    let g = Golden::open(&fixture(
        "drafter-tiny-massv/expected_projector_nonsquare_150x100.safetensors",
    ));
    let wi: Vec<usize> = g.i64("window_index").1.iter().map(|&v| v as usize).collect();
    let got = p.forward(&g.f32("vision_pre_merger").1, &wi).unwrap();
    let err = max_abs_diff(&got, &g.f32("projector_out").1);
    assert!(err <= 1e-5, "projector: {err}");
}

#[test]
fn draft_prompt_logits_match_transformers() {
    use massv::model::qwen2::Logits;
    use massv::spec::draft::{DraftState, Drafter, VisionTokens};
    let engine = Engine::load(&fixture(TARGET), None).unwrap();
    let drafter = Drafter::load(&fixture("drafter-tiny-massv")).unwrap();
    let g = Golden::open(&fixture(
        "drafter-tiny-massv/expected_projector_nonsquare_150x100.safetensors",
    ));
    let ids = g.ids("draft_input_ids");
    let massv::model::Target::Vl(vl) = &engine.target else {
        panic!("VL target")
    };
    let img = ImageInput::from_path(&fixture("images/nonsquare_150x100.png")).unwrap();
    let cfg = massv::image::PreprocessorConfig::from_dir(&fixture(TARGET)).unwrap();
    let pre = massv::image::preprocess(&img, &cfg).unwrap();
    let vision = vl.encode_image(&pre.pixel_values, pre.grid_thw).unwrap();
    let vt = VisionTokens {
        vision_start: vl.cfg.vision_start_token_id,
        vision_end: vl.cfg.vision_end_token_id,
        image_pad: vl.cfg.image_token_id,
    };
    let embeds = drafter
        .prompt_embeddings(DraftMode::Massv, &ids, &ids, &[vision], &vt)
        .unwrap();
    let lm = drafter.lm.cpu().unwrap();
    let mut cache = lm.new_cache(ids.len());
    let positions: Vec<i32> = (0..ids.len() as i32).collect();
    let logits = lm
        .forward(
            embeds,
            massv::model::qwen2::Positions::Seq(&positions),
            &mut cache,
            Logits::All,
        )
        .unwrap();
    let err = max_abs_diff(&logits, &g.f32("draft_prefill_logits").1);
    assert!(err <= 1e-4, "drafter prefill logits: {err}");
    // The state type used by the engine accepts the same prompt.
    assert!(DraftState::prefill(&drafter, vec![0.0; 64 * 3], 1, 4).is_ok());
}

fn expected() -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(fixture("spec_expected.json")).unwrap()).unwrap()
}

#[test]
fn passes_and_tokens_equal_the_transformers_reference_loop() {
    let target_only = Engine::load(&fixture(TARGET), None).unwrap();
    let engines = [
        (
            "massv",
            Engine::load(&fixture(TARGET), Some(&fixture("drafter-tiny-massv"))).unwrap(),
        ),
        (
            "text",
            Engine::load(&fixture(TARGET), Some(&fixture("drafter-tiny-text"))).unwrap(),
        ),
    ];
    let cases = expected();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut checked = 0;
    let pre = massv::image::PreprocessorConfig::from_dir(&fixture(TARGET)).unwrap();
    for c in &cases {
        let images: Vec<_> = c["image"]
            .as_str()
            .map(|p| massv::image::preprocess(&ImageInput::from_path(&fixture(p)).unwrap(), &pre).unwrap())
            .into_iter()
            .collect();
        // The rendered chat prompt, as the reference loop tokenized it.
        let ids = target_only.tokenizer.encode(c["prompt"].as_str().unwrap()).unwrap();
        let want: Vec<u32> = c["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let max_new = c["max_new_tokens"].as_u64().unwrap() as usize;
        let mode = c["mode"].as_str().unwrap();
        if mode == "target" {
            let p = GenerateParams {
                max_new_tokens: max_new,
                ..Default::default()
            };
            let out = target_only.generate_ids(&ids, &images, &p, Hooks::default()).unwrap();
            assert_eq!(out.tokens, want, "target-only {c}");
            continue;
        }
        let engine = &engines.iter().find(|(m, _)| *m == mode).unwrap().1;
        let gamma = c["gamma"].as_u64().unwrap() as usize;
        let p = GenerateParams {
            gamma,
            max_new_tokens: max_new,
            ..Default::default()
        };
        let out = engine.generate_ids(&ids, &images, &p, Hooks::default()).unwrap();
        assert_eq!(out.tokens, want, "lossless: {} {mode} γ={gamma}", c["case"]);
        assert_eq!(
            out.metrics.target_passes as u64,
            c["passes"].as_u64().unwrap(),
            "passes: {} {mode} γ={gamma}",
            c["case"]
        );
        checked += 1;
    }
    assert!(checked >= 24);
}

#[test]
fn massv_beats_text_drafting_on_images() {
    let mal = |mode: &str| -> f64 {
        let cases: Vec<Value> = expected()
            .into_iter()
            .filter(|c| c["mode"] == mode && c["gamma"] == 5 && !c["image"].is_null())
            .collect();
        cases.iter().map(|c| c["mal"].as_f64().unwrap()).sum::<f64>() / cases.len() as f64
    };
    assert!(
        mal("massv") > mal("text"),
        "massv {} vs text {}",
        mal("massv"),
        mal("text")
    );
}

#[test]
fn mode_and_projector_mismatches_are_errors() {
    let massv_dir = fixture("drafter-tiny-massv");
    let engine = Engine::load(&fixture(TARGET), Some(&massv_dir)).unwrap();
    let p = GenerateParams {
        draft_mode: Some(DraftMode::Text),
        ..Default::default()
    };
    let e = engine
        .generate("hi", None, &p, Hooks::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("needs a text-only drafter"), "{e}");

    // A projector whose input width does not fit the target's vision features.
    let tmp = common::copy_dir(&massv_dir);
    let cfg_path = tmp.path().join("massv.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision_hidden_size"] = 16.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Engine::load(&fixture(TARGET), Some(tmp.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("projector.safetensors") && e.contains("fc1.weight"), "{e}");
    // A consistent projector for 16-wide vision features: it does not fit this target.
    use massv::weights::{write_safetensors, OwnedTensor};
    let z = |shape: Vec<usize>| OwnedTensor::f32(shape.clone(), vec![0.0; shape.iter().product()]);
    write_safetensors(
        &tmp.path().join("projector.safetensors"),
        &[
            ("norm.weight", z(vec![16])),
            ("fc1.weight", z(vec![128, 64])),
            ("fc1.bias", z(vec![128])),
            ("fc2.weight", z(vec![64, 128])),
            ("fc2.bias", z(vec![64])),
        ],
    )
    .unwrap();
    let e = Engine::load(&fixture(TARGET), Some(tmp.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("projector of") && e.contains("vision features are 32"),
        "{e}"
    );
    cfg["vision_hidden_size"] = 32.into();
    cfg["format"] = "something-else".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Engine::load(&fixture(TARGET), Some(tmp.path()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("massv.json") && e.contains("format"), "{e}");
}
