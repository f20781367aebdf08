//! Tokenizer and chat template of a model directory.
//!
//! `tokenizer.json` is loaded as is. Without it, the Qwen2 byte-level BPE is rebuilt from
//! `vocab.json` + `merges.txt` the way transformers' `Qwen2TokenizerFast` converts it
//! (NFC, the Qwen2 split regex, byte-level), and the added tokens of
//! `tokenizer_config.json` are appended at their declared ids. Chat templates render
//! with minijinja configured like transformers' jinja environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value as JValue};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::config::read_json_object;
use crate::error::{Error, Result};

/// The pre-tokenization pattern of every Qwen2 / Qwen2.5 / Qwen2.5-VL tokenizer.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// Named special tokens of tokenizer_config.json (eos_token, pad_token, …) for templates.
    special_strings: BTreeMap<String, String>,
    eos_token: Option<String>,
    source: PathBuf,
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            Some(read_json_object(&cfg_path)?)
        } else {
            None
        };
        let tok_json = dir.join("tokenizer.json");
        let (inner, source) = if tok_json.is_file() {
            let t = tokenizers::Tokenizer::from_file(&tok_json).map_err(|e| Error::Tokenizer {
                path: tok_json.clone(),
                reason: e.to_string(),
            })?;
            (t, tok_json)
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            (build_qwen2_bpe(dir, cfg.as_ref(), &cfg_path)?, dir.join("vocab.json"))
        } else {
            return Err(Error::TokenizerMissing { dir: dir.to_path_buf() });
        };

        let mut special_strings = BTreeMap::new();
        if let Some(cfg) = &cfg {
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                if let Some(s) = token_string(cfg.get(key)) {
                    special_strings.insert(key.to_string(), s);
                }
            }
        }
        let eos_token = special_strings.get("eos_token").cloned();
        let chat_template = find_chat_template(dir, cfg.as_ref(), &cfg_path)?;
        Ok(Tokenizer {
            inner,
            chat_template,
            special_strings,
            eos_token,
            source,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Why two tokenizers are not interchangeable (first differing token), if they are not:
    /// a drafter must map every token, special ones included, to the target's id.
    pub fn vocabulary_mismatch(&self, other: &Tokenizer) -> Option<String> {
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            return Some(format!("{} tokens vs {}", a.len(), b.len()));
        }
        let mut diff: Vec<(&String, &u32)> = a.iter().filter(|(t, id)| b.get(*t) != Some(*id)).collect();
        diff.sort_by_key(|(_, id)| **id);
        diff.first().map(|(t, id)| match b.get(*t) {
            Some(other_id) => format!("token {t:?} is id {id} here but {other_id} there"),
            None => format!("token {t:?} (id {id}) is missing there"),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.err(format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(format!("decode failed: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of `eos_token` from tokenizer_config.json (the chat template's end of turn).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages` (the transformers message format: a list
    /// of {role, content}, content a string or a list of {type: text|image, …}).
    pub fn apply_chat_template(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{}: the model directory has no chat template",
                self.source.display()
            ))
        })?;
        render_template(tpl, messages, add_generation_prompt, &self.special_strings)
    }

    /// One user turn: the image (if any), then the text; the format every CLI command uses.
    pub fn user_prompt(&self, text: &str, with_image: bool) -> Result<String> {
        let mut content = Vec::new();
        if with_image {
            content.push(serde_json::json!({"type": "image"}));
        }
        content.push(serde_json::json!({"type": "text", "text": text}));
        let messages = serde_json::json!([{"role": "user", "content": content}]);
        self.apply_chat_template(&messages, true)
    }

    fn err(&self, reason: String) -> Error {
        Error::Tokenizer {
            path: self.source.clone(),
            reason,
        }
    }
}

/// Turns a growing list of token ids into text pieces for streaming. Byte-level BPE can
/// split one character over several tokens: a piece is released only once it decodes to
/// whole characters.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    /// Adds `id` and returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }

    /// Adds `id` (None: a token that adds no text, such as a stop token) as the last
    /// token and returns all text not yet released, complete or not.
    pub fn finish(&mut self, tok: &Tokenizer, id: Option<u32>) -> Result<String> {
        self.ids.extend(id);
        let text = tok.decode(&self.ids, true)?;
        let piece = text.get(self.emitted..).unwrap_or_default().to_string();
        self.emitted = text.len();
        Ok(piece)
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        // Older configs store AddedToken dicts: {"content": "...", ...}.
        Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Qwen2's normalizer, pre-tokenizer and decoder around a BPE model.
pub(crate) fn set_qwen2_pipeline(tok: &mut tokenizers::Tokenizer) -> std::result::Result<(), String> {
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| e.to_string())?;
    tok.with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])))
        .with_decoder(Some(ByteLevelDecoder::default()));
    Ok(())
}

