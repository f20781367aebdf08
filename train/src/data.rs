//! Datasets: JSONL records (image paths relative to the JSONL file's folder), the target's
//! frozen vision features (computed once per image, cached in memory and optionally on
//! disk), and training sequences built exactly as the runtime builds prompts.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use massv::image::{preprocess, ImageInput, PreprocessorConfig};
use massv::model::qwen2_5_vl::{rope_index, Qwen25Vl};
use massv::model::Target;
use massv::spec::draft::VisionTokens;
use massv::tokenizer::Tokenizer;
use massv::{Error, Result};

use crate::objective::{Example, ImageFeatures, PositionIds};
use crate::params::Params;

/// An error about line `line` of `path`.
pub fn line_err(path: &Path, line: usize, reason: impl std::fmt::Display) -> Error {
    Error::Config {
        path: PathBuf::from(format!("{}:{line}", path.display())),
        reason: reason.to_string(),
    }
}

/// The JSON objects of a JSONL file with their 1-based line numbers (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push((i + 1, m)),
            Ok(_) => return Err(line_err(path, i + 1, "not a JSON object")),
            Err(e) => return Err(line_err(path, i + 1, format!("not valid JSON: {e}"))),
        }
    }
    Ok(out)
}

fn opt_string(path: &Path, line: usize, obj: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(line_err(path, line, format!("`{key}` must be a string"))),
    }
}

/// `image` resolved against the JSONL file's folder (absolute paths stay).
pub fn resolve_image(jsonl: &Path, image: &str) -> PathBuf {
    let p = Path::new(image);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        jsonl.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// `path` written relative to folder `base` when both resolve (else absolute).
pub fn relative_to(path: &Path, base: &Path) -> String {
    let (Ok(p), Ok(b)) = (path.canonicalize(), base.canonicalize()) else {
        return path.display().to_string();
    };
    let pc: Vec<Component> = p.components().collect();
    let bc: Vec<Component> = b.components().collect();
    let common = pc.iter().zip(&bc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return p.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..bc.len() {
        rel.push("..");
    }
    for c in &pc[common..] {
        rel.push(c.as_os_str());
    }
    rel.display().to_string()
}

/// One `{"image", "caption"}` record (projector pretraining).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionRecord {
    pub line: usize,
    pub image: PathBuf,
    pub caption: String,
}

/// One `{"image"?, "prompt", "response"?, "response_ids"?}` record.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    pub line: usize,
    /// The `image` field as written, and resolved.
    pub image_field: Option<String>,
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub response: Option<String>,
    /// The generated ids (distill-data writes them; they survive ids that do not detokenize).
    pub response_ids: Option<Vec<u32>>,
    pub sample: Option<u64>,
}

/// Records kept and the count skipped for missing image files.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub records: Vec<T>,
    pub missing_images: usize,
}

fn check_image(path: &Path, line: usize, image: &Path, strict: bool, missing: &mut usize) -> Result<bool> {
    if image.is_file() {
        return Ok(true);
    }
    if strict {
        return Err(line_err(
            path,
            line,
            format!("image file {} does not exist", image.display()),
        ));
    }
    *missing += 1;
    Ok(false)
}

/// Reads `{"image", "caption"}` lines. A missing image file skips the line (counted) or,
/// with `strict`, is an error; a missing or empty caption is an error.
pub fn read_captions(path: &Path, strict: bool) -> Result<Loaded<CaptionRecord>> {
    let mut records = Vec::new();
    let mut missing = 0;
    for (line, obj) in read_jsonl(path)? {
        let image = opt_string(path, line, &obj, "image")?
            .ok_or_else(|| line_err(path, line, "missing string field `image`"))?;
        let caption = opt_string(path, line, &obj, "caption")?
            .ok_or_else(|| line_err(path, line, "missing string field `caption`"))?;
        if caption.trim().is_empty() {
            return Err(line_err(path, line, "empty caption"));
        }
        let image = resolve_image(path, &image);
        if check_image(path, line, &image, strict, &mut missing)? {
            records.push(CaptionRecord { line, image, caption });
        }
    }
    Ok(Loaded {
        records,
        missing_images: missing,
    })
}

