//! `massv demo`: the paper's table in the shapes world. Loads the shipped models
//! (`assets/`: a toy Qwen2.5-VL target, a text-only drafter, MASSV drafters after phase 1
//! and after SDViT), asks visually grounded questions about held-out scenes, and reports
//! MAL and speedup at T = 0 and T = 1 (γ = 5), mean TVD per drafter, the target's accuracy,
//! and one example answer; writes the table as JSON and a bar chart PNG. A last row runs
//! the MASSV drafter with token trees instead of chains. The target's LM runs where
//! `--device` puts it ([`run_on`]); its vision tower and the drafters run beside it where
//! the kernels serve their shapes (they serve the shipped ones: head dims 32 and 16).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::backend::DeviceRequest;
use crate::error::{Error, Result};
use crate::image::{preprocess, ImageInput, Preprocessed};
use crate::model::cuda_qwen2::Input;
use crate::model::qwen2::{Logits, Positions};
use crate::sampling::SamplingParams;
use crate::spec::draft::Drafter;
use crate::spec::engine::{Engine, GenerateParams, Hooks};
use crate::spec::tree::TreeSpec;
use crate::world::{self, QuestionKind, Scene};

/// The drafters of the table, in order: (row label, directory under the assets folder).
pub const DRAFTERS: [(&str, &str); 3] = [
    ("text-only drafter", "drafter-text"),
    ("MASSV w/o SDViT", "drafter-massv-p1"),
    ("MASSV", "drafter-massv"),
];

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setup: String,
    pub mal_t0: f64,
    pub speedup_t0: f64,
    pub mal_t1: f64,
    pub speedup_t1: f64,
    /// Mean total variation distance to the target, teacher-forced on its answers.
    pub tvd: Option<f64>,
    /// Whether every T = 0 answer equalled the target-only answer.
    pub lossless_t0: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// The token-tree shape of the last row.
    pub tree: String,
    pub target_accuracy: f64,
    pub questions: usize,
    pub example: (String, String),
    pub gamma: usize,
    pub seconds: f64,
}

/// One held-out question: the image preprocessed once, the prompt and the expected answer.
struct Question {
    image: Preprocessed,
    kind: QuestionKind,
    prompt: String,
    answer: String,
}

fn questions(engine: &Engine, scenes: &[Scene]) -> Result<Vec<Question>> {
    let pre = crate::image::PreprocessorConfig::from_dir(&engine.target_dir)?;
    let mut out = Vec::new();
    for s in scenes {
        let img = ImageInput::from_rgb8(world::IMAGE_SIZE, world::IMAGE_SIZE, s.render())?;
        let image = preprocess(&img, &pre)?;
        for qa in s.questions() {
            if qa.kind == QuestionKind::Describe {
                continue;
            }
            out.push(Question {
                image: image.clone(),
                kind: qa.kind,
                prompt: qa.question,
                answer: qa.answer,
            });
        }
    }
    Ok(out)
}

/// (tokens emitted by passes, passes, decode-loop seconds, generated tokens) over all questions.
struct Totals {
    emitted: f64,
    passes: usize,
    loop_s: f64,
    tokens: usize,
    outputs: Vec<Vec<u32>>,
}

fn run_all(engine: &Engine, qs: &[Question], params: &GenerateParams) -> Result<Totals> {
    let mut t = Totals {
        emitted: 0.0,
        passes: 0,
        loop_s: 0.0,
        tokens: 0,
        outputs: Vec::new(),
    };
    for (i, q) in qs.iter().enumerate() {
        let ids = engine
            .tokenizer
            .encode(&engine.tokenizer.user_prompt(&q.prompt, true)?)?;
        let p = GenerateParams {
            seed: params.seed + i as u64,
            ..params.clone()
        };
        let out = engine.generate_ids(&ids, std::slice::from_ref(&q.image), &p, Hooks::default())?;
        let m = &out.metrics;
        t.emitted += m.mal * m.target_passes as f64;
        t.passes += m.target_passes;
        t.loop_s += (m.timings_ms.draft + m.timings_ms.verify + m.timings_ms.accept) / 1e3;
        t.tokens += out.tokens.len().saturating_sub(1);
        t.outputs.push(out.tokens);
    }
    Ok(t)
}

