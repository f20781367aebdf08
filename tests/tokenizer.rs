//! Tokenization and chat templates against ids and strings produced by transformers
//! (tests/reference/make_qwen2_fixtures.py).

mod common;

use std::path::Path;

use common::{fixture, real_model};
use massv::tokenizer::Tokenizer;
use serde_json::Value;

/// A model directory built from the real Qwen2 vocab.json + merges.txt (no tokenizer.json)
/// and the tokenizer_config.json / chat_template.json of `model`.
fn real_qwen2_dir(model: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tok = real_model("qwen2-tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(tok.join(f), dir.path().join(f)).unwrap();
    }
    for f in ["tokenizer_config.json", "chat_template.json"] {
        let src = real_model(model).join(f);
        if src.exists() {
            std::fs::copy(src, dir.path().join(f)).unwrap();
        }
    }
    dir
}

fn cases(path: &Path) -> Vec<Value> {
    serde_json::from_str::<Vec<Value>>(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_ids(tok: &Tokenizer, cases_file: &str) {
    let cases = cases(&fixture("tokenizer_cases").join(cases_file));
    assert!(cases.len() >= 12, "{cases_file}: too few cases");
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{cases_file}: {text:?}");
        assert_eq!(
            tok.decode(&want, false).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{cases_file}: decode {text:?}"
        );
    }
}

#[test]
fn real_qwen2_bpe_from_vocab_and_merges() {
    let dir = real_qwen2_dir("Qwen2.5-0.5B-Instruct");
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.encode("Hello world!").unwrap(), vec![9707, 1879, 0]);
    assert_eq!(tok.vocab_size(), 151665, "151643 BPE tokens + 22 added");
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151645));
    assert_eq!(tok.token_to_id("<|image_pad|>"), Some(151655));
    assert_eq!(tok.eos_token_id(), Some(151645));
    check_ids(&tok, "qwen2_ids.json");
}

#[test]
fn tiny_tokenizer_json() {
    let tok = Tokenizer::from_dir(&fixture("tokenizer")).unwrap();
    check_ids(&tok, "tiny_ids.json");
}

#[test]
fn chat_templates_render_like_transformers() {
    let cases = cases(&fixture("tokenizer_cases/chat_template_cases.json"));
    assert!(cases.len() >= 5);
    for c in cases {
        let model = c["template_file"].as_str().unwrap().split('/').next().unwrap();
        let dir = real_qwen2_dir(model);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let got = tok
            .apply_chat_template(&c["messages"], c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(got, c["rendered"].as_str().unwrap(), "{c}");
    }
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("no tokenizer found") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
    std::fs::write(dir.path().join("tokenizer.json"), "{ broken").unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn added_token_ids_must_line_up() {
    // An added token declared at an id that is not the next free one would shift every
    // special token; it must be an error.
    let dir = real_qwen2_dir("Qwen2.5-0.5B-Instruct");
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let dec = cfg["added_tokens_decoder"].as_object_mut().unwrap();
    let tok = dec.remove("151643").unwrap();
    dec.insert("151700".into(), tok);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(e.contains("declares id") && e.contains("tokenizer_config.json"), "{e}");
}

#[test]
fn template_without_chat_template_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tokenizer/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let e = tok.user_prompt("hi", false).unwrap_err().to_string();
    assert!(e.contains("no chat template"), "{e}");
}
