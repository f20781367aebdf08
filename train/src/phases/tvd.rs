//! TVD diagnostic: per-token total variation distance ½ Σ |p − q| between the target's
//! and the drafter's next-token distributions (softmax at T = 1; q is 0 past the
//! drafter's vocabulary, p past the target's), teacher-forced on the target's responses,
//! both models run through the runtime exactly as speculative decoding runs them.

use std::path::{Path, PathBuf};

use serde::Serialize;

use massv::image::{preprocess, ImageInput, PreprocessorConfig};
use massv::model::cuda_qwen2::Input;
use massv::model::qwen2::{Logits, Positions};
use massv::model::Target;
use massv::spec::draft::{DraftMode, Drafter, VisionTokens};
use massv::tokenizer::Tokenizer;
use massv::{Error, Result};

use crate::data::{line_err, read_prompts, PromptRecord};
use crate::ops::softmax;
use crate::plot::histogram_png;
use crate::progress::Progress;

#[derive(Debug, Clone)]
pub struct TvdRun {
    pub target: PathBuf,
    pub draft: PathBuf,
    pub data: PathBuf,
    /// None: massv for a MASSV drafter, text otherwise.
    pub mode: Option<DraftMode>,
    /// Writes PREFIX.json and PREFIX.png.
    pub out_prefix: PathBuf,
    pub bins: usize,
    pub strict: bool,
}

