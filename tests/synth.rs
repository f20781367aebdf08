//! `massv synth`: random checkpoints with real names and shapes that the loaders accept.

mod common;

use std::process::Command;

use common::{fixture, real_model};
use massv::model::qwen2::Logits;
use massv::model::qwen2_5_vl::{expected_tensors, Layout, Qwen25Vl};
use massv::synth::{synth, SynthDtype, SynthOptions, MAX_SHARD_BYTES};
use massv::weights::Weights;

#[test]
fn real_7b_config_shallow_checkpoint_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("vl7b");
    let status = Command::new(env!("CARGO_BIN_EXE_massv"))
        .args(["synth", "--config"])
        .arg(real_model("Qwen2.5-VL-7B-Instruct").join("config.json"))
        .arg("--out")
        .arg(&out)
        .args(["--layers", "2", "--dtype", "bf16"])
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = massv::config::load_qwen2_5_vl(&out.join("config.json")).unwrap();
    assert_eq!((cfg.text.num_hidden_layers, cfg.vision.depth), (2, 2));
    assert_eq!(cfg.text.hidden_size, 3584);
    assert!(
        cfg.vision.fullatt_block_indexes.is_empty(),
        "blocks 7, 15, … are gone at depth 2"
    );
    let w = Weights::open(&out).unwrap();
    w.check_inventory(&expected_tensors(&cfg, Layout::Hub)).unwrap();
    assert_eq!(w.get("lm_head.weight").unwrap().shape, &[152064, 3584]);
}

#[test]
fn sharded_tiny_checkpoint_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny");
    let opts = SynthOptions {
        dtype: SynthDtype::F32,
        seed: 7,
        layers: None,
        max_shard_bytes: 64 << 10,
    };
    synth(&fixture("qwen2_5_vl-tiny-hub").join("config.json"), &out, &opts).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    let shards = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
        .count();
    assert!(shards > 1, "64 KiB shards split the tiny model");
    let model = Qwen25Vl::load(&out).unwrap();
    let mut cache = model.new_cache(4);
    let logits = model.decode(&[1, 2, 3], 0, &mut cache, Logits::Last).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    // Same seed, same bytes; another seed, other bytes.
    let again = tmp.path().join("again");
    synth(&fixture("qwen2_5_vl-tiny-hub").join("config.json"), &again, &opts).unwrap();
    let a = Weights::open(&out).unwrap();
    let b = Weights::open(&again).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(a.get(name).unwrap().data, b.get(name).unwrap().data);
    let other = tmp.path().join("other");
    synth(
        &fixture("qwen2_5_vl-tiny-hub").join("config.json"),
        &other,
        &SynthOptions { seed: 8, ..opts },
    )
    .unwrap();
    assert_ne!(
        a.get(name).unwrap().data,
        Weights::open(&other).unwrap().get(name).unwrap().data
    );
}

#[test]
fn qwen2_synth_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("drafter");
    let opts = SynthOptions {
        dtype: SynthDtype::Bf16,
        seed: 0,
        layers: Some(1),
        max_shard_bytes: MAX_SHARD_BYTES,
    };
    let n = synth(&real_model("Qwen2.5-0.5B-Instruct").join("config.json"), &out, &opts).unwrap();
    assert_eq!(n, 2 + 12, "embed + norm + one layer (tied head)");
    // A non-empty output directory is refused, and left as it was.
    let e = synth(&real_model("Qwen2.5-0.5B-Instruct").join("config.json"), &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    assert!(out.join("model.safetensors").is_file());
    let e = synth(&tmp.path().join("nope.json"), &tmp.path().join("x"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");
    assert!(!tmp.path().join("x").exists(), "nothing half-written");
}
