//! The training phases of MASSV and the library entry points for other models:
//! - [`projector`]: phase 1, projector pretraining on captions (drafter LM frozen);
//! - [`distill`]: self-distilled data, the target answering prompts with the runtime;
//! - [`sdvit`]: phase 2, projector + drafter LM fine-tuned on the target's responses;
//! - [`tvd`]: total variation distance between target and drafter next-token distributions;
//! - [`models`]: text-only Qwen2 LMs from scratch, Qwen2.5-VL LM + merger training.

pub mod distill;
pub mod models;
pub mod projector;
pub mod sdvit;
pub mod tvd;
pub mod world;

use std::path::{Path, PathBuf};

use massv::config::TextConfig;
use massv::model::projector::{ProjectorConfig, CONFIG_FILE};
use massv::tokenizer::Tokenizer;
use massv::{Error, Result};

use crate::data::TargetVision;
use crate::hf;
use crate::objective::{Dataset, ModelSpec};
use crate::params::Params;
use crate::trainer::{RunControl, TrainOptions, TrainReport};

/// What the drafter-training phases share.
#[derive(Debug, Clone)]
pub struct DrafterRun {
    /// The Qwen2.5-VL target directory.
    pub target: PathBuf,
    /// The drafter directory (Qwen2 LM, with or without a MASSV projector).
    pub draft: PathBuf,
    pub data: PathBuf,
    /// The drafter directory to write.
    pub out: PathBuf,
    pub train: TrainOptions,
    /// Fail on a missing image file instead of skipping the line.
    pub strict: bool,
    /// Folder for cached vision features (in memory only when None).
    pub feature_cache: Option<PathBuf>,
    /// Continue from `out/checkpoints` when a checkpoint is there.
    pub resume: bool,
    pub checkpoint_every: usize,
    /// Examples the before/after loss is measured on (the first ones).
    pub eval_examples: usize,
    /// Stop after this many steps (simulates an interruption; for tests).
    pub stop_after: Option<usize>,
}

impl DrafterRun {
    pub fn new(target: &Path, draft: &Path, data: &Path, out: &Path) -> Self {
        DrafterRun {
            target: target.to_path_buf(),
            draft: draft.to_path_buf(),
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            train: TrainOptions::default(),
            strict: false,
            feature_cache: None,
            resume: false,
            checkpoint_every: 0,
            eval_examples: 64,
            stop_after: None,
        }
    }

    fn control(&self, label: &str) -> RunControl<'static> {
        RunControl {
            checkpoint_dir: Some(self.out.join("checkpoints")),
            checkpoint_every: self.checkpoint_every,
            resume: self.resume,
            stop_after: self.stop_after,
            log_path: Some(self.out.join("train_log.json")),
            decay: None,
            label: label.to_string(),
        }
    }
}

/// What a drafter-training phase did.
#[derive(Debug, Clone)]
pub struct PhaseReport {
    pub examples: usize,
    /// Lines skipped because their image file is missing.
    pub missing_images: usize,
    /// Mean CE per response token over the first `eval_examples` examples, before and after.
    pub mean_loss_before: f64,
    pub mean_loss_after: f64,
    pub train: TrainReport,
    pub out: PathBuf,
}

/// The drafter's LM, checked against the target: same tokenizer.
fn load_drafter_lm(target: &TargetVision, draft: &Path) -> Result<(TextConfig, Params)> {
    let tok = Tokenizer::from_dir(draft)?;
    if let Some(why) = tok.vocabulary_mismatch(&target.tokenizer) {
        return Err(Error::InvalidArgument(format!(
            "drafter {} does not share the tokenizer of target {}: {why}",
            draft.display(),
            target.dir.display()
        )));
    }
    hf::load_qwen2_params(draft)
}

/// Checks that a projector maps the target's vision features into the drafter's width.
fn check_projector_fits(p: &ProjectorConfig, target: &TargetVision, lm: &TextConfig, draft: &Path) -> Result<()> {
    let v = &target.model.cfg.vision;
    if p.vision_hidden_size != v.hidden_size
        || p.spatial_merge_size != v.spatial_merge_size
        || p.draft_hidden_size != lm.hidden_size
    {
        return Err(Error::Config {
            path: draft.join(CONFIG_FILE),
            reason: format!(
                "the projector maps {}×{}² → {}, but the target's vision features are {}×{}² and the drafter's hidden size is {}",
                p.vision_hidden_size,
                p.spatial_merge_size,
                p.draft_hidden_size,
                v.hidden_size,
                v.spatial_merge_size,
                lm.hidden_size
            ),
        });
    }
    Ok(())
}

/// What the drafter phases do once their examples are built: train the tensors
/// `trainable` selects, measure the loss before and after, and (unless interrupted) write
/// the drafter directory — with the LM's weights rewritten when `save_lm`.
pub(crate) struct PhaseData<'a> {
    pub examples: Vec<crate::objective::Example>,
    pub missing_images: usize,
    pub lm_cfg: &'a TextConfig,
    pub pcfg: &'a ProjectorConfig,
    pub target: &'a TargetVision,
}

impl DrafterRun {
    pub(crate) fn train_and_save(
        &self,
        data: PhaseData,
        params: &mut Params,
        trainable: &dyn Fn(&str) -> bool,
        label: &str,
        save_lm: bool,
    ) -> Result<PhaseReport> {
        if data.examples.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no usable examples ({} skipped for missing images)",
                self.data.display(),
                data.missing_images
            )));
        }
        let ds = Dataset {
            model: drafter_model(data.lm_cfg, data.pcfg, data.target),
            examples: data.examples,
        };
        std::fs::create_dir_all(&self.out).map_err(|e| Error::Io {
            path: self.out.clone(),
            source: e,
        })?;
        let before = eval_loss(&ds, params, self.eval_examples)?;
        let report = crate::trainer::train(params, trainable, &ds, &self.train, &self.control(label))?;
        let after = eval_loss(&ds, params, self.eval_examples)?;
        if !report.interrupted {
            let lm = save_lm.then_some((data.lm_cfg, &*params));
            hf::save_drafter(&self.draft, &self.out, lm, data.pcfg, params)?;
        }
        Ok(PhaseReport {
            examples: ds.examples.len(),
            missing_images: data.missing_images,
            mean_loss_before: before,
            mean_loss_after: after,
            train: report,
            out: self.out.clone(),
        })
    }
}

fn drafter_model(lm: &TextConfig, p: &ProjectorConfig, target: &TargetVision) -> ModelSpec {
    ModelSpec {
        lm: lm.clone(),
        lm_prefix: hf::QWEN2_PREFIX.into(),
        merger: Some(hf::projector_spec(p)),
        image_token: target.image_token(),
        lossy_oov: true,
    }
}

/// Mean loss over the first `n` examples.
fn eval_loss(ds: &Dataset, params: &Params, n: usize) -> Result<f64> {
    use crate::objective::Objective;
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..ds.len().min(n.max(1)) {
        let l = ds.loss(params, None, i)?;
        sum += l.loss_sum;
        count += l.tokens;
    }
    Ok(if count == 0 { 0.0 } else { sum / count as f64 })
}
