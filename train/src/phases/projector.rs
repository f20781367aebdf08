//! Phase 1: projector pretraining. The target's vision features (once per image) go
//! through the projector into the frozen drafter LM, prompted as the runtime prompts it
//! (one user turn: the image, then an instruction); the loss is the CE of the caption
//! (plus the end of turn) as the assistant's answer. Only the projector trains.

use massv::model::projector::ProjectorConfig;
use massv::{Error, Result};

use super::{check_projector_fits, load_drafter_lm, DrafterRun, PhaseData, PhaseReport};
use crate::data::{read_captions, TargetVision};
use crate::hf;
use crate::vision::PROJECTOR_PREFIX;

pub const DEFAULT_INSTRUCTION: &str = "Describe the image.";

#[derive(Debug, Clone)]
pub struct ProjectorRun {
    pub run: DrafterRun,
    /// The user's text after the image.
    pub instruction: String,
    /// Hidden width of a freshly initialised projector (default: vision hidden × m², as
    /// the target's merger). Ignored when the drafter already has a projector.
    pub projector_hidden: Option<usize>,
}

impl ProjectorRun {
    pub fn new(run: DrafterRun) -> Self {
        ProjectorRun {
            run,
            instruction: DEFAULT_INSTRUCTION.into(),
            projector_hidden: None,
        }
    }
}

pub fn pretrain_projector(args: &ProjectorRun) -> Result<PhaseReport> {
    let r = &args.run;
    let target = TargetVision::load(&r.target, r.feature_cache.as_deref())?;
    let (lm_cfg, mut params) = load_drafter_lm(&target, &r.draft)?;
    let v = &target.model.cfg.vision;
    let (pcfg, pparams) = match hf::load_projector(&r.draft)? {
        Some((cfg, p)) => {
            check_projector_fits(&cfg, &target, &lm_cfg, &r.draft)?;
            if let Some(h) = args.projector_hidden.filter(|&h| h != cfg.projector_hidden_size) {
                return Err(Error::InvalidArgument(format!(
                    "--projector-hidden {h} differs from the projector in {} ({}); omit it to continue training that projector",
                    r.draft.display(),
                    cfg.projector_hidden_size
                )));
            }
            (cfg, p)
        }
        None => {
            let cfg = ProjectorConfig {
                vision_hidden_size: v.hidden_size,
                spatial_merge_size: v.spatial_merge_size,
                projector_hidden_size: args
                    .projector_hidden
                    .unwrap_or(v.hidden_size * v.spatial_merge_size * v.spatial_merge_size),
                draft_hidden_size: lm_cfg.hidden_size,
                norm_eps: 1e-6,
            };
            if cfg.projector_hidden_size == 0 {
                return Err(Error::InvalidArgument("--projector-hidden must be positive".into()));
            }
            let p = hf::init_projector(&cfg, r.train.seed ^ 0x5052_4f4a)?;
            (cfg, p)
        }
    };
    params.update_from(pparams)?;

    let loaded = read_captions(&r.data, r.strict)?;
    let eot = target.end_of_turn()?;
    let mut examples = Vec::with_capacity(loaded.records.len());
    let progress = crate::progress::Progress::new("vision features", loaded.records.len() as u64);
    for rec in &loaded.records {
        let feats = target
            .features(&rec.image)
            .map_err(|e| crate::data::line_err(&r.data, rec.line, e))?;
        let mut response = target.tokenizer.encode(&rec.caption)?;
        response.push(eot);
        examples.push(target.example(&args.instruction, Some(feats), &response, false)?);
        progress.tick(format!("{} examples", examples.len()));
    }
    progress.finish();
    let data = PhaseData {
        examples,
        missing_images: loaded.missing_images,
        lm_cfg: &lm_cfg,
        pcfg: &pcfg,
        target: &target,
    };
    r.train_and_save(
        data,
        &mut params,
        &|n: &str| n.starts_with(PROJECTOR_PREFIX),
        "projector",
        false,
    )
}
