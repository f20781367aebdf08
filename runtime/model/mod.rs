//! Model definitions, one file per architecture, and [`Target`]: whichever architecture
//! a model directory holds, behind one prefill / decode interface.

pub mod cuda_qwen2;
pub mod projector;
pub mod qwen2;
pub mod qwen2_5_vl;

use std::path::Path;

use crate::config::{read_json_object, TextConfig};
use crate::error::{Error, Result};
use crate::image::Preprocessed;
use crate::kv_cache::KvCache;
use qwen2::{Logits, Positions, Qwen2, TreeMask};
use qwen2_5_vl::{Qwen25Vl, VisionOutput};

#[allow(clippy::large_enum_variant)] // one per process, never moved in a hot path
pub enum Target {
    Text(Qwen2),
    Vl(Qwen25Vl),
}

/// Per-request decoding state of one model.
#[derive(Clone)]
pub struct Session {
    pub cache: KvCache,
    /// Added to cache indices to get text positions (M-RoPE; 0 for text LMs).
    pub rope_delta: i32,
    /// The prompt as the model saw it (image placeholders expanded).
    pub prompt: Vec<u32>,
}

impl Target {
    /// Loads `dir` according to its config.json's `model_type`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let root = read_json_object(&path)?;
        match root.get("model_type").and_then(|v| v.as_str()) {
            Some("qwen2") => Ok(Target::Text(Qwen2::load(dir)?)),
            Some("qwen2_5_vl") => Ok(Target::Vl(Qwen25Vl::load(dir)?)),
            other => Err(Error::config(
                &path,
                format!("model_type {other:?} is not supported (qwen2, qwen2_5_vl)"),
            )),
        }
    }

    pub fn text_config(&self) -> &TextConfig {
        match self {
            Target::Text(m) => &m.cfg,
            Target::Vl(m) => &m.cfg.text,
        }
    }

    /// The vision tower on each image (empty for text LMs, which take no images).
    pub fn encode_images(&self, images: &[Preprocessed]) -> Result<Vec<VisionOutput>> {
        match self {
            Target::Text(_) if !images.is_empty() => Err(Error::InvalidArgument(
                "an image was given but the model is text-only".into(),
            )),
            Target::Text(_) => Ok(Vec::new()),
            Target::Vl(m) => images
                .iter()
                .map(|p| m.encode_image(&p.pixel_values, p.grid_thw))
                .collect(),
        }
    }

    /// Runs the prompt into a fresh session that can hold `extra` more tokens. `ids`
    /// carry one `<|image_pad|>` per image, as the chat template writes them; `vision`
    /// is `encode_images` of `images`.
    pub fn prefill(
        &self,
        ids: &[u32],
        images: &[Preprocessed],
        vision: &[VisionOutput],
        extra: usize,
        logits: Logits,
    ) -> Result<(Vec<f32>, Session)> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        match self {
            Target::Text(m) => {
                if !images.is_empty() {
                    return Err(Error::InvalidArgument(
                        "an image was given but the model is text-only".into(),
                    ));
                }
                let mut cache = new_cache(m, ids.len(), extra)?;
                let out = m.forward_tokens(ids, &mut cache, logits)?;
                Ok((
                    out,
                    Session {
                        cache,
                        rope_delta: 0,
                        prompt: ids.to_vec(),
                    },
                ))
            }
            Target::Vl(m) => {
                let grids: Vec<[usize; 3]> = images.iter().map(|p| p.grid_thw).collect();
                let expanded = m.expand_image_placeholders(ids, &grids)?;
                let embeds = vision.iter().flat_map(|v| v.embeds.iter().copied()).collect();
                let pre = m.prepare(expanded, &grids, embeds)?;
                let mut cache = new_cache(&m.lm, pre.ids.len(), extra)?;
                let out = m.prefill(&pre, &mut cache, logits)?;
                Ok((
                    out,
                    Session {
                        cache,
                        rope_delta: pre.rope_delta,
                        prompt: pre.ids,
                    },
                ))
            }
        }
    }

    /// Runs `tokens` after the session's cache.
    pub fn decode(&self, tokens: &[u32], s: &mut Session, logits: Logits) -> Result<Vec<f32>> {
        match self {
            Target::Text(m) => m.forward_tokens(tokens, &mut s.cache, logits),
            Target::Vl(m) => m.decode(tokens, s.rope_delta, &mut s.cache, logits),
        }
    }

    /// Scores a token tree after the session's cache in one pass: node i (tree order,
    /// parents first) sits at position (cache length + depths[i]) and sees the cache and
    /// the nodes `mask` allows ([n, n]: its ancestors and itself). Logits of every node.
    pub fn decode_tree(&self, tokens: &[u32], depths: &[usize], mask: &[u8], s: &mut Session) -> Result<Vec<f32>> {
        if depths.len() != tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "{} tree depths for {} tokens",
                depths.len(),
                tokens.len()
            )));
        }
        let mask = TreeMask {
            start: s.cache.len(),
            allow: mask,
        };
        match self {
            Target::Text(m) => {
                let start = s.cache.len() as i32;
                let positions: Vec<i32> = depths.iter().map(|&d| start + d as i32).collect();
                let hidden = m.embed(tokens)?;
                m.forward_masked(
                    hidden,
                    Positions::Seq(&positions),
                    &mut s.cache,
                    Logits::All,
                    Some(mask),
                )
            }
            Target::Vl(m) => m.decode_tree(tokens, depths, mask, s.rope_delta, &mut s.cache),
        }
    }
}

fn new_cache(m: &Qwen2, prompt: usize, extra: usize) -> Result<KvCache> {
    let capacity = prompt + extra;
    if capacity > m.cfg.max_position_embeddings {
        return Err(Error::ContextOverflow {
            tokens: prompt,
            new: extra,
            capacity: m.cfg.max_position_embeddings,
        });
    }
    Ok(m.new_cache(capacity))
}
