//! Helpers shared by the decoding loops: stop tokens and argmax.

use std::path::Path;

use crate::config::{read_json_object, Fields};
use crate::error::Result;
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

/// Index of the largest value; the first one on ties (as torch.argmax). NaNs are skipped
/// (0 when every value is one), as the device's argmax kernel skips them: a NaN first
/// no longer hides the maximum after it.
pub fn argmax(x: &[f32]) -> usize {
    let mut best: Option<usize> = None;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| v > x[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0)
}
