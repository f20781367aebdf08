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
    /// Qwen2.5-VL's multimodal RoPE: rotary pairs per (temporal, height, width) axis.
    pub mrope_section: Option<[usize; 3]>,
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
    parse_text(&f)
}

/// The vision tower of Qwen2.5-VL (transformers' `Qwen2_5_VLVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub in_channels: usize,
    /// Width of the merger's output: must equal the LM's hidden size.
    pub out_hidden_size: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    /// Window attention span in pixels (112 = 8×8 patches in the real models).
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
    pub tokens_per_second: usize,
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per patch: channels · temporal · patch².
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Merged units (2×2 patches) per side of an attention window.
    pub fn window_units(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }
}

/// A Qwen2.5-VL `config.json`, in the flat hub layout or the nested transformers-5 one.
#[derive(Debug, Clone, PartialEq)]
pub struct VlConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
}

/// Reads `config.json` of Qwen2.5-VL (`model_type` "qwen2_5_vl").
pub fn load_qwen2_5_vl(path: &Path) -> Result<VlConfig> {
    let root = read_json_object(path)?;
    let f = Fields { path, obj: &root };
    match f.opt_str("model_type")? {
        Some("qwen2_5_vl") => {}
        other => return Err(f.err(format!("model_type is {other:?}, expected \"qwen2_5_vl\""))),
    }
    // transformers 5 nests the LM fields under text_config; hub configs keep them at the top.
    let text = match f.child("text_config")? {
        Some(t) => parse_text(&t)?,
        None => parse_text(&f)?,
    };
    if text.mrope_section.is_none() {
        return Err(f.err("Qwen2.5-VL needs `mrope_section` (in rope_scaling or rope_parameters)"));
    }
    let v = f
        .child("vision_config")?
        .ok_or_else(|| f.err("missing required field `vision_config`"))?;
    let vision_theta = match v.child("rope_parameters")? {
        Some(r) => r.opt_f64("rope_theta")?,
        None => None,
    };
    let in_channels = match v.opt_usize("in_channels")? {
        Some(c) => c,
        None => v.opt_usize("in_chans")?.unwrap_or(3),
    };
    let vision = VisionConfig {
        depth: v.req_usize("depth")?,
        hidden_size: v.req_usize("hidden_size")?,
        intermediate_size: v.req_usize("intermediate_size")?,
        num_heads: v.req_usize("num_heads")?,
        in_channels,
        out_hidden_size: v.req_usize("out_hidden_size")?,
        patch_size: v.opt_usize("patch_size")?.unwrap_or(14),
        spatial_merge_size: v.opt_usize("spatial_merge_size")?.unwrap_or(2),
        temporal_patch_size: v.opt_usize("temporal_patch_size")?.unwrap_or(2),
        window_size: v.opt_usize("window_size")?.unwrap_or(112),
        fullatt_block_indexes: v.usize_list("fullatt_block_indexes")?.unwrap_or_default(),
        tokens_per_second: v.opt_usize("tokens_per_second")?.unwrap_or(2),
        rope_theta: vision_theta.unwrap_or(10000.0),
    };
    if let Some(act) = v.opt_str("hidden_act")? {
        if act != "silu" {
            return Err(v.err(format!(
                "vision hidden_act {act:?} is not supported (Qwen2.5-VL uses \"silu\")"
            )));
        }
    }
    validate_vision(&v, &vision, &text)?;
    let id = |key: &str, default: u32| -> Result<u32> { Ok(f.opt_usize(key)?.map_or(default, |v| v as u32)) };
    Ok(VlConfig {
        image_token_id: id("image_token_id", 151655)?,
        video_token_id: id("video_token_id", 151656)?,
        vision_start_token_id: id("vision_start_token_id", 151652)?,
        vision_end_token_id: id("vision_end_token_id", 151653)?,
        text,
        vision,
    })
}

