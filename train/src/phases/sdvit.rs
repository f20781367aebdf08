//! Phase 2: SDViT (self-distilled visual instruction tuning). The projector and the whole
//! drafter LM are fine-tuned on the target's own responses (from `distill`), with the
//! prompt built as the runtime builds it in massv mode: the target's token sequence with
//! projector rows at the image placeholders, 1-D positions. CE on the response tokens.

use massv::{Error, Result};

use super::{check_projector_fits, load_drafter_lm, DrafterRun, PhaseData, PhaseReport};
use crate::data::{line_err, read_prompts, TargetVision};
use crate::hf;
use crate::vision::PROJECTOR_PREFIX;

/// Which parts train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdvitParts {
    pub projector: bool,
    pub lm: bool,
}

impl Default for SdvitParts {
    fn default() -> Self {
        SdvitParts {
            projector: true,
            lm: true,
        }
    }
}

pub fn sdvit(run: &DrafterRun, parts: SdvitParts) -> Result<PhaseReport> {
    if !parts.projector && !parts.lm {
        return Err(Error::InvalidArgument(
            "nothing to train: both projector and LM frozen".into(),
        ));
    }
    let target = TargetVision::load(&run.target, run.feature_cache.as_deref())?;
    let (lm_cfg, mut params) = load_drafter_lm(&target, &run.draft)?;
    let Some((pcfg, pparams)) = hf::load_projector(&run.draft)? else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a MASSV drafter (no massv.json): run `massv-train projector` first",
            run.draft.display()
        )));
    };
    check_projector_fits(&pcfg, &target, &lm_cfg, &run.draft)?;
    params.update_from(pparams)?;

    let loaded = read_prompts(&run.data, run.strict, true)?;
    let mut examples = Vec::with_capacity(loaded.records.len());
    let progress = crate::progress::Progress::new("vision features", loaded.records.len() as u64);
    for rec in &loaded.records {
        let feats = match &rec.image {
            Some(p) => Some(target.features(p).map_err(|e| line_err(&run.data, rec.line, e))?),
            None => None,
        };
        let response = target.response_ids(rec)?;
        examples.push(
            target
                .example(&rec.prompt, feats, &response, false)
                .map_err(|e| line_err(&run.data, rec.line, e))?,
        );
        progress.tick(format!("{} examples", examples.len()));
    }
    progress.finish();
    let trainable = |n: &str| {
        if n.starts_with(PROJECTOR_PREFIX) {
            parts.projector
        } else {
            parts.lm
        }
    };
    let data = PhaseData {
        examples,
        missing_images: loaded.missing_images,
        lm_cfg: &lm_cfg,
        pcfg: &pcfg,
        target: &target,
    };
    run.train_and_save(data, &mut params, &trainable, "sdvit", true)
}
