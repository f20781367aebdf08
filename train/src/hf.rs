//! Reading and writing model directories: Qwen2 causal LMs (HF layout: config.json +
//! model.safetensors), MASSV drafters (+ massv.json + projector.safetensors) and
//! Qwen2.5-VL checkpoints (all tensors, LM and merger trained, vision tower as loaded).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use massv::config::{load_qwen2, load_qwen2_5_vl, TextConfig, VlConfig};
use massv::model::projector::{self, Projector, ProjectorConfig};
use massv::model::qwen2_5_vl::{self, Layout};
use massv::weights::{Weights, INDEX_FILE, SINGLE_FILE};
use massv::{Error, Result};

use crate::lm::LmSpec;
use crate::params::Params;
use crate::trainer::Rng;
use crate::vision::{MergerNames, MergerSpec, PROJECTOR_PREFIX};

/// The prefix of a Qwen2 LM's tensors in its own checkpoint.
pub const QWEN2_PREFIX: &str = "model.";

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// config.json + every tensor of a Qwen2 causal-LM directory (inventory-checked).
pub fn load_qwen2_params(dir: &Path) -> Result<(TextConfig, Params)> {
    let cfg = load_qwen2(&dir.join("config.json"))?;
    let w = Weights::open(dir)?;
    let spec = LmSpec {
        cfg: &cfg,
        prefix: QWEN2_PREFIX,
    };
    let expected = spec.expected_tensors();
    w.check_inventory(&expected)?;
    let p = Params::read(&w, &expected, str::to_string)?;
    Ok((cfg, p))
}

/// Fresh Qwen2 weights as transformers initialises them: N(0, std) for the embedding and
/// every linear weight, zero biases, unit norm weights. Seeded.
pub fn init_qwen2(cfg: &TextConfig, seed: u64, std: f32) -> Result<Params> {
    let spec = LmSpec {
        cfg,
        prefix: QWEN2_PREFIX,
    };
    let mut rng = Rng::new(seed);
    let mut p = Params::new();
    for (name, shape) in spec.expected_tensors() {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| rng.normal() as f32 * std).collect()
        };
        p.insert(name, shape, data)?;
    }
    Ok(p)
}

/// A Qwen2 `config.json` for `cfg` (the fields massv and transformers read).
pub fn qwen2_config_json(cfg: &TextConfig) -> Value {
    let mut v = json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_sliding_window": cfg.sliding_window.is_some(),
        "sliding_window": cfg.sliding_window,
        "max_window_layers": cfg.max_window_layers,
        "torch_dtype": "float32",
    });
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        v["head_dim"] = json!(cfg.head_dim);
    }
    if let Some(b) = cfg.bos_token_id {
        v["bos_token_id"] = json!(b);
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => v["eos_token_id"] = json!(one),
        many => v["eos_token_id"] = json!(many),
    }
    v
}

/// Writes `params`' LM tensors (those of `spec`) as `dir/model.safetensors`.
pub fn save_lm_weights(dir: &Path, spec: &LmSpec, params: &Params) -> Result<()> {
    let expected = spec.expected_tensors();
    let lm = params.select(|n| expected.contains_key(n), str::to_string)?;
    if lm.len() != expected.len() {
        return Err(Error::InvalidArgument(format!(
            "{} of the LM's {} tensors are present",
            lm.len(),
            expected.len()
        )));
    }
    lm.save(&dir.join(SINGLE_FILE))
}

/// Writes a Qwen2 causal-LM directory: config.json (from `cfg`, unless `config` gives the
/// original file's JSON to keep) and model.safetensors.
pub fn save_qwen2(dir: &Path, cfg: &TextConfig, config: Option<&Value>, params: &Params) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let json = config.cloned().unwrap_or_else(|| qwen2_config_json(cfg));
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    massv::weights::write_atomic(&dir.join("config.json"), text.as_bytes())?;
    save_lm_weights(
        dir,
        &LmSpec {
            cfg,
            prefix: QWEN2_PREFIX,
        },
        params,
    )
}

/// The spec of a MASSV projector inside training params.
pub fn projector_spec(cfg: &ProjectorConfig) -> MergerSpec {
    MergerSpec {
        names: MergerNames::projector(),
        vision_hidden: cfg.vision_hidden_size,
        merge: cfg.spatial_merge_size,
        eps: cfg.norm_eps as f32,
    }
}

/// A drafter directory's projector (validated by the runtime's own loader), its tensors
/// renamed under [`PROJECTOR_PREFIX`]; None for a text-only drafter.
pub fn load_projector(dir: &Path) -> Result<Option<(ProjectorConfig, Params)>> {
    let Some(p) = Projector::load(dir)? else {
        return Ok(None);
    };
    let w = Weights::open_files(dir, &[dir.join(projector::WEIGHTS_FILE)])?;
    let params = Params::read(&w, &projector::expected_tensors(&p.cfg), |n| {
        format!("{PROJECTOR_PREFIX}{n}")
    })?;
    Ok(Some((p.cfg, params)))
}

