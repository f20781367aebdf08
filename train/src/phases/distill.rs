//! Self-distilled data: the target answers each prompt with the runtime's own generation
//! (target-only `Engine`), one JSONL line `{"image", "prompt", "response",
//! "response_ids", "sample"}` per answer. Resumable: answers already in the output are
//! skipped; each line is written whole with its newline and flushed, and a partial last
//! line left by a crash is cut off before appending.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use massv::image::ImageInput;
use massv::sampling::SamplingParams;
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv::{Error, Result};

use crate::data::{line_err, read_jsonl, read_prompts, relative_to};
use crate::progress::Progress;

#[derive(Debug, Clone)]
pub struct DistillRun {
    pub target: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub strict: bool,
    /// Stop after writing this many new lines (simulates an interruption; for tests).
    pub stop_after: Option<usize>,
}

impl DistillRun {
    pub fn new(target: &Path, data: &Path, out: &Path) -> Self {
        DistillRun {
            target: target.to_path_buf(),
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            samples_per_prompt: 1,
            max_new_tokens: 64,
            seed: 0,
            strict: false,
            stop_after: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DistillReport {
    pub written: usize,
    /// Answers already present in the output.
    pub already_done: usize,
    pub missing_images: usize,
    /// Bytes of a partial last line removed before appending.
    pub truncated_bytes: u64,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

type Key = (Option<String>, String, u64);

/// Keys of the complete lines of an existing output, after cutting a partial last line.
fn existing(out: &Path) -> Result<(HashSet<Key>, u64)> {
    let mut done = HashSet::new();
    if !out.is_file() {
        return Ok((done, 0));
    }
    let bytes = std::fs::read(out).map_err(|e| io(out, e))?;
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let cut = (bytes.len() - keep) as u64;
    if cut > 0 {
        let f = OpenOptions::new().write(true).open(out).map_err(|e| io(out, e))?;
        f.set_len(keep as u64).map_err(|e| io(out, e))?;
    }
    for (line, obj) in read_jsonl(out)? {
        let prompt = obj
            .get("prompt")
            .and_then(|v| v.as_str())
            .ok_or_else(|| line_err(out, line, "existing output line has no `prompt`"))?;
        let image = obj.get("image").and_then(|v| v.as_str()).map(str::to_string);
        let sample = obj.get("sample").and_then(|v| v.as_u64()).unwrap_or(0);
        done.insert((image, prompt.to_string(), sample));
    }
    Ok((done, cut))
}

pub fn distill_data(args: &DistillRun) -> Result<DistillReport> {
    if args.samples_per_prompt == 0 {
        return Err(Error::InvalidArgument("samples-per-prompt must be at least 1".into()));
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampling.validate()?;
    let loaded = read_prompts(&args.data, args.strict, false)?;
    let engine = Engine::load(&args.target, None)?;
    let out_dir = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir, e))?;
    let (done, truncated) = existing(&args.out)?;
    let mut report = DistillReport {
        missing_images: loaded.missing_images,
        truncated_bytes: truncated,
        ..Default::default()
    };
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .map_err(|e| io(&args.out, e))?;
    let total = (loaded.records.len() * args.samples_per_prompt) as u64;
    let progress = Progress::new("distill-data", total);
    for rec in &loaded.records {
        let image_str = rec.image.as_ref().map(|p| relative_to(p, out_dir));
        let mut image: Option<ImageInput> = None;
        for s in 0..args.samples_per_prompt as u64 {
            let key = (image_str.clone(), rec.prompt.clone(), s);
            if done.contains(&key) {
                report.already_done += 1;
                progress.tick(format!("{} done", report.already_done));
                continue;
            }
            if args.stop_after.is_some_and(|n| report.written >= n) {
                progress.finish();
                return Ok(report);
            }
            if image.is_none() {
                if let Some(p) = &rec.image {
                    image = Some(ImageInput::from_path(p).map_err(|e| line_err(&args.data, rec.line, e))?);
                }
            }
            let params = GenerateParams {
                gamma: 1,
                tree: None,
                sampling,
                // Distinct, reproducible streams per (line, sample).
                seed: args
                    .seed
                    .wrapping_add((rec.line as u64).wrapping_mul(0x9E37_79B9))
                    .wrapping_add(s.wrapping_mul(0x85EB_CA6B)),
                max_new_tokens: args.max_new_tokens,
                draft_mode: None,
            };
            let out = engine
                .generate(&rec.prompt, image.as_ref(), &params, Hooks::default())
                .map_err(|e| line_err(&args.data, rec.line, e))?;
            let line = json!({
                "image": image_str,
                "prompt": rec.prompt,
                "response": out.text,
                "response_ids": out.tokens,
                "sample": s,
            });
            let mut text = serde_json::to_string(&line).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            text.push('\n');
            file.write_all(text.as_bytes()).map_err(|e| io(&args.out, e))?;
            file.flush().map_err(|e| io(&args.out, e))?;
            report.written += 1;
            progress.tick(format!("{} written", report.written));
        }
    }
    progress.finish();
    Ok(report)
}