/// Reads prompt records; `need_response` requires a non-empty `response` or `response_ids`.
pub fn read_prompts(path: &Path, strict: bool, need_response: bool) -> Result<Loaded<PromptRecord>> {
    let mut records = Vec::new();
    let mut missing = 0;
    for (line, obj) in read_jsonl(path)? {
        let image_field = opt_string(path, line, &obj, "image")?;
        let prompt = opt_string(path, line, &obj, "prompt")?
            .ok_or_else(|| line_err(path, line, "missing string field `prompt`"))?;
        if prompt.trim().is_empty() {
            return Err(line_err(path, line, "empty prompt"));
        }
        let response = opt_string(path, line, &obj, "response")?;
        let response_ids = match obj.get("response_ids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| line_err(path, line, "`response_ids` must be a list of token ids"))?,
            ),
            Some(_) => return Err(line_err(path, line, "`response_ids` must be a list of token ids")),
        };
        if need_response {
            let empty_text = response.as_deref().is_none_or(|r| r.is_empty());
            let empty_ids = response_ids.as_ref().is_none_or(|r| r.is_empty());
            if empty_text && empty_ids {
                return Err(line_err(path, line, "missing or empty `response`"));
            }
        }
        let sample = obj.get("sample").and_then(Value::as_u64);
        let image = image_field.as_deref().map(|s| resolve_image(path, s));
        if let Some(img) = &image {
            if !check_image(path, line, img, strict, &mut missing)? {
                continue;
            }
        }
        records.push(PromptRecord {
            line,
            image_field,
            image,
            prompt,
            response,
            response_ids,
            sample,
        });
    }
    Ok(Loaded {
        records,
        missing_images: missing,
    })
}

/// A Qwen2.5-VL target's frozen vision tower and prompt conventions, with a feature cache.
pub struct TargetVision {
    pub model: Qwen25Vl,
    pub preprocessor: PreprocessorConfig,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, Arc<ImageFeatures>>>,
    disk: Option<PathBuf>,
}

impl TargetVision {
    /// Loads a Qwen2.5-VL target directory; `disk_cache`: a folder for feature files.
    pub fn load(dir: &Path, disk_cache: Option<&Path>) -> Result<Self> {
        let model = match Target::load(dir)? {
            Target::Vl(m) => m,
            Target::Text(_) => {
                return Err(Error::Config {
                    path: dir.join("config.json"),
                    reason: "the target must be a Qwen2.5-VL model (model_type qwen2_5_vl)".into(),
                })
            }
        };
        if let Some(d) = disk_cache {
            std::fs::create_dir_all(d).map_err(|e| Error::Io {
                path: d.to_path_buf(),
                source: e,
            })?;
        }
        Ok(TargetVision {
            model,
            preprocessor: PreprocessorConfig::from_dir(dir)?,
            tokenizer: Tokenizer::from_dir(dir)?,
            dir: dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
            disk: disk_cache.map(Path::to_path_buf),
        })
    }

    pub fn image_token(&self) -> u32 {
        self.model.cfg.image_token_id
    }

    pub fn vision_tokens(&self) -> VisionTokens {
        VisionTokens {
            vision_start: self.model.cfg.vision_start_token_id,
            vision_end: self.model.cfg.vision_end_token_id,
            image_pad: self.model.cfg.image_token_id,
        }
    }

    /// The id that ends an assistant turn (`<|im_end|>`, the tokenizer's eos_token).
    pub fn end_of_turn(&self) -> Result<u32> {
        self.tokenizer
            .eos_token_id()
            .or_else(|| self.tokenizer.token_to_id("<|im_end|>"))
            .ok_or_else(|| Error::Config {
                path: self.dir.join("tokenizer_config.json"),
                reason: "no eos_token / <|im_end|> to end the assistant's turn".into(),
            })
    }

