//! Loss functions over whole examples: an LM (Qwen2 drafter, or the LM of a Qwen2.5-VL
//! target) whose image placeholders take the rows of a projector / merger applied to
//! frozen vision features, with gradients flowing through the LM into the projector.

use std::sync::Arc;

use massv::config::TextConfig;
use massv::model::qwen2::Positions;
use massv::{Error, Result};

use crate::lm::{self, LmInput, LmLoss, LmSpec};
use crate::params::Params;
use crate::vision::{self, MergerSpec};

/// The frozen vision tower's output for one image: the projector's / merger's input.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    /// [N, Dv] in window order (`VisionOutput::pre_merger`).
    pub pre_merger: Vec<f32>,
    /// Row j of the merger's output belongs to merged unit `window_index[j]`.
    pub window_index: Vec<usize>,
    pub grid_thw: [usize; 3],
}

/// Rotary positions of an example.
#[derive(Debug, Clone, PartialEq)]
pub enum PositionIds {
    /// 0, 1, …, n − 1 (the drafter: the runtime runs it at 1-D cache positions).
    Sequential,
    Seq(Vec<i32>),
    /// [3, n] M-RoPE positions (`qwen2_5_vl::rope_index`).
    Multi(Vec<i32>),
}

/// One training sequence.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Token i is a target (predicted from position i − 1) when set.
    pub loss_mask: Vec<bool>,
    /// One per image, in prompt order; their merged tokens fill the image placeholders.
    pub images: Vec<Arc<ImageFeatures>>,
    pub positions: PositionIds,
}

/// The model an objective trains: an LM and, for images, a projector or merger.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub lm: TextConfig,
    pub lm_prefix: String,
    pub merger: Option<MergerSpec>,
    /// The id whose positions take image rows (`<|image_pad|>`).
    pub image_token: u32,
    /// See [`LmInput::lossy_oov`] (true for drafters).
    pub lossy_oov: bool,
}

impl ModelSpec {
    pub fn lm_spec(&self) -> LmSpec<'_> {
        LmSpec {
            cfg: &self.lm,
            prefix: &self.lm_prefix,
        }
    }
}

/// Σ CE over the example's masked tokens; with `grads`, adds d(Σ CE)/dθ into every tensor
/// `grads` holds (the others are frozen).
pub fn example_loss(params: &Params, mut grads: Option<&mut Params>, m: &ModelSpec, ex: &Example) -> Result<LmLoss> {
    let n = ex.ids.len();
    let d = m.lm.hidden_size;
    // The images fill the first image placeholders in order (they sit in the prompt); an
    // image id generated later in a response is an ordinary token, as when decoding.
    let units: usize = ex.images.iter().map(|f| f.window_index.len()).sum();
    let slots: Vec<usize> = ex
        .ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == m.image_token)
        .map(|(i, _)| i)
        .take(units)
        .collect();
    let mut rows = Vec::with_capacity(slots.len() * d);
    let mut caches = Vec::with_capacity(ex.images.len());
    if !ex.images.is_empty() {
        let spec = m
            .merger
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("an example has images but the model has no projector".into()))?;
        for img in &ex.images {
            let (r, c) = vision::forward(params, spec, &img.pre_merger, &img.window_index)?;
            if r.len() % d != 0 {
                return Err(Error::InvalidArgument(format!(
                    "the projector outputs rows of {} values, the LM's hidden size is {d}",
                    r.len() / img.window_index.len().max(1)
                )));
            }
            rows.extend(r);
            caches.push(c);
        }
        if rows.len() != slots.len() * d {
            return Err(Error::InvalidArgument(format!(
                "{} image placeholders but the images give {} embeddings",
                slots.len(),
                rows.len() / d
            )));
        }
    }
    let seq: Vec<i32>;
    let positions = match &ex.positions {
        PositionIds::Sequential => {
            seq = (0..n as i32).collect();
            Positions::Seq(&seq)
        }
        PositionIds::Seq(p) => Positions::Seq(p),
        PositionIds::Multi(p) => Positions::Multi(p),
    };
    let inp = LmInput {
        ids: &ex.ids,
        positions,
        embed_slots: &slots,
        embed_rows: &rows,
        loss_mask: &ex.loss_mask,
        lossy_oov: m.lossy_oov,
    };
    let out = lm::loss(params, grads.as_deref_mut(), &m.lm_spec(), &inp)?;
    if let (Some(g), Some(spec)) = (grads, &m.merger) {
        if spec.names.all().iter().any(|n| g.contains(n)) {
            let mut offset = 0;
            for c in &caches {
                let len = c_len(c, d);
                vision::backward(params, g, spec, c, &out.d_embed_rows[offset..offset + len], None)?;
                offset += len;
            }
        }
    }
    Ok(out)
}

fn c_len(c: &vision::MergerCache, d: usize) -> usize {
    c.units() * d
}

/// A dataset of examples and the model they train; what the training loop consumes.
pub trait Objective: Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Σ loss of example `i`, adding its gradient into `grads` when given.
    fn loss(&self, params: &Params, grads: Option<&mut Params>, i: usize) -> Result<LmLoss>;
}

/// Examples + model: the objective of every phase (projector pretraining, SDViT, text LM
/// pretraining, Qwen2.5-VL LM + merger training).
pub struct Dataset {
    pub model: ModelSpec,
    pub examples: Vec<Example>,
}

impl Objective for Dataset {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn loss(&self, params: &Params, grads: Option<&mut Params>, i: usize) -> Result<LmLoss> {
        let ex = self
            .examples
            .get(i)
            .ok_or_else(|| Error::InvalidArgument(format!("example {i} of {}", self.examples.len())))?;
        example_loss(params, grads, &self.model, ex)
    }
}

/// Mean CE per scored token over the whole dataset (no gradients).
pub fn mean_loss(obj: &dyn Objective, params: &Params) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..obj.len() {
        let l = obj.loss(params, None, i)?;
        sum += l.loss_sum;
        count += l.tokens;
    }
    Ok(if count == 0 { 0.0 } else { sum / count as f64 })
}
