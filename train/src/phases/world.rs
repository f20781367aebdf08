//! The demo's models, built from nothing in the shapes world (`massv::world`): a toy
//! Qwen2.5-VL target that really looks at images (LM + merger trained, vision tower frozen
//! at its random initialisation), a text-only Qwen2 drafter trained on the world's text
//! without images, and MASSV drafters made from it by phase 1 and phase 1 + SDViT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use massv::spec::draft::strip_vision;
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv::synth::{synth, SynthDtype, SynthOptions, MAX_SHARD_BYTES};
use massv::tokenizer::Tokenizer;
use massv::weights::write_atomic;
use massv::world::{self, QuestionKind, Scene, HELDOUT_SEED, TRAIN_SEED};
use massv::{Error, Result};
use serde_json::{json, Value};

use crate::data::TargetVision;
use crate::hf::{self, VlCheckpoint};
use crate::phases::distill::{distill_data, DistillRun};
use crate::phases::models::{text_example, train_text_lm, train_vl, VlParts};
use crate::phases::projector::{pretrain_projector, ProjectorRun};
use crate::phases::sdvit::{sdvit, SdvitParts};
use crate::phases::DrafterRun;
use crate::trainer::{RunControl, TrainOptions};

/// How much of everything: `full` builds the shipped assets, `mini` is the test's.
#[derive(Debug, Clone)]
pub struct WorldScale {
    pub train_scenes: usize,
    pub target_steps: usize,
    /// Examples per target step: the target's content lookup ("the colour of the token
    /// whose shape is X") is learned within ~1000 steps at 64 and not in 3600 at 16.
    pub target_batch: usize,
    pub drafter_steps: usize,
    pub projector_steps: usize,
    /// Prompts the target answers for SDViT, spread evenly over all training scenes.
    pub distill_prompts: usize,
    pub sdvit_steps: usize,
    /// Examples per SDViT step: the drafter learns the same lookup as the target.
    pub sdvit_batch: usize,
    pub eval_scenes: usize,
    pub target_hidden: usize,
    pub target_layers: usize,
}

impl WorldScale {
    pub fn full() -> Self {
        WorldScale {
            train_scenes: 2000,
            target_steps: 1200,
            target_batch: 64,
            drafter_steps: 500,
            projector_steps: 300,
            distill_prompts: 16_000,
            sdvit_steps: 2000,
            sdvit_batch: 64,
            eval_scenes: 60,
            target_hidden: 128,
            target_layers: 4,
        }
    }

    /// Every step count multiplied by `k` (longer or shorter training, same data).
    pub fn scaled_steps(mut self, k: f64) -> Self {
        for s in [
            &mut self.target_steps,
            &mut self.drafter_steps,
            &mut self.projector_steps,
            &mut self.sdvit_steps,
        ] {
            *s = ((*s as f64 * k).round() as usize).max(1);
        }
        self
    }

    pub fn mini() -> Self {
        WorldScale {
            train_scenes: 24,
            target_steps: 6,
            target_batch: 8,
            drafter_steps: 6,
            projector_steps: 4,
            distill_prompts: 12,
            sdvit_steps: 4,
            sdvit_batch: 8,
            eval_scenes: 4,
            target_hidden: 32,
            target_layers: 1,
        }
    }
}

