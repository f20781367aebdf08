//! Corrupt, truncated and mismatched checkpoints: each is a typed error naming the file
//! and the tensor or field, never a panic.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fixture;
use massv::model::qwen2::Qwen2;
use massv::weights::Weights;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

const TINY: &str = "qwen2-tiny-gqa4-tied";

/// A copy of the tiny model directory whose tensors went through `edit` (name → (dtype, shape, bytes)).
fn edited_copy(edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) -> tempfile::TempDir {
    let src = fixture(TINY);
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<_> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match Qwen2::load(dir) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_file() {
    let dir = edited_copy(|_| {});
    let p = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn header_length_past_eof() {
    let dir = edited_copy(|_| {});
    let p = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(10_000_000u64).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header length points past the end"),
        "{e}"
    );
}

#[test]
fn short_file_and_garbage_header() {
    let dir = edited_copy(|_| {});
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    assert!(load_err(dir.path()).contains("shorter than the 8-byte header"));
    let mut bytes = 12u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"not json!!!!");
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn tensor_offsets_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[32,48]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 48]);
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let e = Weights::open_files(dir.path(), &[p]).err().unwrap().to_string();
    assert!(e.contains("x.safetensors") && e.contains("offsets out of range"), "{e}");
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let dir = edited_copy(|m| {
        let (_, shape, bytes) = m.remove("model.norm.weight").unwrap();
        m.insert("model.norm.weight".into(), (Dtype::I32, shape, bytes));
    });
    let e = load_err(dir.path());
    assert!(e.contains("`model.norm.weight`") && e.contains("I32"), "{e}");
}

#[test]
fn missing_tensor() {
    let dir = edited_copy(|m| {
        m.remove("model.layers.1.mlp.up_proj.weight");
    });
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"), "{e}");
}

#[test]
fn unexpected_tensor() {
    let dir = edited_copy(|m| {
        m.insert("model.layers.9.extra.weight".into(), (Dtype::F32, vec![2], vec![0; 8]));
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("unexpected tensor") && e.contains("model.layers.9.extra.weight"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_with_config() {
    let dir = edited_copy(|_| {});
    let cfg_path = dir.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"intermediate_size\": 160", "\"intermediate_size\": 128");
    std::fs::write(&cfg_path, cfg).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("mlp.") && e.contains("160") && e.contains("128") && e.contains("config implies"),
        "{e}"
    );
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = edited_copy(|_| {});
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, "{\"hidden_size\": 64").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
    std::fs::write(
        &cfg_path,
        r#"{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4}"#,
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("config.json") && e.contains("`vocab_size`"), "{e}");
}

#[test]
fn sharded_index_must_agree_with_shards() {
    let src = fixture("qwen2-tiny-gqa2-sharded");
    let dir = common::copy_dir(&src);
    assert!(Qwen2::load(dir.path()).is_ok());
    let idx_path = dir.path().join("model.safetensors.index.json");
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    let map = idx["weight_map"].as_object_mut().unwrap();
    let (name, shard) = map
        .iter()
        .find(|(_, s)| s.as_str() != map.values().next().unwrap().as_str())
        .unwrap();
    let (name, _shard) = (name.clone(), shard.clone());
    let first = map.values().next().unwrap().clone();
    map.insert(name.clone(), first);
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("index.json") && e.contains(&name), "{e}");
    // A shard that is gone is an I/O error naming it.
    let mut idx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&idx_path).unwrap()).unwrap();
    idx["weight_map"][&name] = "model-99999.safetensors".into();
    std::fs::write(&idx_path, idx.to_string()).unwrap();
    assert!(load_err(dir.path()).contains("model-99999.safetensors"));
}

#[test]
fn zero_copy_views_and_conversion() {
    let w = Weights::open(&fixture(TINY)).unwrap();
    let t = w.get("model.norm.weight").unwrap();
    assert_eq!(t.shape, &[64]);
    assert_eq!(t.data.len(), 64 * 4);
    assert_eq!(t.to_f32().len(), 64);
    let e = w.f32("model.norm.weight", &[32]).unwrap_err().to_string();
    assert!(e.contains("shape [64]"), "{e}");
}

#[test]
fn bf16_and_f16_checkpoints_load() {
    use half::{bf16, f16};
    let f32_model = Qwen2::load(&fixture(TINY)).unwrap();
    let ids = [1u32, 50, 99, 7];
    let mut cache = f32_model.new_cache(4);
    let want = f32_model
        .forward_tokens(&ids, &mut cache, massv::model::qwen2::Logits::All)
        .unwrap();
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = edited_copy(|m| {
            for (d, _, b) in m.values_mut() {
                let vals = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
                *b = match dtype {
                    Dtype::BF16 => vals.flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect(),
                    _ => vals.flat_map(|v| f16::from_f32(v).to_le_bytes()).collect(),
                };
                *d = dtype;
            }
        });
        let model = Qwen2::load(dir.path()).unwrap();
        let mut cache = model.new_cache(4);
        let got = model
            .forward_tokens(&ids, &mut cache, massv::model::qwen2::Logits::All)
            .unwrap();
        // Rounded weights move logits a little, never a lot.
        let err = common::max_abs_diff(&got, &want);
        assert!(err > 0.0 && err < 0.5, "{dtype:?}: {err}");
    }
}