fn build_qwen2_bpe(
    dir: &Path,
    cfg: Option<&serde_json::Map<String, Value>>,
    cfg_path: &Path,
) -> Result<tokenizers::Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let terr = |path: &Path, e: String| Error::Tokenizer {
        path: path.to_path_buf(),
        reason: e,
    };
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| terr(&vocab, format!("cannot build BPE from vocab.json + merges.txt: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| terr(&vocab, e.to_string()))?;
    tok.with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])))
        .with_decoder(Some(ByteLevelDecoder::default()));

    // Added tokens must land on their declared ids: they are appended after the BPE
    // vocabulary in id order, and any gap or overlap is an error, not a silent shift.
    let Some(decoder) = cfg
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Value::as_object)
    else {
        return Ok(tok);
    };
    let mut added: Vec<(u32, String, bool)> = Vec::new();
    for (id, v) in decoder {
        let id: u32 = id
            .parse()
            .map_err(|_| terr(cfg_path, format!("added_tokens_decoder key {id:?} is not an id")))?;
        let content = v
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| terr(cfg_path, format!("added token {id} has no `content`")))?;
        let special = v.get("special").and_then(Value::as_bool).unwrap_or(false);
        added.push((id, content.to_string(), special));
    }
    added.sort();
    for (id, content, special) in added {
        if tok.token_to_id(&content) == Some(id) {
            continue;
        }
        let next = tok.get_vocab_size(true) as u32;
        if id != next {
            return Err(terr(
                cfg_path,
                format!("added token {content:?} declares id {id} but the next free id is {next}"),
            ));
        }
        let t = AddedToken::from(content.clone(), special).normalized(false);
        if special {
            tok.add_special_tokens(&[t]);
        } else {
            tok.add_tokens(&[t]);
        }
        if tok.token_to_id(&content) != Some(id) {
            return Err(terr(cfg_path, format!("added token {content:?} did not get id {id}")));
        }
    }
    Ok(tok)
}

/// transformers' order: chat_template.jinja, then chat_template.json (the processor's),
/// then tokenizer_config.json's `chat_template` (a string, or a list of named templates).
fn find_chat_template(
    dir: &Path,
    cfg: Option<&serde_json::Map<String, Value>>,
    cfg_path: &Path,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        let obj = read_json_object(&json)?;
        return match obj.get("chat_template") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::config(&json, "missing string field `chat_template`")),
        };
    }
    match cfg.and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |want: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(want))
                    .and_then(|t| t.get("template")?.as_str())
            };
            named("default")
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| Error::config(cfg_path, "chat_template list has no \"default\" entry"))
        }
        Some(_) => Err(Error::config(cfg_path, "`chat_template` must be a string or a list")),
    }
}

fn render_template(
    template: &str,
    messages: &Value,
    add_generation_prompt: bool,
    specials: &BTreeMap<String, String>,
) -> Result<String> {
    let mut env = Environment::new();
    // transformers renders with trim_blocks + lstrip_blocks and Python-style methods.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_filter("tojson", tojson_like_python);
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(format!("cannot parse: {e}")))?;
    let tpl = env
        .get_template("chat")
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    let mut ctx: BTreeMap<String, JValue> = specials
        .iter()
        .map(|(k, v)| (k.clone(), JValue::from(v.as_str())))
        .collect();
    ctx.insert("messages".into(), JValue::from(minijinja::value::Serde(messages)));
    ctx.insert("add_generation_prompt".into(), JValue::from(add_generation_prompt));
    tpl.render(ctx)
        .map_err(|e| Error::ChatTemplate(format!("render failed: {e}")))
}

/// `tojson` as transformers defines it: Python's `json.dumps` with its default
/// separators (", " and ": ") and non-ASCII kept as is.
fn tojson_like_python(v: JValue) -> std::result::Result<JValue, minijinja::Error> {
    let json =
        serde_json::to_value(&v).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonJson);
    serde::Serialize::serialize(&json, &mut ser)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JValue::from_safe_string(String::from_utf8_lossy(&out).into_owned()))
}

struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}