fn validate_vision(f: &Fields, v: &VisionConfig, text: &TextConfig) -> Result<()> {
    if v.num_heads == 0 || v.hidden_size % v.num_heads != 0 || v.head_dim() % 4 != 0 {
        return Err(f.err(format!(
            "vision hidden_size {} must split into num_heads {} heads of a head_dim divisible by 4",
            v.hidden_size, v.num_heads
        )));
    }
    if v.out_hidden_size != text.hidden_size {
        return Err(f.err(format!(
            "vision out_hidden_size {} differs from the text hidden_size {}: image embeddings would not fit",
            v.out_hidden_size, text.hidden_size
        )));
    }
    if [
        v.depth,
        v.intermediate_size,
        v.patch_size,
        v.spatial_merge_size,
        v.temporal_patch_size,
    ]
    .contains(&0)
    {
        return Err(f.err("vision depth, intermediate_size, patch/merge/temporal sizes must be positive"));
    }
    if v.window_units() == 0 {
        return Err(f.err(format!(
            "vision window_size {} is smaller than one merged unit",
            v.window_size
        )));
    }
    if let Some(&b) = v.fullatt_block_indexes.iter().find(|&&b| b >= v.depth) {
        return Err(f.err(format!("fullatt_block_indexes has {b}, but depth is {}", v.depth)));
    }
    Ok(())
}

pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::config(path, "not a JSON object")),
        Err(e) => Err(Error::config(path, format!("not valid JSON: {e}"))),
    }
}

/// Parses the text fields from `f`. RoPE settings come from `rope_parameters`
/// (transformers 5) or `rope_scaling` (hub configs), falling back to `rope_theta`.
pub(crate) fn parse_text(f: &Fields) -> Result<TextConfig> {
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
    let rope = match f.child("rope_parameters")? {
        Some(r) => Some(r),
        None => f.child("rope_scaling")?,
    };
    let mut rope_theta = f.opt_f64("rope_theta")?;
    let mut mrope_section = None;
    if let Some(r) = &rope {
        rope_theta = r.opt_f64("rope_theta")?.or(rope_theta);
        let kind = match r.opt_str("rope_type")? {
            Some(k) => Some(k),
            None => r.opt_str("type")?,
        };
        if let Some(sec) = r.usize_list("mrope_section")? {
            let arr: [usize; 3] = sec
                .try_into()
                .map_err(|_| r.err("`mrope_section` must have 3 entries (temporal, height, width)"))?;
            mrope_section = Some(arr);
        }
        match kind {
            None | Some("default") => {}
            Some("mrope") if mrope_section.is_some() => {}
            Some(other) => return Err(r.err(format!("rope type {other:?} is not supported"))),
        }
    }
    let rope_theta = rope_theta.unwrap_or(10000.0);
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
        mrope_section,
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
    if let Some(sec) = c.mrope_section {
        if sec.iter().sum::<usize>() != c.head_dim / 2 {
            return Err(f.err(format!(
                "mrope_section {sec:?} must sum to head_dim / 2 = {}",
                c.head_dim / 2
            )));
        }
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

    pub fn child(&self, key: &str) -> Result<Option<Fields<'a>>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields {
                path: self.path,
                obj: m,
            })),
            Some(_) => Err(self.err(format!("`{key}` must be an object"))),
        }
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

    #[test]
    fn real_qwen2_5_vl_7b_config() {
        let c = load_qwen2_5_vl(&real("Qwen2.5-VL-7B-Instruct/config.json")).unwrap();
        assert_eq!(c.text.hidden_size, 3584);
        assert_eq!(c.text.num_key_value_heads, 4);
        assert_eq!(c.text.mrope_section, Some([16, 24, 24]));
        assert_eq!(c.text.vocab_size, 152064);
        assert!(!c.text.tie_word_embeddings);
        assert_eq!(c.vision.head_dim(), 80);
        assert_eq!(c.vision.fullatt_block_indexes, vec![7, 15, 23, 31]);
        assert_eq!(c.vision.window_units(), 4);
        assert_eq!(c.image_token_id, 151655);
        let c3 = load_qwen2_5_vl(&real("Qwen2.5-VL-3B-Instruct/config.json")).unwrap();
        assert!(c3.text.tie_word_embeddings);
        assert_eq!(c3.vision.out_hidden_size, 2048);
    }

    #[test]
    fn vision_width_must_match_text_width() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let text = std::fs::read_to_string(real("Qwen2.5-VL-7B-Instruct/config.json")).unwrap();
        std::fs::write(
            &p,
            text.replace("\"out_hidden_size\": 3584", "\"out_hidden_size\": 2048"),
        )
        .unwrap();
        let e = load_qwen2_5_vl(&p).unwrap_err().to_string();
        assert!(
            e.contains("out_hidden_size 2048 differs from the text hidden_size 3584"),
            "{e}"
        );
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
