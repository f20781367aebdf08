//! `massv-train`: projector pretraining, self-distilled data, SDViT and the TVD diagnostic
//! for MASSV drafters.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use massv::spec::draft::DraftMode;
use massv_train::optim::AdamWConfig;
use massv_train::phases::distill::{distill_data, DistillRun};
use massv_train::phases::projector::{pretrain_projector, ProjectorRun, DEFAULT_INSTRUCTION};
use massv_train::phases::sdvit::{sdvit, SdvitParts};
use massv_train::phases::tvd::{tvd_report, with_ext, TvdRun};
use massv_train::phases::world::{make_demo_models, WorldRun, WorldScale};
use massv_train::phases::{DrafterRun, PhaseReport};
use massv_train::trainer::TrainOptions;

#[derive(Parser)]
#[command(
    name = "massv-train",
    version,
    about = "Train MASSV drafters (arXiv 2505.10526) on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Phase 1: pretrain the projector on {"image", "caption"} lines (drafter LM frozen).
    Projector(ProjectorArgs),
    /// Make the target answer {"image", "prompt"} lines (resumable JSONL output).
    DistillData(DistillArgs),
    /// Phase 2: fine-tune projector + drafter LM on the target's responses.
    Sdvit(SdvitArgs),
    /// Total variation distance between target and drafter next-token distributions.
    Tvd(TvdArgs),
    /// Build the demo's models in the shapes world from nothing (target, text drafter,
    /// MASSV drafters after phase 1 and after SDViT).
    DemoModels(DemoModelsArgs),
}

#[derive(Args)]
struct DemoModelsArgs {
    /// Output folder of the four model directories.
    #[arg(long, default_value = "assets")]
    out: PathBuf,
    /// Scratch folder (images, JSONL, training logs).
    #[arg(long, default_value = "target/demo-work")]
    work: PathBuf,
    /// tokenizer_config.json to take the Qwen2.5-VL chat template from.
    #[arg(long, default_value = "tests/fixtures/tokenizer/tokenizer_config.json")]
    chat_template_from: PathBuf,
    /// `mini` for a quick smoke run.
    #[arg(long, default_value = "full")]
    scale: String,
    /// Multiply every training phase's step count.
    #[arg(long, default_value_t = 1.0)]
    steps_multiplier: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Clone)]
struct Common {
    /// Qwen2.5-VL target directory.
    #[arg(long)]
    target: PathBuf,
    /// Drafter directory (Qwen2 LM; with massv.json + projector.safetensors for MASSV).
    #[arg(long)]
    draft: PathBuf,
    /// JSONL data file (image paths relative to its folder).
    #[arg(long)]
    data: PathBuf,
    /// Output drafter directory (also holds train_log.json and checkpoints/).
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// AdamW decoupled weight decay (matrices only).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Seed of the data order and of a new projector's weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fail on a missing image file instead of skipping the line.
    #[arg(long)]
    strict: bool,
    /// Folder to cache the target's vision features in (memory only without it).
    #[arg(long)]
    feature_cache: Option<PathBuf>,
    /// Continue from OUT/checkpoints when a checkpoint is there.
    #[arg(long)]
    resume: bool,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: usize,
    /// Examples the before/after loss is reported on.
    #[arg(long, default_value_t = 64)]
    eval_examples: usize,
}

impl Common {
    fn run(&self) -> DrafterRun {
        DrafterRun {
            target: self.target.clone(),
            draft: self.draft.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            train: TrainOptions {
                steps: self.steps,
                batch: self.batch,
                accum: self.accum,
                lr: self.lr,
                warmup_steps: self.warmup,
                min_lr_ratio: self.min_lr_ratio,
                adamw: AdamWConfig {
                    weight_decay: self.weight_decay,
                    ..Default::default()
                },
                clip_norm: (self.clip > 0.0).then_some(self.clip),
                seed: self.seed,
                shuffle: true,
            },
            strict: self.strict,
            feature_cache: self.feature_cache.clone(),
            resume: self.resume,
            checkpoint_every: self.checkpoint_every,
            eval_examples: self.eval_examples,
            stop_after: None,
        }
    }
}

#[derive(Args)]
struct ProjectorArgs {
    #[command(flatten)]
    common: Common,
    /// Hidden width of a new projector (default: vision hidden × merge², like the merger).
    #[arg(long)]
    projector_hidden: Option<usize>,
    /// The user's text after the image.
    #[arg(long, default_value = DEFAULT_INSTRUCTION)]
    instruction: String,
}

#[derive(Args)]
struct SdvitArgs {
    #[command(flatten)]
    common: Common,
    /// Keep the projector fixed (train the LM only).
    #[arg(long)]
    freeze_projector: bool,
    /// Keep the drafter LM fixed (train the projector only).
    #[arg(long)]
    freeze_lm: bool,
}