impl TvdRun {
    pub fn new(target: &Path, draft: &Path, data: &Path, out_prefix: &Path) -> Self {
        TvdRun {
            target: target.to_path_buf(),
            draft: draft.to_path_buf(),
            data: data.to_path_buf(),
            mode: None,
            out_prefix: out_prefix.to_path_buf(),
            bins: 20,
            strict: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TvdReport {
    pub mode: String,
    pub examples: usize,
    pub missing_images: usize,
    pub tokens: usize,
    pub mean: f64,
    pub median: f64,
    pub bins: Vec<Bin>,
    /// The PNG's labels, for readers of the JSON alone.
    pub plot: PlotLabels,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlotLabels {
    pub title: String,
    pub x_axis: String,
    pub y_axis: String,
    pub red_line: String,
    pub blue_line: String,
}

pub use massv::metrics::tvd;

struct Models {
    target: Target,
    tok: Tokenizer,
    pre: Option<PreprocessorConfig>,
    drafter: Drafter,
    mode: DraftMode,
    vt: VisionTokens,
    eot: u32,
}

fn record_tvd(m: &Models, rec: &PromptRecord) -> Result<Vec<f64>> {
    let images = match (&rec.image, &m.pre) {
        (Some(p), Some(cfg)) => vec![preprocess(&ImageInput::from_path(p)?, cfg)?],
        (Some(_), None) => {
            return Err(Error::InvalidArgument(
                "an image was given but the target is text-only".into(),
            ))
        }
        (None, _) => Vec::new(),
    };
    let template = m.tok.encode(&m.tok.user_prompt(&rec.prompt, !images.is_empty())?)?;
    let response = match &rec.response_ids {
        Some(ids) => ids.clone(),
        None => {
            let mut ids = m.tok.encode(rec.response.as_deref().unwrap_or_default())?;
            ids.push(m.eot);
            ids
        }
    };
    if response.is_empty() {
        return Ok(Vec::new());
    }
    let vision = m.target.encode_images(&images)?;
    // Target: prefill predicts response[0]; decoding response[..k] predicts response[1..].
    let (last, mut session) = m
        .target
        .prefill(&template, &images, &vision, response.len() + 1, Logits::Last)?;
    let mut p_rows = vec![last];
    if response.len() > 1 {
        let all = m
            .target
            .decode(&response[..response.len() - 1], &mut session, Logits::All)?;
        let v = all.len() / (response.len() - 1);
        p_rows.extend(all.chunks_exact(v).map(<[f32]>::to_vec));
    }
    // Drafter: its prompt as the engine builds it, then the response, one pass.
    let d = m.drafter.lm.cfg.hidden_size;
    let mut hidden = m
        .drafter
        .prompt_embeddings(m.mode, &session.prompt, &template, &vision, &m.vt)?;
    let prompt_len = hidden.len() / d;
    hidden.extend(m.drafter.embed_lossy(&response[..response.len() - 1]));
    let n = hidden.len() / d;
    if n > m.drafter.lm.cfg.max_position_embeddings {
        return Err(Error::ContextOverflow {
            tokens: prompt_len,
            new: response.len(),
            capacity: m.drafter.lm.cfg.max_position_embeddings,
        });
    }
    let lm = m.drafter.lm.lm();
    let mut cache = lm.new_cache(n)?;
    let positions: Vec<i32> = (0..n as i32).collect();
    let q_all = lm.forward(
        Input::Embeddings(&hidden),
        Positions::Seq(&positions),
        &mut cache,
        Logits::All,
        None,
    )?;
    let vq = m.drafter.lm.cfg.vocab_size;
    let q_rows = &q_all[(prompt_len - 1) * vq..];
    Ok(p_rows
        .iter()
        .zip(q_rows.chunks_exact(vq))
        .map(|(p, q)| tvd(&softmax(p), &softmax(q)))
        .collect())
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}

pub fn tvd_report(args: &TvdRun) -> Result<TvdReport> {
    if args.bins == 0 {
        return Err(Error::InvalidArgument("bins must be at least 1".into()));
    }
    let tok = Tokenizer::from_dir(&args.target)?;
    let target = Target::load(&args.target)?;
    let drafter = Drafter::load(&args.draft)?;
    let mode = args.mode.unwrap_or(drafter.default_mode());
    drafter.check_compatible(&target, &tok, mode)?;
    let pre = match &target {
        Target::Vl(_) => Some(PreprocessorConfig::from_dir(&args.target)?),
        Target::Text(_) => None,
    };
    let eot = tok
        .eos_token_id()
        .or_else(|| tok.token_to_id("<|im_end|>"))
        .ok_or_else(|| Error::InvalidArgument("the target's tokenizer has no eos_token".into()))?;
    let vt = VisionTokens::of(&target, &tok);
    let models = Models {
        target,
        tok,
        pre,
        drafter,
        mode,
        vt,
        eot,
    };
    let loaded = read_prompts(&args.data, args.strict, true)?;
    let progress = Progress::new("tvd", loaded.records.len() as u64);
    let mut values = Vec::new();
    for rec in &loaded.records {
        values.extend(record_tvd(&models, rec).map_err(|e| line_err(&args.data, rec.line, e))?);
        progress.tick(format!("{} tokens", values.len()));
    }
    progress.finish();
    let mut sorted = values.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    };
    let med = median(&sorted);
    let mut counts = vec![0usize; args.bins];
    for &v in &values {
        let b = ((v * args.bins as f64) as usize).min(args.bins - 1);
        counts[b] += 1;
    }
    let bins = counts
        .iter()
        .enumerate()
        .map(|(i, &count)| Bin {
            lo: i as f64 / args.bins as f64,
            hi: (i + 1) as f64 / args.bins as f64,
            count,
        })
        .collect();
    let mode_name = match mode {
        DraftMode::Massv => "massv",
        DraftMode::Text => "text",
    };
    let title = format!(
        "TVD {} N={} MEAN={mean:.3} MEDIAN={med:.3}",
        mode_name.to_uppercase(),
        values.len()
    );
    let report = TvdReport {
        mode: mode_name.into(),
        examples: loaded.records.len(),
        missing_images: loaded.missing_images,
        tokens: values.len(),
        mean,
        median: med,
        bins,
        plot: PlotLabels {
            title: title.clone(),
            x_axis: "total variation distance per token (0 to 1)".into(),
            y_axis: "tokens".into(),
            red_line: "mean".into(),
            blue_line: "median".into(),
        },
        values,
    };
    let json_path = with_ext(&args.out_prefix, "json");
    if let Some(dir) = json_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    massv::weights::write_atomic(&json_path, text.as_bytes())?;
    histogram_png(&with_ext(&args.out_prefix, "png"), &counts, mean, med, &title)?;
    Ok(report)
}

/// PREFIX + "." + ext (PREFIX may itself contain dots).
pub fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}
