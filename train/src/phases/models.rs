//! Library entry points beyond the drafter phases: a text-only Qwen2 LM trained from
//! scratch (or further) on token sequences, and a Qwen2.5-VL target's LM + merger trained
//! with its vision tower frozen (M-RoPE positions from `rope_index`). Both are the same
//! [`Dataset`] objective and [`train`] loop as the MASSV phases.

use std::sync::Arc;

use massv::config::TextConfig;
use massv::Result;

use crate::data::TargetVision;
use crate::hf::{self, VlCheckpoint};
use crate::objective::{Dataset, Example, ImageFeatures, ModelSpec, PositionIds};
use crate::params::Params;
use crate::trainer::{train, RunControl, TrainOptions, TrainReport};

/// A text example: every token after the first is a target, or only those `mask` selects.
pub fn text_example(ids: Vec<u32>, mask: Option<Vec<bool>>) -> Example {
    let loss_mask = mask.unwrap_or_else(|| vec![true; ids.len()]);
    Example {
        ids,
        loss_mask,
        images: Vec::new(),
        positions: PositionIds::Sequential,
    }
}

/// The objective of a text-only Qwen2 LM (HF names under "model.").
pub fn text_lm_dataset(cfg: &TextConfig, examples: Vec<Example>) -> Dataset {
    Dataset {
        model: ModelSpec {
            lm: cfg.clone(),
            lm_prefix: hf::QWEN2_PREFIX.into(),
            merger: None,
            image_token: u32::MAX,
            lossy_oov: false,
        },
        examples,
    }
}

/// Trains every tensor of a Qwen2 LM (`params` from [`hf::init_qwen2`] or
/// [`hf::load_qwen2_params`]) on `examples`; save with [`hf::save_qwen2`].
pub fn train_text_lm(
    params: &mut Params,
    cfg: &TextConfig,
    examples: Vec<Example>,
    opts: &TrainOptions,
    ctl: &RunControl,
) -> Result<TrainReport> {
    let ds = text_lm_dataset(cfg, examples);
    train(params, &|_| true, &ds, opts, ctl)
}

/// The objective of a Qwen2.5-VL checkpoint's LM + merger (vision features precomputed).
pub fn vl_dataset(ck: &VlCheckpoint, examples: Vec<Example>) -> Dataset {
    Dataset {
        model: ModelSpec {
            lm: ck.cfg.text.clone(),
            lm_prefix: ck.lm_prefix().into(),
            merger: Some(ck.merger_spec()),
            image_token: ck.cfg.image_token_id,
            lossy_oov: false,
        },
        examples,
    }
}

/// A Qwen2.5-VL example: the runtime's one-turn prompt (image, then `prompt`), then
/// `response` as the assistant's answer (loss on it), M-RoPE positions over the whole
/// sequence as `get_rope_index` gives them.
pub fn vl_example(
    target: &TargetVision,
    prompt: &str,
    image: Option<Arc<ImageFeatures>>,
    response: &[u32],
) -> Result<Example> {
    target.example(prompt, image, response, true)
}

/// Which parts of a Qwen2.5-VL checkpoint train (the vision blocks never do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlParts {
    pub lm: bool,
    pub merger: bool,
}

/// Trains the LM and/or merger of `ck` in place; save with [`VlCheckpoint::save`].
pub fn train_vl(
    ck: &mut VlCheckpoint,
    examples: Vec<Example>,
    parts: VlParts,
    opts: &TrainOptions,
    ctl: &RunControl,
) -> Result<TrainReport> {
    let ds = vl_dataset(ck, examples);
    let merger: Vec<String> = ck.merger_spec().names.all().iter().map(|s| s.to_string()).collect();
    let lm_names = ds.model.lm_spec().expected_tensors();
    let trainable = |n: &str| (parts.merger && merger.iter().any(|m| m == n)) || (parts.lm && lm_names.contains_key(n));
    train(&mut ck.params, &trainable, &ds, opts, ctl)
}
