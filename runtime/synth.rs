//! `massv synth`: random-weight checkpoints with the real tensor names and shapes of a
//! config, for loader, memory and speed work without the real weights. Tensors are
//! generated while they are written (a 7B checkpoint never sits in memory), sharded
//! above 4 GB with an index like the hub's, into a temp directory renamed at the end.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use safetensors::{Dtype, View};
use serde_json::{Map, Value};

use crate::config::{self, read_json_object};
use crate::error::{Error, Result};
use crate::model::{qwen2, qwen2_5_vl};
use crate::weights::{write_atomic, INDEX_FILE, SINGLE_FILE};

/// Largest shard, as the hub's default `max_shard_size` of recent transformers.
pub const MAX_SHARD_BYTES: usize = 4 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthDtype {
    Bf16,
    F32,
}

pub struct SynthOptions {
    pub dtype: SynthDtype,
    pub seed: u64,
    /// Keep only this many LM layers (and vision blocks): a shallow variant.
    pub layers: Option<usize>,
    /// Shard size limit; [`MAX_SHARD_BYTES`] unless testing the sharded layout.
    pub max_shard_bytes: usize,
}

/// Writes a checkpoint for `config_path` (Qwen2 or Qwen2.5-VL) into `out`, which must not
/// exist or be empty. Returns the number of tensors written.
pub fn synth(config_path: &Path, out: &Path, opts: &SynthOptions) -> Result<usize> {
    if out.exists() && std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.next().is_some() {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not empty",
            out.display()
        )));
    }
    let mut root = read_json_object(config_path)?;
    if let Some(n) = opts.layers {
        shallow(&mut root, n, config_path)?;
    }
    let tmp = out.with_file_name(format!(
        ".{}.synth-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = write_checkpoint(&root, &tmp, opts);
    let result = result.and_then(|n| {
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_checkpoint(root: &Map<String, Value>, dir: &Path, opts: &SynthOptions) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let json = serde_json::to_string_pretty(root).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&cfg_path, json.as_bytes())?;
    // Parse what we wrote: the checkpoint is for exactly the config it carries.
    let shapes = match root.get("model_type").and_then(Value::as_str) {
        Some("qwen2_5_vl") => {
            qwen2_5_vl::expected_tensors(&config::load_qwen2_5_vl(&cfg_path)?, qwen2_5_vl::Layout::Hub)
        }
        Some("qwen2") => qwen2::expected_tensors(&config::load_qwen2(&cfg_path)?, qwen2::Names::QWEN2),
        other => {
            return Err(Error::config(
                &cfg_path,
                format!("model_type {other:?} is not one massv can synthesise"),
            ))
        }
    };
    let dtype = match opts.dtype {
        SynthDtype::Bf16 => Dtype::BF16,
        SynthDtype::F32 => Dtype::F32,
    };
    let tensors: Vec<Synth> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| Synth {
            seed: opts.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
            name,
            shape,
            dtype,
        })
        .collect();
    let n = tensors.len();
    let shards = shard(tensors, opts.max_shard_bytes);
    if shards.len() == 1 {
        let shard = shards.into_iter().next().unwrap_or_default();
        write_shard(&dir.join(SINGLE_FILE), shard)?;
        return Ok(n);
    }
    let count = shards.len();
    let mut weight_map = Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        for t in &shard {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
            total += View::data_len(t);
        }
        write_shard(&dir.join(&file), shard)?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(&dir.join(INDEX_FILE), index.to_string().as_bytes())?;
    Ok(n)
}

/// Keeps `n` LM layers and `n` vision blocks (full-attention blocks past them dropped).
fn shallow(root: &mut Map<String, Value>, n: usize, path: &Path) -> Result<()> {
    if n == 0 {
        return Err(Error::InvalidArgument("--layers must be at least 1".into()));
    }
    let text = match root.get_mut("text_config") {
        Some(Value::Object(t)) => t,
        _ => &mut *root,
    };
    if !text.contains_key("num_hidden_layers") {
        return Err(Error::config(path, "missing required field `num_hidden_layers`"));
    }
    text.insert("num_hidden_layers".into(), n.into());
    if let Some(Value::Array(types)) = text.get_mut("layer_types") {
        types.truncate(n);
    }
    if let Some(Value::Object(v)) = root.get_mut("vision_config") {
        let depth = v.get("depth").and_then(Value::as_u64).unwrap_or(0) as usize;
        v.insert("depth".into(), depth.min(n).into());
        if let Some(Value::Array(full)) = v.get_mut("fullatt_block_indexes") {
            full.retain(|b| b.as_u64().is_some_and(|b| (b as usize) < n));
        }
    }
    Ok(())
}

fn shard(tensors: Vec<Synth>, max_bytes: usize) -> Vec<Vec<Synth>> {
    let mut shards: Vec<Vec<Synth>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        let len = View::data_len(&t);
        if size + len > max_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(last) = shards.last_mut() {
            last.push(t);
        }
    }
    shards
}

fn write_shard(path: &Path, tensors: Vec<Synth>) -> Result<()> {
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let items: BTreeMap<String, Synth> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
    safetensors::serialize_to_file(items, meta, path).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A tensor generated on demand: norms are ones (as trained norms are near one), other
/// weights N(0, 0.02)-like uniform noise, biases small noise.
struct Synth {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    seed: u64,
}

impl Synth {
    fn values(&self) -> impl Iterator<Item = f32> + '_ {
        let is_norm =
            self.name.ends_with("norm.weight") || self.name.contains("layernorm") || self.name.ends_with("ln_q.weight");
        let mut state = self.seed ^ 0x9E37_79B9_7F4A_7C15;
        // 0.02 · √3 makes the uniform noise's std 0.02, as HF's initializer_range.
        let scale = 0.02 * 3f32.sqrt();
        (0..self.shape.iter().product::<usize>()).map(move |_| {
            if is_norm {
                return 1.0;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
    }
}

impl View for Synth {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.dtype {
            Dtype::BF16 => Cow::Owned(self.values().flat_map(|v| bf16::from_f32(v).to_le_bytes()).collect()),
            _ => Cow::Owned(self.values().flat_map(f32::to_le_bytes).collect()),
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}
