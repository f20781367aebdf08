//! HF `config.json` parsing. Fields follow transformers' `Qwen2Config`; absent optional
//! fields take transformers' defaults, absent required ones are an error naming the field.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The decoder-LM part of a config: a Qwen2 causal LM, or the text model of Qwen2.5-VL.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Sliding-window attention applies to layers `>= max_window_layers` when set.
    pub sliding_window: Option<usize>,
    pub max_window_layers: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl TextConfig {
    /// Window size for `layer`, or None for full attention (transformers' `layer_types`).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window.filter(|_| layer >= self.max_window_layers)
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
}

/// Reads `config.json` of a Qwen2 causal LM (`model_type` "qwen2").
pub fn load_qwen2(path: &Path) -> Result<TextConfig> {
    let root = read_json_object(path)?;
    let f = Fields { path, obj: &root };
    if let Some(mt) = f.opt_str("model_type")? {
        if mt != "qwen2" {
            return Err(Error::config(path, format!("model_type is {mt:?}, expected \"qwen2\"")));
        }
    }
    parse_text(&f, None)
}

pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::config(path, "not a JSON object")),
        Err(e) => Err(Error::config(path, format!("not valid JSON: {e}"))),
    }
}

/// Parses the text fields from `f`; `rope_params` is where transformers 5 keeps
/// `rope_theta` (its `rope_parameters`), when present.
pub(crate) fn parse_text(f: &Fields, rope_params: Option<&Fields>) -> Result<TextConfig> {
    let hidden_size = f.req_usize("hidden_size")?;
    let num_attention_heads = f.req_usize("num_attention_heads")?;
    let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    if let Some(act) = f.opt_str("hidden_act")? {
        if act != "silu" {
            return Err(f.err(format!("hidden_act {act:?} is not supported (Qwen2 uses \"silu\")")));
        }
    }
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) => d,
        None if num_attention_heads > 0 && hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => return Err(f.err("hidden_size is not a multiple of num_attention_heads")),
    };
    let rope_theta = match rope_params.map(|r| r.opt_f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    let use_sliding_window = f.opt_bool("use_sliding_window")?.unwrap_or(false);
    let sliding = f.opt_usize("sliding_window")?;
    let cfg = TextConfig {
        vocab_size: f.req_usize("vocab_size")?,
        hidden_size,
        intermediate_size: f.req_usize("intermediate_size")?,
        num_hidden_layers: f.req_usize("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(32768),
        sliding_window: if use_sliding_window { sliding } else { None },
        max_window_layers: f.opt_usize("max_window_layers")?.unwrap_or(28),
        bos_token_id: f.opt_usize("bos_token_id")?.map(|v| v as u32),
        eos_token_ids: f.token_ids("eos_token_id")?,
    };
    validate(f, &cfg)?;
    Ok(cfg)
}

fn validate(f: &Fields, c: &TextConfig) -> Result<()> {
    let positive = [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("num_key_value_heads", c.num_key_value_heads),
        ("head_dim", c.head_dim),
    ];
    for (name, v) in positive {
        if v == 0 {
            return Err(f.err(format!("`{name}` must be positive")));
        }
    }
    if c.num_attention_heads % c.num_key_value_heads != 0 {
        return Err(f.err(format!(
            "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            c.num_attention_heads, c.num_key_value_heads
        )));
    }
    if c.head_dim % 2 != 0 {
        return Err(f.err(format!("head_dim {} must be even for rotary embeddings", c.head_dim)));
    }
    if !(c.rms_norm_eps > 0.0 && c.rope_theta > 0.0) {
        return Err(f.err("rms_norm_eps and rope_theta must be positive"));
    }
    Ok(())
}

/// Typed access to one JSON object of a config file, with errors that name file and field.
pub(crate) struct Fields<'a> {
    pub path: &'a Path,
    pub obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn err(&self, reason: impl Into<String>) -> Error {
        Error::Config {
            path: PathBuf::from(self.path),
            reason: reason.into(),
        }
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing required field `{key}`")))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{key}` must be a non-negative integer, got {v}"))),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a boolean, got {v}"))),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a string, got {v}"))),
        }
    }

    pub fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a list of non-negative integers"))),
            Some(v) => Err(self.err(format!("`{key}` must be a list, got {v}"))),
        }
    }

    /// A token id field that may be an integer or a list of integers (eos_token_id).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Number(_)) => Ok(vec![self.req_usize(key)? as u32]),
            Some(_) => Ok(self
                .usize_list(key)?
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as u32)
                .collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/real-models")
            .join(name)
    }

    #[test]
    fn real_qwen2_5_0_5b_config() {
        let c = load_qwen2(&real("Qwen2.5-0.5B-Instruct/config.json")).unwrap();
        assert_eq!(c.hidden_size, 896);
        assert_eq!(c.num_attention_heads, 14);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.intermediate_size, 4864);
        assert_eq!(c.vocab_size, 151936);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.sliding_window, None, "use_sliding_window is false");
        assert_eq!(c.eos_token_ids, vec![151645]);
    }

    fn parse(json: &str) -> Result<TextConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, json).unwrap();
        load_qwen2(&p)
    }

    #[test]
    fn not_json_names_the_file() {
        let e = parse("{ nope").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = parse(r#"{"hidden_size": 64, "num_attention_heads": 4}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing required field `vocab_size`"), "{e}");
    }

    #[test]
    fn bad_gqa_ratio_is_rejected() {
        let e = parse(
            r#"{"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 4, "num_key_value_heads": 3}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a multiple of num_key_value_heads"), "{e}");
    }

    #[test]
    fn sliding_window_applies_from_max_window_layers() {
        let c = parse(
            r#"{"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 4,
                "num_attention_heads": 4, "use_sliding_window": true, "sliding_window": 16,
                "max_window_layers": 2, "eos_token_id": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!(c.layer_window(1), None);
        assert_eq!(c.layer_window(2), Some(16));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }
}