impl Totals {
    fn mal(&self) -> f64 {
        self.emitted / self.passes.max(1) as f64
    }
    fn ms_per_token(&self) -> f64 {
        self.loop_s * 1e3 / self.tokens.max(1) as f64
    }
}

/// Mean TVD between the target's and the drafter's next-token distributions (T = 1),
/// teacher-forced on the target's greedy answers.
fn mean_tvd(engine: &Engine, drafter: &Drafter, qs: &[Question], answers: &[Vec<u32>]) -> Result<f64> {
    let mode = drafter.default_mode();
    let (mut sum, mut n) = (0.0, 0usize);
    for (q, answer) in qs.iter().zip(answers) {
        let template = engine
            .tokenizer
            .encode(&engine.tokenizer.user_prompt(&q.prompt, true)?)?;
        let vision = engine.target.encode_images(std::slice::from_ref(&q.image))?;
        let (_, session) = engine.target.prefill(
            &template,
            std::slice::from_ref(&q.image),
            &vision,
            answer.len(),
            Logits::Last,
        )?;
        // Target: prompt (placeholders expanded) then the answer, logits at every position.
        let mut s2 = session;
        let p_rows = engine.target.decode(answer, &mut s2, Logits::All)?;
        let target_prompt = &s2.prompt;
        let mut hidden = drafter.prompt_embeddings(mode, target_prompt, &template, &vision, &engine.vision_tokens())?;
        let d = drafter.lm.cfg.hidden_size;
        let prompt_len = hidden.len() / d;
        hidden.extend(drafter.embed_lossy(answer));
        let positions: Vec<i32> = (0..(hidden.len() / d) as i32).collect();
        let mut cache = drafter.lm.lm().new_cache(positions.len())?;
        let q_rows = drafter.lm.lm().forward(
            Input::Embeddings(&hidden),
            Positions::Seq(&positions),
            &mut cache,
            Logits::All,
            None,
        )?;
        // The distributions that predict answer tokens 1.. (the prefill's last row predicted
        // token 0 for both; use rows aligned on the answer).
        let (vt, vd) = (engine.target.text_config().vocab_size, drafter.lm.cfg.vocab_size);
        let t1 = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        for i in 0..answer.len().saturating_sub(1) {
            let p = crate::sampling::probabilities(&p_rows[i * vt..(i + 1) * vt], &t1);
            let qd = crate::sampling::probabilities(&q_rows[(prompt_len + i) * vd..(prompt_len + i + 1) * vd], &t1);
            sum += crate::metrics::tvd(&p, &qd);
            n += 1;
        }
    }
    Ok(sum / n.max(1) as f64)
}

/// The tree of the demo's last row: EAGLE-2-style growth, 32 nodes, 8 deep.
pub const DEFAULT_TREE: &str = "dynamic:32,8,4";

/// Runs the demo on the CPU on `scenes` held-out scenes with the models in `assets`; the
/// last row drafts `tree`s with the MASSV drafter.
pub fn run(assets: &Path, scenes: usize, gamma: usize, tree: &TreeSpec, out_dir: &Path) -> Result<Report> {
    run_on(assets, scenes, gamma, tree, out_dir, DeviceRequest::Cpu)
}