#[derive(Args)]
struct DistillArgs {
    /// Qwen2.5-VL (or Qwen2) target directory.
    #[arg(long)]
    target: PathBuf,
    /// JSONL of {"image" (optional), "prompt"}.
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL (appended to; lines already there are skipped).
    #[arg(long)]
    out: PathBuf,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k sampling (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Answers per prompt (distinct seeds).
    #[arg(long, default_value_t = 1)]
    samples_per_prompt: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fail on a missing image file instead of skipping the line.
    #[arg(long)]
    strict: bool,
}

#[derive(Args)]
struct TvdArgs {
    /// Target directory.
    #[arg(long)]
    target: PathBuf,
    /// Drafter directory.
    #[arg(long)]
    draft: PathBuf,
    /// JSONL of {"image", "prompt", "response"} (held-out distilled data).
    #[arg(long)]
    data: PathBuf,
    /// Drafter input mode (default: massv for a MASSV drafter, else text).
    #[arg(long, value_enum)]
    mode: Option<DraftMode>,
    /// Writes PREFIX.json and PREFIX.png.
    #[arg(long)]
    out: PathBuf,
    /// Histogram bins over [0, 1].
    #[arg(long, default_value_t = 20)]
    bins: usize,
    /// Fail on a missing image file instead of skipping the line.
    #[arg(long)]
    strict: bool,
}

fn print_phase(name: &str, r: &PhaseReport) {
    let st = &r.train.state;
    eprintln!(
        "{name}: {} examples ({} skipped: missing image), {} steps{}",
        r.examples,
        r.missing_images,
        st.step,
        r.train
            .resumed_from
            .map_or(String::new(), |s| format!(" (resumed from step {s})"))
    );
    println!(
        "mean loss per response token: {:.4} before, {:.4} after",
        r.mean_loss_before, r.mean_loss_after
    );
    println!(
        "wrote {} (loss curve: {})",
        r.out.display(),
        r.out.join("train_log.json").display()
    );
}

fn run(cli: Cli) -> massv::Result<()> {
    match cli.cmd {
        Cmd::Projector(a) => {
            let mut run = ProjectorRun::new(a.common.run());
            run.projector_hidden = a.projector_hidden;
            run.instruction = a.instruction;
            print_phase("projector", &pretrain_projector(&run)?);
        }
        Cmd::Sdvit(a) => {
            let parts = SdvitParts {
                projector: !a.freeze_projector,
                lm: !a.freeze_lm,
            };
            print_phase("sdvit", &sdvit(&a.common.run(), parts)?);
        }
        Cmd::DistillData(a) => {
            let run = DistillRun {
                target: a.target,
                data: a.data,
                out: a.out,
                temperature: a.temperature,
                top_p: a.top_p,
                top_k: a.top_k,
                samples_per_prompt: a.samples_per_prompt,
                max_new_tokens: a.max_new_tokens,
                seed: a.seed,
                strict: a.strict,
                stop_after: None,
            };
            let r = distill_data(&run)?;
            println!(
                "wrote {} new responses to {} ({} already there, {} lines skipped: missing image)",
                r.written,
                run.out.display(),
                r.already_done,
                r.missing_images
            );
            if r.truncated_bytes > 0 {
                eprintln!(
                    "note: removed a partial last line ({} bytes) before appending",
                    r.truncated_bytes
                );
            }
        }
        Cmd::Tvd(a) => {
            let mut run = TvdRun::new(&a.target, &a.draft, &a.data, &a.out);
            run.mode = a.mode;
            run.bins = a.bins;
            run.strict = a.strict;
            let r = tvd_report(&run)?;
            println!(
                "TVD ({} mode) over {} tokens of {} examples: mean {:.4}, median {:.4}",
                r.mode, r.tokens, r.examples, r.mean, r.median
            );
            println!(
                "wrote {} and {}",
                with_ext(&a.out, "json").display(),
                with_ext(&a.out, "png").display()
            );
        }
        Cmd::DemoModels(a) => {
            let scale = match a.scale.as_str() {
                "full" => WorldScale::full(),
                "mini" => WorldScale::mini(),
                other => {
                    return Err(massv::Error::InvalidArgument(format!(
                        "--scale {other:?}: use full or mini"
                    )))
                }
            };
            let run = WorldRun {
                out: a.out,
                work: a.work,
                chat_template_from: a.chat_template_from,
                scale: scale.scaled_steps(a.steps_multiplier),
                seed: a.seed,
            };
            let r = make_demo_models(&run)?;
            println!(
                "target accuracy on held-out colour/shape/count questions: {:.1}%",
                100.0 * r.target_accuracy
            );
            for (k, acc) in &r.accuracy_by_kind {
                println!("  {k}: {:.1}%", 100.0 * acc);
            }
            for (stage, s) in &r.seconds {
                println!("  {stage}: {s:.0} s");
            }
            println!("wrote {}", run.out.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
