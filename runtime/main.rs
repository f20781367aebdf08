//! The `massv` command line. Every failure prints one `error: …` line and exits non-zero.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use massv::backend::DeviceRequest;
use massv::bench;
use massv::image::{preprocess, ImageInput, Preprocessed, PreprocessorConfig};
use massv::metrics::Trace;
use massv::model::qwen2::Logits;
use massv::model::Target;
use massv::sampling::SamplingParams;
use massv::spec::draft::DraftMode;
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv::spec::tree::TreeSpec;
use massv::synth::{synth, SynthDtype, SynthOptions};
use massv::tokenizer::Tokenizer;
use massv::weights::{write_safetensors, OwnedTensor};
use massv::{Error, Result};

#[derive(Parser)]
#[command(
    name = "massv",
    version,
    about = "Speculative decoding for vision-language models with a multimodal drafter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the model once over the chat-templated prompt and write input_ids and logits.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Image shown before the prompt text (PNG, JPEG or WebP).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        out: PathBuf,
        /// Where the LM runs (a vision tower beside it where the kernels serve it, else on
        /// the CPU).
        #[arg(long, value_enum, default_value = "cpu")]
        device: DeviceRequest,
    },
    /// Answer a prompt: speculative decoding with --draft, else the target alone.
    Generate {
        #[arg(long)]
        target: PathBuf,
        /// Drafter directory (Qwen2 LM; with massv.json + projector.safetensors for MASSV).
        #[arg(long)]
        draft: Option<PathBuf>,
        /// What the drafter sees: massv (image via the projector) or text (no image).
        #[arg(long, value_enum)]
        draft_mode: Option<DraftMode>,
        /// Image shown before the prompt text (PNG, JPEG or WebP).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 5)]
        gamma: usize,
        /// Draft token trees instead of chains: static:<paths> (e.g. 0;1;0.0;0.1;0.0.0),
        /// static:<w1>x<w2>x… (children per node at each depth) or dynamic:<nodes>,<depth>[,<width>].
        #[arg(long)]
        tree: Option<TreeSpec>,
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Where the target's LM runs: auto is CUDA when a GPU serves the target, else the
        /// CPU (its vision tower, the MASSV projector and the drafter's LM beside it where
        /// the kernels serve them, else on the CPU).
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceRequest,
        /// Print one JSON object (text, tokens, metrics) instead of the answer.
        #[arg(long)]
        json: bool,
        /// Write a Chrome trace (chrome://tracing, Perfetto) with one span per stage per step.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// Compare target-only, text-drafter and MASSV-drafter decoding on the same inputs.
    Bench {
        #[arg(long)]
        target: PathBuf,
        /// A text-only drafter (the baseline drafter).
        #[arg(long)]
        text_draft: Option<PathBuf>,
        /// A MASSV drafter (massv.json + projector).
        #[arg(long)]
        massv_draft: Option<PathBuf>,
        /// Images (repeatable); every prompt is asked about every image.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Prompts (repeatable).
        #[arg(long, default_value = "Describe the image.")]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 5)]
        gamma: usize,
        /// Also run every drafter with token trees of this shape (repeatable; syntax as
        /// for `generate --tree`).
        #[arg(long)]
        tree: Vec<TreeSpec>,
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Also time one decode step of this LM against its memory-bandwidth floor
        /// (e.g. a `massv synth` of Qwen2.5-0.5B).
        #[arg(long)]
        floor_model: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        floor_steps: usize,
        /// Where the target's LM runs, as for `generate` (and the floor model's).
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceRequest,
        /// Write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The shapes-world demo: target-only vs text-only vs MASSV drafters (the paper's table).
    Demo {
        /// Folder of the demo models (target/, drafter-text/, drafter-massv-p1/, drafter-massv/).
        #[arg(long)]
        assets: Option<PathBuf>,
        /// Held-out scenes to ask about.
        #[arg(long, default_value_t = 12)]
        scenes: usize,
        #[arg(long, default_value_t = 5)]
        gamma: usize,
        /// The token-tree shape of the last row (syntax as for `generate --tree`).
        #[arg(long, default_value = massv::demo::DEFAULT_TREE)]
        tree: TreeSpec,
        /// Where demo.json and demo.png go.
        #[arg(long, default_value = "target/demo")]
        out: PathBuf,
        /// Where the target's LM runs, as for `generate`.
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceRequest,
    },
    /// Write a random-weight checkpoint with the real tensor names and shapes of a config.
    Synth {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: SynthDtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep only this many LM layers and vision blocks (a shallow variant).
        #[arg(long)]
        layers: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap explains over several lines and adds usage; keep the message, one line.
            let rendered = e.render().to_string();
            let msg: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", msg.join(" "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s.replace('\n', " ")
}

/// The chat-templated prompt (one user turn: the image, then the text) and its image.
fn prompt_inputs(
    dir: &std::path::Path,
    target: &Target,
    tok: &Tokenizer,
    text: &str,
    image: Option<&PathBuf>,
) -> Result<(Vec<u32>, Vec<Preprocessed>)> {
    let images = match image {
        Some(_) if matches!(target, Target::Text(_)) => {
            return Err(Error::InvalidArgument(format!(
                "{} is a text-only model; --image needs a vision-language target",
                dir.display()
            )))
        }
        Some(path) => {
            let cfg = PreprocessorConfig::from_dir(dir)?;
            vec![preprocess(&ImageInput::from_path(path)?, &cfg)?]
        }
        None => Vec::new(),
    };
    let ids = tok.encode(&tok.user_prompt(text, image.is_some())?)?;
    Ok((ids, images))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Logits {
            model,
            image,
            prompt,
            out,
            device,
        } => {
            let tok = Tokenizer::from_dir(&model)?;
            let target = Target::load_for(&model, device)?;
            let (ids, images) = prompt_inputs(&model, &target, &tok, &prompt, image.as_ref())?;
            let (logits, session) = target.prefill(&ids, &images, &target.encode_images(&images)?, 0, Logits::All)?;
            let ids = session.prompt;
            let v = target.text_config().vocab_size;
            write_safetensors(
                &out,
                &[
                    (
                        "input_ids",
                        OwnedTensor::i64(vec![ids.len()], ids.iter().map(|&t| t as i64).collect()),
                    ),
                    ("logits", OwnedTensor::f32(vec![ids.len(), v], logits)),
                ],
            )
        }
        Command::Generate {
            target,
            draft,
            draft_mode,
            image,
            prompt,
            gamma,
            tree,
            temperature,
            top_p,
            top_k,
            seed,
            max_new_tokens,
            device,
            json,
            trace,
        } => {
            let engine = Engine::load_for(&target, draft.as_deref(), device)?;
            let image = image.as_deref().map(ImageInput::from_path).transpose()?;
            let params = GenerateParams {
                gamma,
                tree,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                },
                seed,
                max_new_tokens,
                draft_mode,
            };
            let mut spans = Trace::default();
            let hooks = Hooks {
                trace: Some(&mut spans),
                on_token: None,
            };
            let out = engine.generate(&prompt, image.as_ref(), &params, hooks)?;
            if let Some(path) = trace {
                spans.write(&path)?;
            }
            if json {
                let placement = serde_json::json!({
                    "target": engine.target.lm().placement(),
                    "drafter": engine.drafter.as_ref().map(|d| d.lm.lm().placement()),
                });
                let obj = serde_json::json!({
                    "text": out.text, "tokens": out.tokens, "metrics": out.metrics, "placement": placement,
                });
                println!("{obj}");
            } else {
                println!("{}", out.text);
            }
            Ok(())
        }
        Command::Bench {
            target,
            text_draft,
            massv_draft,
            image,
            prompt,
            gamma,
            tree,
            temperature,
            seed,
            max_new_tokens,
            floor_model,
            floor_steps,
            device,
            json,
        } => {
            let mut inputs = Vec::new();
            for p in &prompt {
                if image.is_empty() {
                    inputs.push(bench::Input {
                        prompt: p.clone(),
                        image: None,
                    });
                }
                for img in &image {
                    inputs.push(bench::Input {
                        prompt: p.clone(),
                        image: Some(ImageInput::from_path(img)?),
                    });
                }
            }
            let setup =
                |label: String, drafter: Option<PathBuf>, tree: Option<TreeSpec>| bench::Setup { label, drafter, tree };
            let mut setups = vec![setup("target-only".into(), None, None)];
            for (name, dir) in [("text-drafter", text_draft), ("massv-drafter", massv_draft)] {
                let Some(dir) = dir else { continue };
                setups.push(setup(name.into(), Some(dir.clone()), None));
                for (i, t) in tree.iter().enumerate() {
                    setups.push(setup(
                        format!("{name} tree#{}", i + 1),
                        Some(dir.clone()),
                        Some(t.clone()),
                    ));
                }
            }
            let params = GenerateParams {
                gamma,
                tree: None,
                sampling: SamplingParams {
                    temperature,
                    ..Default::default()
                },
                seed,
                max_new_tokens,
                draft_mode: None,
            };
            let device_req = device;
            let (rows, device) = bench::compare_on(&target, &setups, &inputs, &params, device)?;
            bench::print_table(&rows);
            for (i, t) in tree.iter().enumerate() {
                println!("tree#{} = {t}", i + 1);
            }
            let floor = floor_model
                .map(|m| bench::decode_floor(&m, floor_steps.max(1), device_req))
                .transpose()?;
            if let Some(f) = &floor {
                println!(
                    "decode step of {} on {}: {:.2} ms; floor {:.2} ms ({:.2} GB of weights at {:.1} GB/s copy) → {:.2}× the floor",
                    f.model,
                    f.device,
                    f.decode_step_ms,
                    f.floor_ms,
                    f.weight_bytes as f64 / 1e9,
                    f.copy_gb_per_s,
                    f.ratio_to_floor
                );
            }
            if let Some(path) = json {
                let doc = serde_json::json!({
                    "device": bench::device_name(device),
                    "target": target.display().to_string(),
                    "inputs": inputs.len(),
                    "gamma": gamma,
                    "trees": tree.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                    "temperature": temperature,
                    "max_new_tokens": max_new_tokens,
                    "rows": rows,
                    "floor": floor,
                });
                massv::weights::write_atomic(&path, serde_json::to_string_pretty(&doc).unwrap_or_default().as_bytes())?;
            }
            Ok(())
        }
        Command::Demo {
            assets,
            scenes,
            gamma,
            tree,
            out,
            device,
        } => {
            let assets = assets.unwrap_or_else(massv::demo::default_assets);
            let report = massv::demo::run_on(&assets, scenes, gamma, &tree, &out, device)?;
            massv::demo::print(&report, &out);
            Ok(())
        }
        Command::Synth {
            config,
            out,
            dtype,
            seed,
            layers,
        } => {
            let n = synth(
                &config,
                &out,
                &SynthOptions {
                    dtype,
                    seed,
                    layers,
                    max_shard_bytes: massv::synth::MAX_SHARD_BYTES,
                },
            )?;
            println!("wrote {n} tensors to {}", out.display());
            Ok(())
        }
    }
}