/// A fresh projector: unit norm weight, nn.Linear's default U(±1/√fan_in) weights and biases.
pub fn init_projector(cfg: &ProjectorConfig, seed: u64) -> Result<Params> {
    let mut rng = Rng::new(seed);
    let mut p = Params::new();
    for (name, shape) in projector::expected_tensors(cfg) {
        let n: usize = shape.iter().product();
        let data = if name == "norm.weight" {
            vec![1.0; n]
        } else {
            let fan_in = if name.starts_with("fc1") {
                cfg.vision_hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size
            } else {
                cfg.projector_hidden_size
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
        };
        p.insert(format!("{PROJECTOR_PREFIX}{name}"), shape, data)?;
    }
    Ok(p)
}

/// Writes `massv.json` + `projector.safetensors` into `dir`.
pub fn save_projector(dir: &Path, cfg: &ProjectorConfig, params: &Params) -> Result<()> {
    let json = json!({
        "format": projector::FORMAT,
        "vision_hidden_size": cfg.vision_hidden_size,
        "spatial_merge_size": cfg.spatial_merge_size,
        "projector_hidden_size": cfg.projector_hidden_size,
        "draft_hidden_size": cfg.draft_hidden_size,
        "norm_eps": cfg.norm_eps,
        "activation": "gelu",
    });
    let tensors = params.select(
        |n| n.starts_with(PROJECTOR_PREFIX),
        |n| n[PROJECTOR_PREFIX.len()..].to_string(),
    )?;
    let expected = projector::expected_tensors(cfg);
    for (name, shape) in &expected {
        if tensors.shape(name) != Some(shape.as_slice()) {
            return Err(Error::InvalidArgument(format!(
                "projector tensor `{name}` is missing or not of shape {shape:?}"
            )));
        }
    }
    tensors.save(&dir.join(projector::WEIGHTS_FILE))?;
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    massv::weights::write_atomic(&dir.join(projector::CONFIG_FILE), text.as_bytes())
}

/// Is `name` a weight file of a model directory (replaced when the weights are rewritten)?
fn is_weight_file(dir: &Path, name: &str) -> bool {
    if name == SINGLE_FILE || name == INDEX_FILE {
        return true;
    }
    // Shards named by the index.
    let Ok(text) = std::fs::read_to_string(dir.join(INDEX_FILE)) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    v.get("weight_map")
        .and_then(Value::as_object)
        .is_some_and(|m| m.values().any(|s| s.as_str() == Some(name)))
}

/// Copies the plain files of `src` into `dst` (created), except those `skip` names.
pub fn copy_dir_files(src: &Path, dst: &Path, skip: &dyn Fn(&str) -> bool) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| io(dst, e))?;
    let same = src
        .canonicalize()
        .ok()
        .zip(dst.canonicalize().ok())
        .is_some_and(|(a, b)| a == b);
    if same {
        return Ok(());
    }
    for e in std::fs::read_dir(src).map_err(|e| io(src, e))? {
        let e = e.map_err(|e| io(src, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.path().is_file() || skip(&name) || name.starts_with('.') {
            continue;
        }
        std::fs::copy(e.path(), dst.join(&name)).map_err(|err| io(&dst.join(&name), err))?;
    }
    Ok(())
}

/// Writes a MASSV drafter directory at `out`: the files of the drafter `src` (tokenizer,
/// configs), the LM's weights (rewritten from `lm` when given, else copied), and the
/// projector.
pub fn save_drafter(
    src: &Path,
    out: &Path,
    lm: Option<(&TextConfig, &Params)>,
    projector_cfg: &ProjectorConfig,
    params: &Params,
) -> Result<()> {
    let rewrite_lm = lm.is_some();
    copy_dir_files(src, out, &|n| {
        n == projector::CONFIG_FILE
            || n == projector::WEIGHTS_FILE
            || n == "train_log.json"
            || (rewrite_lm && is_weight_file(src, n))
    })?;
    if let Some((cfg, p)) = lm {
        // A previously sharded LM becomes one file: drop a copied index if any.
        let _ = std::fs::remove_file(out.join(INDEX_FILE));
        save_lm_weights(
            out,
            &LmSpec {
                cfg,
                prefix: QWEN2_PREFIX,
            },
            p,
        )?;
    }
    save_projector(out, projector_cfg, params)
}

/// Every tensor of a Qwen2.5-VL directory with its config and layout.
pub struct VlCheckpoint {
    pub cfg: VlConfig,
    pub layout: Layout,
    pub params: Params,
    pub dir: PathBuf,
}

impl VlCheckpoint {
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = load_qwen2_5_vl(&dir.join("config.json"))?;
        let w = Weights::open(dir)?;
        let layout = if w.contains("model.language_model.embed_tokens.weight") {
            Layout::Transformers5
        } else {
            Layout::Hub
        };
        let expected: BTreeMap<String, Vec<usize>> = qwen2_5_vl::expected_tensors(&cfg, layout);
        w.check_inventory(&expected)?;
        let params = Params::read(&w, &expected, str::to_string)?;
        Ok(VlCheckpoint {
            cfg,
            layout,
            params,
            dir: dir.to_path_buf(),
        })
    }

    pub fn lm_prefix(&self) -> &'static str {
        match self.layout {
            Layout::Hub => "model.",
            Layout::Transformers5 => "model.language_model.",
        }
    }

    pub fn visual_prefix(&self) -> &'static str {
        match self.layout {
            Layout::Hub => "visual.",
            Layout::Transformers5 => "model.visual.",
        }
    }

    /// The merger as a trainable op chain (ln_q, mlp.0, GELU, mlp.2).
    pub fn merger_spec(&self) -> MergerSpec {
        MergerSpec {
            names: MergerNames::qwen2_5_vl(self.visual_prefix()),
            vision_hidden: self.cfg.vision.hidden_size,
            merge: self.cfg.vision.spatial_merge_size,
            eps: 1e-6,
        }
    }

    /// Writes the checkpoint to `out` in the layout it was read in: every other file of
    /// the source directory copied, all tensors in one model.safetensors.
    pub fn save(&self, out: &Path) -> Result<()> {
        let src = self.dir.clone();
        copy_dir_files(&src, out, &|n| is_weight_file(&src, n) || n.starts_with("expected"))?;
        self.params.save(&out.join(SINGLE_FILE))
    }
}