pub struct WorldRun {
    /// Where the four model directories go (target, drafter-text, drafter-massv-p1, drafter-massv).
    pub out: PathBuf,
    /// Scratch: images, JSONL data, checkpoints.
    pub work: PathBuf,
    /// A tokenizer_config.json whose `chat_template` (Qwen2.5-VL's) the world tokenizer uses.
    pub chat_template_from: PathBuf,
    pub scale: WorldScale,
    pub seed: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorldReport {
    pub target_accuracy: f64,
    pub accuracy_by_kind: Vec<(String, f64)>,
    pub seconds: Vec<(String, f64)>,
}

/// Exact-match accuracy of the target's greedy answers on held-out colour / shape / count
/// questions (the demo's visually grounded questions).
pub fn target_accuracy(target: &Path, scenes: &[Scene]) -> Result<(f64, Vec<(String, f64)>)> {
    let engine = Engine::load(target, None)?;
    let params = GenerateParams {
        max_new_tokens: 16,
        ..Default::default()
    };
    let mut by_kind: std::collections::BTreeMap<QuestionKind, (usize, usize)> = Default::default();
    for s in scenes {
        let img = massv::image::ImageInput::from_rgb8(world::IMAGE_SIZE, world::IMAGE_SIZE, s.render())?;
        for qa in s.questions() {
            if !matches!(
                qa.kind,
                QuestionKind::Colour | QuestionKind::Shape | QuestionKind::Count
            ) {
                continue;
            }
            let out = engine.generate(&qa.question, Some(&img), &params, Hooks::default())?;
            let e = by_kind.entry(qa.kind).or_default();
            e.0 += (out.text.trim() == qa.answer) as usize;
            e.1 += 1;
        }
    }
    let (right, all) = by_kind.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let kinds = by_kind
        .iter()
        .map(|(k, (r, n))| (format!("{k:?}").to_lowercase(), *r as f64 / *n as f64))
        .collect();
    Ok((right as f64 / all.max(1) as f64, kinds))
}

pub fn make_demo_models(run: &WorldRun) -> Result<WorldReport> {
    let sc = &run.scale;
    let mut seconds = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str, seconds: &mut Vec<(String, f64)>| {
        seconds.push((name.to_string(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|e| Error::Io {
            path: p.to_path_buf(),
            source: e,
        })
    };
    let (work, out) = (&run.work, &run.out);
    mkdir(work)?;
    mkdir(out)?;

    // 1. Data: images and JSONL files.
    let scenes = world::scenes(TRAIN_SEED ^ run.seed, sc.train_scenes);
    let img_dir = work.join("images");
    mkdir(&img_dir)?;
    let (mut captions, mut qa, mut texts) = (String::new(), String::new(), world::corpus(&scenes));
    let mut all_prompts = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        let name = format!("images/{i:05}.png");
        save_png(&work.join(&name), &s.render())?;
        captions.push_str(&format!("{}\n", json!({"image": name, "caption": s.caption()})));
        for q in s.questions() {
            qa.push_str(&format!(
                "{}\n",
                json!({"image": name, "prompt": q.question, "response": q.answer})
            ));
            all_prompts.push(json!({"image": name, "prompt": q.question}).to_string());
        }
    }
    let stride = all_prompts.len().div_ceil(sc.distill_prompts.max(1)).max(1);
    let prompts: String = all_prompts.iter().step_by(stride).map(|p| format!("{p}\n")).collect();
    for (file, text) in [
        ("captions.jsonl", &captions),
        ("qa.jsonl", &qa),
        ("prompts.jsonl", &prompts),
    ] {
        write_atomic(&work.join(file), text.as_bytes())?;
    }
    lap("data", &mut seconds);

    // 2. Tokenizer: byte-level BPE on the world's text and the chat template's words.
    let template = chat_template(&run.chat_template_from)?;
    texts.extend([
        "system".into(),
        "user".into(),
        "assistant".into(),
        "You are a helpful assistant.".into(),
    ]);
    let tok_dir = work.join("tokenizer");
    world::train_tokenizer(&texts, 400, &template, &tok_dir)?;
    let tok = Tokenizer::from_dir(&tok_dir)?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::InvalidArgument(format!("tokenizer lacks {t}")))
    };
    let vocab = tok.vocab_size().div_ceil(16) * 16;