    /// Vision features of the image file at `path` (cached).
    pub fn features(&self, path: &Path) -> Result<Arc<ImageFeatures>> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(f) = self.cache.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(f.clone());
        }
        let disk_file = self.disk.as_ref().map(|d| d.join(disk_key(&key)));
        let feats = match disk_file.as_ref().filter(|f| f.is_file()).map(|f| read_features(f)) {
            Some(Ok(f)) => f,
            _ => {
                let img = ImageInput::from_path(path)?;
                let pre = preprocess(&img, &self.preprocessor)?;
                let out = self.model.encode_image(&pre.pixel_values, pre.grid_thw)?;
                let f = ImageFeatures {
                    pre_merger: out.pre_merger,
                    window_index: out.window_index,
                    grid_thw: pre.grid_thw,
                };
                if let Some(file) = &disk_file {
                    write_features(file, &f)?;
                }
                f
            }
        };
        let f = Arc::new(feats);
        self.cache.lock().map_err(|_| poisoned())?.insert(key, f.clone());
        Ok(f)
    }

    /// The chat-template ids of a one-turn prompt (one placeholder per image) and the
    /// target's sequence with placeholders expanded (what the drafter sees in massv mode).
    pub fn prompt_ids(&self, prompt: &str, grid: Option<[usize; 3]>) -> Result<(Vec<u32>, Vec<u32>)> {
        let template = self
            .tokenizer
            .encode(&self.tokenizer.user_prompt(prompt, grid.is_some())?)?;
        let grids: Vec<[usize; 3]> = grid.into_iter().collect();
        let expanded = self.model.expand_image_placeholders(&template, &grids)?;
        Ok((template, expanded))
    }

    /// A training sequence: the prompt (image placeholders expanded) then `response`,
    /// loss on the response only. `positions`: 1-D for drafters, M-RoPE for the target's LM.
    pub fn example(
        &self,
        prompt: &str,
        image: Option<Arc<ImageFeatures>>,
        response: &[u32],
        mrope: bool,
    ) -> Result<Example> {
        let (_, expanded) = self.prompt_ids(prompt, image.as_ref().map(|f| f.grid_thw))?;
        let mut ids = expanded.clone();
        ids.extend_from_slice(response);
        let mut loss_mask = vec![false; expanded.len()];
        loss_mask.extend(std::iter::repeat_n(true, response.len()));
        let images: Vec<Arc<ImageFeatures>> = image.into_iter().collect();
        let positions = if mrope {
            // The prompt as get_rope_index numbers it; the response continues as decoding
            // does: position S + i + rope_delta on all three axes.
            let grids: Vec<[usize; 3]> = images.iter().map(|f| f.grid_thw).collect();
            let (p, delta) = rope_index(
                &expanded,
                self.image_token(),
                &grids,
                self.model.cfg.vision.spatial_merge_size,
            )?;
            let s = expanded.len();
            let resp: Vec<i32> = (0..response.len()).map(|i| (s + i) as i32 + delta).collect();
            let mut all = Vec::with_capacity(3 * ids.len());
            for axis in p.chunks_exact(s.max(1)) {
                all.extend_from_slice(axis);
                all.extend_from_slice(&resp);
            }
            if s == 0 {
                all = resp.repeat(3);
            }
            PositionIds::Multi(all)
        } else {
            PositionIds::Sequential
        };
        Ok(Example {
            ids,
            loss_mask,
            images,
            positions,
        })
    }

    /// Response ids of a record: its `response_ids`, else its text tokenized plus the end of turn.
    pub fn response_ids(&self, r: &PromptRecord) -> Result<Vec<u32>> {
        if let Some(ids) = &r.response_ids {
            return Ok(ids.clone());
        }
        let mut ids = self.tokenizer.encode(r.response.as_deref().unwrap_or_default())?;
        ids.push(self.end_of_turn()?);
        Ok(ids)
    }
}

fn poisoned() -> Error {
    Error::InvalidArgument("feature cache lock poisoned".into())
}

/// File name of an image's cached features: a hash of its path, size and mtime.
fn disk_key(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let mtime = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path
        .to_string_lossy()
        .bytes()
        .chain(size.to_le_bytes())
        .chain(mtime.to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}.safetensors")
}

fn write_features(path: &Path, f: &ImageFeatures) -> Result<()> {
    let mut p = Params::new();
    let n = f.window_index.len();
    let rows = f.pre_merger.len() / n.max(1);
    p.insert("pre_merger", vec![n, rows], f.pre_merger.clone())?;
    p.insert(
        "window_index",
        vec![n],
        f.window_index.iter().map(|&x| x as f32).collect(),
    )?;
    p.insert("grid_thw", vec![3], f.grid_thw.iter().map(|&x| x as f32).collect())?;
    p.save(path)
}

fn read_features(path: &Path) -> Result<ImageFeatures> {
    let p = Params::load(path)?;
    let g = p.get("grid_thw")?;
    if g.len() != 3 {
        return Err(Error::InvalidArgument(format!("{}: bad grid_thw", path.display())));
    }
    Ok(ImageFeatures {
        pre_merger: p.get("pre_merger")?.to_vec(),
        window_index: p.get("window_index")?.iter().map(|&x| x as usize).collect(),
        grid_thw: [g[0] as usize, g[1] as usize, g[2] as usize],
    })
}
