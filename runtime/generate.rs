//! Target-only decoding: the baseline every speculative speedup is measured against.

use std::path::Path;
use std::time::Instant;

use crate::config::{read_json_object, Fields};
use crate::error::Result;
use crate::image::Preprocessed;
use crate::model::qwen2::Logits;
use crate::model::Target;
use crate::tokenizer::Tokenizer;

/// Token ids that end generation: generation_config.json's `eos_token_id` (int or list),
/// else config.json's, plus the tokenizer's `eos_token` (the chat template's end of turn).
pub fn stop_tokens(dir: &Path, config_eos: &[u32], tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let gen_path = dir.join("generation_config.json");
    let mut ids = if gen_path.is_file() {
        let obj = read_json_object(&gen_path)?;
        Fields {
            path: &gen_path,
            obj: &obj,
        }
        .token_ids("eos_token_id")?
    } else {
        Vec::new()
    };
    if ids.is_empty() {
        ids = config_eos.to_vec();
    }
    ids.extend(tokenizer.eos_token_id());
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

pub struct Output {
    pub tokens: Vec<u32>,
    pub text: String,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Greedy decoding of `prompt` (with its images) by the target alone. Stops after
/// `max_new_tokens` or at the first stop token (included in `tokens`, left out of `text`).
pub fn greedy(
    model: &Target,
    tok: &Tokenizer,
    prompt: &[u32],
    images: &[Preprocessed],
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Output> {
    let t0 = Instant::now();
    let (mut logits, mut session) = model.prefill(
        prompt,
        images,
        &model.encode_images(images)?,
        max_new_tokens,
        Logits::Last,
    )?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut tokens = Vec::new();
    while tokens.len() < max_new_tokens {
        let next = argmax(&logits) as u32;
        tokens.push(next);
        if stop.contains(&next) || tokens.len() == max_new_tokens {
            break;
        }
        logits = model.decode(&[next], &mut session, Logits::Last)?;
    }
    let decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    let text_ids: Vec<u32> = tokens.iter().copied().filter(|t| !stop.contains(t)).collect();
    let text = tok.decode(&text_ids, true)?;
    Ok(Output {
        tokens,
        text,
        prefill_ms,
        decode_ms,
    })
}

/// Index of the largest value; the first one on ties (as torch.argmax).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