    let eot = id("<|im_end|>")?;
    // 3. Text-only drafter: the world's text without images (text-mode prompts + answers).
    let drafter_text = out.join("drafter-text");
    let vt = massv::spec::draft::VisionTokens {
        vision_start: id("<|vision_start|>")?,
        vision_end: id("<|vision_end|>")?,
        image_pad: id("<|image_pad|>")?,
    };
    let mut text_examples = Vec::new();
    for s in &scenes {
        for q in s.questions() {
            let prompt = strip_vision(&tok.encode(&tok.user_prompt(&q.question, true)?)?, &vt);
            let mut ids = prompt.clone();
            ids.extend(tok.encode(&q.answer)?);
            ids.push(eot);
            let mask = (0..ids.len()).map(|i| i >= prompt.len()).collect();
            text_examples.push(text_example(ids, Some(mask)));
        }
    }
    let dcfg = massv::config::TextConfig {
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        // Untied: with a tied table, the output softmax over answers the text alone cannot
        // know (which shape is in the image) pulls those words' rows together until the
        // drafter can no longer tell them apart as inputs, and copying them fails.
        tie_word_embeddings: false,
        max_position_embeddings: 4096,
        sliding_window: None,
        max_window_layers: 2,
        bos_token_id: None,
        eos_token_ids: vec![eot],
        mrope_section: None,
    };
    let mut dparams = hf::init_qwen2(&dcfg, run.seed + 1, 0.02)?;
    let dopts = TrainOptions {
        steps: sc.drafter_steps,
        batch: 16,
        lr: 3e-3,
        warmup_steps: 20,
        seed: run.seed,
        ..Default::default()
    };
    train_text_lm(
        &mut dparams,
        &dcfg,
        text_examples,
        &dopts,
        &control("drafter", work, "text drafter"),
    )?;
    let _ = std::fs::remove_dir_all(&drafter_text);
    hf::save_qwen2(&drafter_text, &dcfg, None, &dparams)?;
    write_model_files(&drafter_text, &tok_dir, &id)?;
    lap("drafter-text", &mut seconds);

    // 4. Target: a random Qwen2.5-VL; LM + merger trained on captions and QA.
    let target = out.join("target");
    let cfg = target_config(sc, vocab, &id)?;
    let cfg_path = work.join("target_config.json");
    write_atomic(
        &cfg_path,
        serde_json::to_string_pretty(&cfg).unwrap_or_default().as_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&target);
    let opts = SynthOptions {
        dtype: SynthDtype::F32,
        seed: run.seed,
        layers: None,
        max_shard_bytes: MAX_SHARD_BYTES,
    };
    synth(&cfg_path, &target, &opts)?;
    write_model_files(&target, &tok_dir, &id)?;
    write_atomic(
        &target.join("preprocessor_config.json"),
        json!({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
               "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
               "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"})
        .to_string()
        .as_bytes(),
    )?;
    let tv = TargetVision::load(&target, None)?;
    let mut examples = Vec::new();
    for (i, s) in scenes.iter().enumerate() {
        let feats = tv.features(&work.join(format!("images/{i:05}.png")))?;
        for q in s.questions() {
            let mut resp = tok.encode(&q.answer)?;
            resp.push(eot);
            examples.push(tv.example(&q.question, Some(Arc::clone(&feats)), &resp, true)?);
        }
    }
    let mut ck = VlCheckpoint::load(&target)?;
    let topts = TrainOptions {
        steps: sc.target_steps,
        batch: sc.target_batch,
        lr: 1e-3,
        warmup_steps: 30,
        seed: run.seed,
        ..Default::default()
    };
    train_vl(
        &mut ck,
        examples,
        VlParts { lm: true, merger: true },
        &topts,
        &control("target", work, "target"),
    )?;
    ck.save(&target)?;
    write_model_files(&target, &tok_dir, &id)?;
    drop(tv);
    lap("target", &mut seconds);

    // 5. Phase 1: the projector on captions, drafter frozen.
    let p1 = out.join("drafter-massv-p1");
    let _ = std::fs::remove_dir_all(&p1);
    let mut r = DrafterRun::new(&target, &drafter_text, &work.join("captions.jsonl"), &p1);
    r.train = TrainOptions {
        steps: sc.projector_steps,
        batch: 16,
        lr: 3e-3,
        warmup_steps: 20,
        seed: run.seed,
        ..Default::default()
    };
    pretrain_projector(&ProjectorRun::new(r))?;
    cleanup_checkpoints(&p1);
    lap("phase1", &mut seconds);

    // 6. Self-distilled data: the target answers the training prompts.
    let distilled = work.join("distill.jsonl");
    let _ = std::fs::remove_file(&distilled);
    let mut d = DistillRun::new(&target, &work.join("prompts.jsonl"), &distilled);
    d.max_new_tokens = 24;
    d.seed = run.seed;
    distill_data(&d)?;
    lap("distill", &mut seconds);

