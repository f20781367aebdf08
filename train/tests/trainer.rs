//! The training loop: resume after an interruption is bit-exact, gradient accumulation
//! equals a bigger batch, the schedule, text-LM training from scratch with an HF save the
//! runtime loads, and a Qwen2.5-VL checkpoint saved after LM + merger training.

mod common;

use std::sync::Arc;

use common::{fixture, golden_f32, golden_i64, train_fixture};
use massv::config::TextConfig;
use massv::model::qwen2::{Logits, Qwen2};
use massv_train::hf::{self, VlCheckpoint};
use massv_train::objective::{mean_loss, Dataset, Example, ImageFeatures, ModelSpec, PositionIds};
use massv_train::optim::Schedule;
use massv_train::params::Params;
use massv_train::phases::models::{text_example, text_lm_dataset, train_text_lm, train_vl, vl_example, VlParts};
use massv_train::trainer::{load_checkpoint, train, RunControl, TrainOptions};

/// The golden drafter with a handful of different examples.
fn dataset() -> (Params, Dataset) {
    let dir = train_fixture("drafter");
    let (cfg, mut params) = hf::load_qwen2_params(&dir).unwrap();
    let (pcfg, pp) = hf::load_projector(&dir).unwrap().unwrap();
    params.update_from(pp).unwrap();
    let g = train_fixture("drafter_step.safetensors");
    let ids: Vec<u32> = golden_i64(&g, "input_ids").iter().map(|&x| x as u32).collect();
    let feats = Arc::new(ImageFeatures {
        pre_merger: golden_f32(&g, "pre_merger"),
        window_index: golden_i64(&g, "window_index").iter().map(|&x| x as usize).collect(),
        grid_thw: [1, 4, 6],
    });
    let examples = (0..5u32)
        .map(|k| {
            let mut ids = ids.clone();
            for t in ids.iter_mut().skip(13) {
                *t = (*t + 7 * k) % 89;
            }
            let mask = (0..ids.len()).map(|i| i >= 13).collect();
            Example {
                ids,
                loss_mask: mask,
                images: vec![feats.clone()],
                positions: PositionIds::Sequential,
            }
        })
        .collect();
    let model = ModelSpec {
        lm: cfg,
        lm_prefix: "model.".into(),
        merger: Some(hf::projector_spec(&pcfg)),
        image_token: 90,
        lossy_oov: true,
    };
    (params, Dataset { model, examples })
}

fn opts(steps: usize) -> TrainOptions {
    TrainOptions {
        steps,
        batch: 2,
        accum: 1,
        lr: 3e-3,
        warmup_steps: 2,
        seed: 7,
        ..Default::default()
    }
}

#[test]
fn resume_after_interrupt_is_bit_exact() {
    let (p0, ds) = dataset();
    let tmp = tempfile::tempdir().unwrap();
    let trainable = |_: &str| true;

    let mut straight = p0.clone();
    let ctl = RunControl {
        checkpoint_dir: Some(tmp.path().join("a")),
        ..Default::default()
    };
    let full = train(&mut straight, &trainable, &ds, &opts(7), &ctl).unwrap();
    assert!(!full.interrupted);

    let mut first = p0.clone();
    let ctl_b = RunControl {
        checkpoint_dir: Some(tmp.path().join("b")),
        checkpoint_every: 2,
        stop_after: Some(4),
        resume: true,
        log_path: Some(tmp.path().join("b/train_log.json")),
        ..Default::default()
    };
    let part = train(&mut first, &trainable, &ds, &opts(7), &ctl_b).unwrap();
    assert!(part.interrupted);
    assert_eq!(part.state.step, 4);
    assert_eq!(load_checkpoint(&tmp.path().join("b")).unwrap().unwrap().state.step, 4);
    assert_ne!(first, straight);

    // A fresh process: start again from the original weights; the checkpoint restores the rest.
    let mut resumed = p0.clone();
    let ctl_c = RunControl {
        stop_after: None,
        ..ctl_b
    };
    let rest = train(&mut resumed, &trainable, &ds, &opts(7), &ctl_c).unwrap();
    assert_eq!(rest.resumed_from, Some(4));
    assert_eq!(rest.state.step, 7);
    assert!(resumed == straight, "resumed weights differ from the uninterrupted run");
    let losses = |r: &massv_train::trainer::TrainReport| r.state.log.iter().map(|l| l.loss).collect::<Vec<_>>();
    assert_eq!(losses(&rest), losses(&full));
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("b/train_log.json")).unwrap()).unwrap();
    assert_eq!(log["steps"].as_array().unwrap().len(), 7);

    // Changed options are refused rather than silently mixed.
    let mut other = p0.clone();
    let bad = TrainOptions { lr: 1e-2, ..opts(9) };
    let err = train(&mut other, &trainable, &ds, &bad, &ctl_c)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other options"), "{err}");
}

