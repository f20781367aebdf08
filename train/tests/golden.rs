//! One training step against PyTorch (tests/reference/make_train_fixtures.py): the loss and
//! every gradient of a MASSV drafter (Qwen2 LM + projector, image rows at the placeholders,
//! CE over the response) and of the tiny Qwen2.5-VL target's LM + merger (M-RoPE), to 1e-4
//! relative; then two AdamW steps with clipping and the cosine schedule.

mod common;

use std::sync::Arc;

use common::{fixture, golden_f32, golden_i64, train_fixture};
use massv_train::data::TargetVision;
use massv_train::hf::{self, VlCheckpoint};
use massv_train::objective::{example_loss, Example, ImageFeatures, ModelSpec, PositionIds};
use massv_train::optim::AdamWConfig;
use massv_train::params::Params;
use massv_train::phases::models::{vl_dataset, vl_example};
use massv_train::trainer::{train, RunControl, TrainOptions};

/// max |a − b| ≤ tol · max |b| over the tensor.
fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-12);
    let err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= tol * scale, "{name}: max error {err:e} vs scale {scale:e}");
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(train_fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn drafter_case() -> (Params, ModelSpec, Example) {
    let dir = train_fixture("drafter");
    let (cfg, mut params) = hf::load_qwen2_params(&dir).unwrap();
    let (pcfg, pparams) = hf::load_projector(&dir).unwrap().unwrap();
    params.update_from(pparams).unwrap();
    let g = train_fixture("drafter_step.safetensors");
    let ids: Vec<u32> = golden_i64(&g, "input_ids").iter().map(|&x| x as u32).collect();
    let mask: Vec<bool> = golden_i64(&g, "labels").iter().map(|&x| x != -100).collect();
    let feats = ImageFeatures {
        pre_merger: golden_f32(&g, "pre_merger"),
        window_index: golden_i64(&g, "window_index").iter().map(|&x| x as usize).collect(),
        grid_thw: [1, 4, 6],
    };
    let model = ModelSpec {
        lm: cfg,
        lm_prefix: "model.".into(),
        merger: Some(hf::projector_spec(&pcfg)),
        image_token: 90,
        lossy_oov: false,
    };
    let ex = Example {
        ids,
        loss_mask: mask,
        images: vec![Arc::new(feats)],
        positions: PositionIds::Sequential,
    };
    (params, model, ex)
}

#[test]
fn drafter_step_matches_pytorch() {
    let (params, model, ex) = drafter_case();
    let g = train_fixture("drafter_step.safetensors");
    let mut grads = params.zeros_like(|_| true);
    let out = example_loss(&params, Some(&mut grads), &model, &ex).unwrap();
    assert_eq!(out.tokens, 7);
    let loss = out.loss_sum / out.tokens as f64;
    let want = golden_f32(&g, "loss")[0] as f64;
    assert!((loss - want).abs() <= 1e-5 * want, "loss {loss} vs {want}");
    grads.scale(1.0 / out.tokens as f32);
    assert_eq!(grads.len(), 2 + 2 * 12 + 1 + 5);
    for name in grads.names() {
        assert_close(
            &format!("grad {name}"),
            grads.get(name).unwrap(),
            &golden_f32(&g, &format!("grad.{name}")),
            1e-4,
        );
    }
}

#[test]
fn two_adamw_steps_match_pytorch() {
    let (mut params, model, ex) = drafter_case();
    let g = train_fixture("drafter_step.safetensors");
    let e = expected();
    let s = &e["settings"];
    let ds = massv_train::objective::Dataset {
        model,
        examples: vec![ex],
    };
    let opts = TrainOptions {
        steps: 2,
        batch: 1,
        accum: 1,
        lr: s["lr"].as_f64().unwrap(),
        warmup_steps: 0,
        min_lr_ratio: s["min_lr_ratio"].as_f64().unwrap(),
        adamw: AdamWConfig {
            weight_decay: s["weight_decay"].as_f64().unwrap(),
            ..Default::default()
        },
        clip_norm: Some(s["clip"].as_f64().unwrap()),
        seed: 0,
        shuffle: false,
    };
    let report = train(&mut params, &|_| true, &ds, &opts, &RunControl::default()).unwrap();
    let losses: Vec<f64> = report.state.log.iter().map(|l| l.loss).collect();
    for (got, key) in losses.iter().zip(["loss", "loss_step2"]) {
        let want = golden_f32(&g, key)[0] as f64;
        assert!((got - want).abs() <= 1e-5 * want, "{key}: {got} vs {want}");
    }
    for name in params.names() {
        assert_close(
            &format!("after 2 steps {name}"),
            params.get(name).unwrap(),
            &golden_f32(&g, &format!("after2.{name}")),
            1e-4,
        );
    }
}

#[test]
fn qwen2_5_vl_lm_and_merger_step_matches_pytorch() {
    let dir = fixture("qwen2_5_vl-tiny-hub");
    let g = train_fixture("vl_step.safetensors");
    let e = expected();
    let s = &e["settings"];
    let target = TargetVision::load(&dir, None).unwrap();
    let ck = VlCheckpoint::load(&dir).unwrap();
    let feats = target
        .features(&fixture("images").join(s["vl_image"].as_str().unwrap()))
        .unwrap();
    let response: Vec<u32> = s["vl_response"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ex = vl_example(&target, s["vl_prompt"].as_str().unwrap(), Some(feats), &response).unwrap();
    let want_ids: Vec<u32> = golden_i64(&g, "input_ids").iter().map(|&x| x as u32).collect();
    assert_eq!(ex.ids, want_ids, "the runtime's prompt equals the processor's");
    let ds = vl_dataset(&ck, vec![ex.clone()]);
    let merger = ck.merger_spec();
    let lm_names = ds.model.lm_spec().expected_tensors();
    let mut grads = ck
        .params
        .zeros_like(|n| lm_names.contains_key(n) || merger.names.all().contains(&n));
    let out = example_loss(&ck.params, Some(&mut grads), &ds.model, &ex).unwrap();
    let loss = out.loss_sum / out.tokens as f64;
    let want = golden_f32(&g, "loss")[0] as f64;
    assert!((loss - want).abs() <= 1e-5 * want, "loss {loss} vs {want}");
    grads.scale(1.0 / out.tokens as f32);
    let norms = e["vl"]["grad_norms"].as_object().unwrap();
    assert_eq!(norms.len(), grads.len());
    let mut full = 0;
    for (name, norm) in norms {
        let got = grads.get(name).unwrap();
        let n = got.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        let want = norm.as_f64().unwrap();
        assert!((n - want).abs() <= 1e-4 * want.max(1e-8), "|grad {name}| {n} vs {want}");
        if let Some(w) = common::golden_opt_f32(&g, &format!("grad.{name}")) {
            assert_close(&format!("grad {name}"), got, &w, 1e-4);
            full += 1;
        }
    }
    assert!(full >= 18, "{full} gradients compared in full");
}