    // 7. Phase 2 (SDViT): projector + drafter LM on the target's own answers.
    let full = out.join("drafter-massv");
    let _ = std::fs::remove_dir_all(&full);
    let mut r = DrafterRun::new(&target, &p1, &distilled, &full);
    r.train = TrainOptions {
        steps: sc.sdvit_steps,
        batch: sc.sdvit_batch,
        lr: 1e-3,
        warmup_steps: 20,
        seed: run.seed,
        ..Default::default()
    };
    sdvit(&r, SdvitParts::default())?;
    cleanup_checkpoints(&full);
    lap("sdvit", &mut seconds);

    let held = world::scenes(HELDOUT_SEED ^ run.seed, sc.eval_scenes);
    let (acc, kinds) = target_accuracy(&target, &held)?;
    lap("eval", &mut seconds);
    Ok(WorldReport {
        target_accuracy: acc,
        accuracy_by_kind: kinds,
        seconds,
    })
}

fn control(dir: &str, work: &Path, label: &str) -> RunControl<'static> {
    RunControl {
        checkpoint_dir: None,
        checkpoint_every: 0,
        resume: false,
        stop_after: None,
        log_path: Some(work.join(format!("{dir}_log.json"))),
        decay: None,
        label: label.to_string(),
    }
}

/// Training checkpoints are scratch: the shipped directories hold only the model.
fn cleanup_checkpoints(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
}

fn save_png(path: &Path, rgb: &[u8]) -> Result<()> {
    image::save_buffer(
        path,
        rgb,
        world::IMAGE_SIZE as u32,
        world::IMAGE_SIZE as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Image {
        source_name: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn chat_template(tokenizer_config: &Path) -> Result<String> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_config).map_err(|e| Error::Io {
        path: tokenizer_config.into(),
        source: e,
    })?)
    .map_err(|e| Error::Config {
        path: tokenizer_config.into(),
        reason: e.to_string(),
    })?;
    v["chat_template"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Config {
            path: tokenizer_config.into(),
            reason: "no `chat_template` string".into(),
        })
}

/// The world target's config.json (hub layout): a small Qwen2.5-VL whose 112×112 images
/// are 8×8 patches = 16 merged tokens in 2×2-unit windows.
fn target_config(sc: &WorldScale, vocab: usize, id: &dyn Fn(&str) -> Result<u32>) -> Result<Value> {
    let h = sc.target_hidden;
    let heads = (h / 32).max(1);
    // mrope_section over head_dim / 2 rotary pairs: a quarter temporal, the rest split.
    let pairs = h / heads / 2;
    let t = pairs / 4;
    let hw = (pairs - t) / 2;
    Ok(json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "bos_token_id": id("<|endoftext|>")?,
        "eos_token_id": id("<|im_end|>")?,
        "vision_start_token_id": id("<|vision_start|>")?,
        "vision_end_token_id": id("<|vision_end|>")?,
        "vision_token_id": id("<|vision_pad|>")?,
        "image_token_id": id("<|image_pad|>")?,
        "video_token_id": id("<|video_pad|>")?,
        "hidden_act": "silu",
        "hidden_size": h,
        "intermediate_size": 3 * h,
        "max_position_embeddings": 4096,
        "num_attention_heads": heads,
        "num_hidden_layers": sc.target_layers,
        "num_key_value_heads": (heads / 2).max(1),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "vocab_size": vocab,
        "vision_config": {
            "depth": 2, "hidden_act": "silu", "hidden_size": 128, "intermediate_size": 256, "num_heads": 4,
            "in_chans": 3, "out_hidden_size": h, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1],
            "tokens_per_second": 2, "temporal_patch_size": 2
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [t, hw, pairs - t - hw]}
    }))
}

/// Tokenizer files and generation_config.json of every world model.
fn write_model_files(dir: &Path, tok_dir: &Path, id: &dyn Fn(&str) -> Result<u32>) -> Result<()> {
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok_dir.join(f), dir.join(f)).map_err(|e| Error::Io {
            path: dir.join(f),
            source: e,
        })?;
    }
    let gen = json!({"bos_token_id": id("<|endoftext|>")?, "pad_token_id": id("<|endoftext|>")?,
                     "eos_token_id": [id("<|im_end|>")?, id("<|endoftext|>")?]});
    write_atomic(&dir.join("generation_config.json"), gen.to_string().as_bytes())
}
