//! Shared helpers of massv-train's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// A fixture of the runtime's tests (tests/fixtures/NAME at the repository root).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// tests/fixtures/train/NAME (written by tests/reference/make_train_fixtures.py).
pub fn train_fixture(name: &str) -> PathBuf {
    fixture("train").join(name)
}

fn tensor(path: &Path, name: &str) -> Option<(Dtype, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("golden parses");
    let t = st.tensor(name).ok()?;
    Some((t.dtype(), t.data().to_vec()))
}

pub fn golden_opt_f32(path: &Path, name: &str) -> Option<Vec<f32>> {
    let (dt, data) = tensor(path, name)?;
    assert_eq!(dt, Dtype::F32, "{name}");
    Some(
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    )
}

pub fn golden_f32(path: &Path, name: &str) -> Vec<f32> {
    golden_opt_f32(path, name).unwrap_or_else(|| panic!("{}: no tensor {name}", path.display()))
}

pub fn golden_i64(path: &Path, name: &str) -> Vec<i64> {
    let (dt, data) = tensor(path, name).unwrap_or_else(|| panic!("{}: no tensor {name}", path.display()));
    assert_eq!(dt, Dtype::I64, "{name}");
    data.chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// tests/fixtures/drafter-tiny-{massv,text} (make_drafter_fixtures.py); the folder holding
/// them can be overridden with MASSV_DRAFTER_FIXTURES (to try other drafters).
pub fn drafter_fixture(name: &str) -> PathBuf {
    match std::env::var_os("MASSV_DRAFTER_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => fixture(name),
    }
}

/// Writes JSON lines to `path`.
pub fn write_jsonl(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// A small random Qwen2 drafter sharing the target's tokenizer (hidden 64 like the target's LM).
pub fn make_drafter(dir: &Path) {
    let cfg = massv::config::TextConfig {
        vocab_size: 432,
        hidden_size: 64,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 1024,
        sliding_window: None,
        max_window_layers: 1,
        bos_token_id: None,
        eos_token_ids: vec![402],
        mrope_section: None,
    };
    massv_train::hf::save_qwen2(dir, &cfg, None, &massv_train::hf::init_qwen2(&cfg, 1, 0.02).unwrap()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("qwen2_5_vl-tiny-hub").join(f), dir.join(f)).unwrap();
    }
}