/// [`run`] with the target's LM on the device `device` means for it (chosen once, when
/// the baseline loads, and kept for every drafter's engine).
pub fn run_on(
    assets: &Path,
    scenes: usize,
    gamma: usize,
    tree: &TreeSpec,
    out_dir: &Path,
    device: DeviceRequest,
) -> Result<Report> {
    let t0 = std::time::Instant::now();
    let target_dir = assets.join("target");
    if !target_dir.join("config.json").is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} has no demo models (run scripts/make-demo-models.sh)",
            assets.display()
        )));
    }
    let baseline = Engine::load_for(&target_dir, None, device)?;
    let device = baseline.target.device();
    let held = world::scenes(world::HELDOUT_SEED, scenes);
    let qs = questions(&baseline, &held)?;
    let greedy = GenerateParams {
        gamma,
        max_new_tokens: 24,
        ..Default::default()
    };
    let sampled = GenerateParams {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        ..greedy.clone()
    };
    let base0 = run_all(&baseline, &qs, &greedy)?;
    let base1 = run_all(&baseline, &qs, &sampled)?;

    let mut right = 0;
    let mut graded = 0;
    for (q, toks) in qs.iter().zip(&base0.outputs) {
        if matches!(q.kind, QuestionKind::Colour | QuestionKind::Shape | QuestionKind::Count) {
            let text = baseline.tokenizer.decode(toks, true)?;
            right += (text.trim() == q.answer) as usize;
            graded += 1;
        }
    }
    let example_answer = baseline.tokenizer.decode(&base0.outputs[0], true)?;
    let mut rows = vec![Row {
        setup: "target only".into(),
        mal_t0: 1.0,
        speedup_t0: 1.0,
        mal_t1: 1.0,
        speedup_t1: 1.0,
        tvd: None,
        lossless_t0: true,
    }];
    let tree_row = ("MASSV + token tree", "drafter-massv", Some(tree));
    for (label, dir, tree) in DRAFTERS.iter().map(|&(l, d)| (l, d, None)).chain([tree_row]) {
        let engine = Engine::load_on(&target_dir, Some(&assets.join(dir)), device)?;
        let with_tree = |p: &GenerateParams| GenerateParams {
            tree: tree.cloned(),
            ..p.clone()
        };
        let t0 = run_all(&engine, &qs, &with_tree(&greedy))?;
        let t1 = run_all(&engine, &qs, &with_tree(&sampled))?;
        let drafter = engine
            .drafter
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("no drafter".into()))?;
        rows.push(Row {
            setup: label.into(),
            mal_t0: t0.mal(),
            speedup_t0: base0.ms_per_token() / t0.ms_per_token(),
            mal_t1: t1.mal(),
            speedup_t1: base1.ms_per_token() / t1.ms_per_token(),
            tvd: Some(mean_tvd(&engine, drafter, &qs, &base0.outputs)?),
            lossless_t0: t0.outputs == base0.outputs,
        });
    }
    let report = Report {
        rows,
        tree: tree.to_string(),
        target_accuracy: right as f64 / graded.max(1) as f64,
        questions: qs.len(),
        example: (qs[0].prompt.clone(), example_answer),
        gamma,
        seconds: t0.elapsed().as_secs_f64(),
    };
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    crate::weights::write_atomic(&out_dir.join("demo.json"), json.as_bytes())?;
    let groups: Vec<(String, Vec<f64>)> = report.rows[1..]
        .iter()
        .map(|r| (short_label(&r.setup), vec![r.mal_t0, r.mal_t1]))
        .collect();
    crate::plot::bar_chart_png(
        &out_dir.join("demo.png"),
        "MAL BY DRAFTER (GAMMA=5)",
        &groups,
        &["T=0", "T=1"],
    )?;
    Ok(report)
}

fn short_label(setup: &str) -> String {
    match setup {
        "text-only drafter" => "TEXT-ONLY".into(),
        "MASSV w/o SDViT" => "MASSV W/O SDVIT".into(),
        "MASSV + token tree" => "MASSV TREE".into(),
        other => other.to_uppercase(),
    }
}

pub fn print(r: &Report, out_dir: &Path) {
    println!(
        "massv demo: shapes world, {} held-out questions, γ = {}",
        r.questions, r.gamma
    );
    println!();
    println!("| setup | MAL T=0 | speedup T=0 | MAL T=1 | speedup T=1 | mean TVD |");
    println!("|---|---|---|---|---|---|");
    for row in &r.rows {
        let tvd = row.tvd.map_or("–".to_string(), |t| format!("{t:.3}"));
        println!(
            "| {} | {:.2} | {:.2}× | {:.2} | {:.2}× | {} |",
            row.setup, row.mal_t0, row.speedup_t0, row.mal_t1, row.speedup_t1, tvd
        );
    }
    println!();
    println!(
        "target accuracy (colour / shape / count, exact match): {:.1}%",
        100.0 * r.target_accuracy
    );
    println!("example: Q: {}  A: {}", r.example.0, r.example.1);
    println!("token tree of the last row: {}", r.tree);
    println!(
        "all T=0 outputs equal target-only: {}",
        r.rows.iter().all(|x| x.lossless_t0)
    );
    println!(
        "wrote {} and {} ({:.1} s)",
        out_dir.join("demo.json").display(),
        out_dir.join("demo.png").display(),
        r.seconds
    );
}

/// Default assets folder: ./assets, else the one beside the crate (for `cargo run` elsewhere).
pub fn default_assets() -> PathBuf {
    let local = PathBuf::from("assets");
    if local.join("target").is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}