#[test]
fn accumulation_equals_a_bigger_batch_and_training_lowers_the_loss() {
    let (p0, ds) = dataset();
    let all = |_: &str| true;
    let run = |batch, accum| {
        let mut p = p0.clone();
        let o = TrainOptions {
            batch,
            accum,
            shuffle: false,
            ..opts(3)
        };
        train(&mut p, &all, &ds, &o, &RunControl::default()).unwrap();
        p
    };
    let (a, b) = (run(4, 1), run(2, 2));
    for name in a.names() {
        let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
        let err = x.iter().zip(y).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err < 1e-6, "{name}: {err}");
    }
    let before = mean_loss(&ds, &p0).unwrap();
    let mut p = p0.clone();
    train(&mut p, &all, &ds, &opts(20), &RunControl::default()).unwrap();
    let after = mean_loss(&ds, &p).unwrap();
    assert!(after < before - 0.5, "{before} -> {after}");
}

#[test]
fn schedule_warms_up_then_decays_by_cosine() {
    let s = Schedule {
        peak_lr: 1.0,
        warmup_steps: 4,
        total_steps: 14,
        min_lr_ratio: 0.1,
    };
    assert_eq!(s.lr(0), 0.25);
    assert_eq!(s.lr(3), 1.0);
    assert_eq!(s.lr(4), 1.0);
    assert!((s.lr(13) - 0.1).abs() < 1e-12);
    assert!((s.lr(9) - 0.55).abs() < 0.08);
    for k in 4..13 {
        assert!(s.lr(k + 1) <= s.lr(k));
    }
}

#[test]
fn text_lm_from_scratch_saves_a_checkpoint_the_runtime_loads() {
    let cfg = TextConfig {
        vocab_size: 32,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 128,
        sliding_window: None,
        max_window_layers: 2,
        bos_token_id: None,
        eos_token_ids: vec![1],
        mrope_section: None,
    };
    let mut params = hf::init_qwen2(&cfg, 3, 0.02).unwrap();
    // A deterministic pattern: t -> t + 3 (mod 30), from several starts.
    let examples: Vec<Example> = (0..8u32)
        .map(|s| text_example((0..24).map(|i| (s * 5 + 3 * i) % 30 + 2).collect(), None))
        .collect();
    let ds = text_lm_dataset(&cfg, examples.clone());
    let before = mean_loss(&ds, &params).unwrap();
    let o = TrainOptions {
        steps: 60,
        batch: 4,
        lr: 1e-2,
        warmup_steps: 5,
        ..Default::default()
    };
    train_text_lm(&mut params, &cfg, examples, &o, &RunControl::default()).unwrap();
    let after = mean_loss(&ds, &params).unwrap();
    assert!(after < 0.5 * before, "{before} -> {after}");

    let tmp = tempfile::tempdir().unwrap();
    hf::save_qwen2(tmp.path(), &cfg, None, &params).unwrap();
    let model = Qwen2::load(tmp.path()).unwrap();
    assert_eq!(model.cfg, cfg);
    let ids: Vec<u32> = (0..10).map(|i| (3 * i) % 30 + 2).collect();
    let mut cache = model.new_cache(10);
    let logits = model.forward_tokens(&ids, &mut cache, Logits::All).unwrap();
    // The runtime continues the pattern it was trained on.
    let next = massv::generate::argmax(&logits[9 * 32..]) as u32;
    assert_eq!(next, (3 * ids.len() as u32) % 30 + 2);
}

#[test]
fn qwen2_5_vl_lm_and_merger_train_and_save() {
    let dir = fixture("qwen2_5_vl-tiny-hub");
    let target = massv_train::data::TargetVision::load(&dir, None).unwrap();
    let mut ck = VlCheckpoint::load(&dir).unwrap();
    let feats = target.features(&fixture("images/ongrid_56x84.png")).unwrap();
    let ex = vl_example(&target, "What is in the picture?", Some(feats), &[72, 101, 108, 402]).unwrap();
    assert!(matches!(ex.positions, PositionIds::Multi(_)));
    let visual_before = ck.params.get("visual.blocks.0.attn.qkv.weight").unwrap().to_vec();
    let merger_before = ck.params.get("visual.merger.mlp.0.weight").unwrap().to_vec();
    let o = TrainOptions {
        steps: 4,
        batch: 1,
        lr: 1e-3,
        warmup_steps: 0,
        ..Default::default()
    };
    let parts = VlParts { lm: true, merger: true };
    let r = train_vl(&mut ck, vec![ex], parts, &o, &RunControl::default()).unwrap();
    assert!(r.state.log[3].loss < r.state.log[0].loss);
    assert_eq!(
        ck.params.get("visual.blocks.0.attn.qkv.weight").unwrap(),
        &visual_before[..]
    );
    assert_ne!(ck.params.get("visual.merger.mlp.0.weight").unwrap(), &merger_before[..]);
    let tmp = tempfile::tempdir().unwrap();
    ck.save(tmp.path()).unwrap();
    let model = massv::model::qwen2_5_vl::Qwen25Vl::load(tmp.path()).unwrap();
    assert_eq!(model.cfg, ck.cfg);
}
