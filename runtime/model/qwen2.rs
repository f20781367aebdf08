//! Qwen2 decoder LM (transformers' `Qwen2ForCausalLM`): the drafter, and the language
//! model inside Qwen2.5-VL. f32 on the CPU backend.

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::cpu;
use crate::config::{self, TextConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::weights::Weights;

/// Which rows of the forward pass get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every input position (verification, golden tests).
    All,
    /// Only the last position (prefill before sampling).
    Last,
}

/// Rotary positions of the tokens of one forward pass.
#[derive(Debug, Clone, Copy)]
pub enum Positions<'a> {
    /// One position per token (text LMs, and text-only spans of Qwen2.5-VL).
    Seq(&'a [i32]),
    /// Qwen2.5-VL's (temporal, height, width) positions: [3, n] row-major.
    Multi(&'a [i32]),
}

/// Which cached keys each new token sees when the causal rule does not apply (a token
/// tree): every key before `start`, and key start + j for new token t iff
/// allow[t · span + j] != 0, where span = (cache length after the pass) − start.
#[derive(Debug, Clone, Copy)]
pub struct TreeMask<'a> {
    pub start: usize,
    pub allow: &'a [u8],
}

/// One decoder layer. Shapes with D = hidden, Q = heads·head_dim, KV = kv_heads·head_dim,
/// I = intermediate.
struct Layer {
    input_norm: Vec<f32>, // [D]
    qkv_w: Vec<f32>,      // [Q + 2·KV, D]: q, k, v projections stacked
    qkv_b: Vec<f32>,      // [Q + 2·KV]
    o_w: Vec<f32>,        // [D, Q]
    post_norm: Vec<f32>,  // [D]
    gate_up_w: Vec<f32>,  // [2·I, D]: gate rows, then up rows (the swiglu layout)
    down_w: Vec<f32>,     // [D, I]
}

pub struct Qwen2 {
    pub cfg: TextConfig,
    embed: Vec<f32>, // [V, D]
    layers: Vec<Layer>,
    norm: Vec<f32>,            // [D]
    lm_head: Option<Vec<f32>>, // [V, D]; None when tied to `embed`
}

/// Where the LM's tensors live inside a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// Prefix of embed_tokens / layers / norm: "model." (Qwen2, hub Qwen2.5-VL) or
    /// "model.language_model." (transformers-5 Qwen2.5-VL).
    pub prefix: &'a str,
}

impl Names<'_> {
    pub const QWEN2: Names<'static> = Names { prefix: "model." };

    fn layer(&self, i: usize, rest: &str) -> String {
        format!("{}layers.{i}.{rest}", self.prefix)
    }
}

/// Every tensor the LM reads, with the shape the config implies.
pub fn expected_tensors(cfg: &TextConfig, names: Names) -> BTreeMap<String, Vec<usize>> {
    let (d, q, kv, i, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut m = BTreeMap::new();
    m.insert(format!("{}embed_tokens.weight", names.prefix), vec![v, d]);
    m.insert(format!("{}norm.weight", names.prefix), vec![d]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".into(), vec![v, d]);
    }
    for l in 0..cfg.num_hidden_layers {
        let mut put = |rest: &str, shape: Vec<usize>| m.insert(names.layer(l, rest), shape);
        put("input_layernorm.weight", vec![d]);
        put("post_attention_layernorm.weight", vec![d]);
        put("self_attn.q_proj.weight", vec![q, d]);
        put("self_attn.q_proj.bias", vec![q]);
        put("self_attn.k_proj.weight", vec![kv, d]);
        put("self_attn.k_proj.bias", vec![kv]);
        put("self_attn.v_proj.weight", vec![kv, d]);
        put("self_attn.v_proj.bias", vec![kv]);
        put("self_attn.o_proj.weight", vec![d, q]);
        put("mlp.gate_proj.weight", vec![i, d]);
        put("mlp.up_proj.weight", vec![i, d]);
        put("mlp.down_proj.weight", vec![d, i]);
    }
    m
}

impl Qwen2 {
    /// Loads a Qwen2 causal-LM directory: config.json + safetensors, inventory-checked.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = config::load_qwen2(&dir.join("config.json"))?;
        let weights = Weights::open(dir)?;
        weights.check_inventory(&expected_tensors(&cfg, Names::QWEN2))?;
        Self::from_weights(cfg, &weights, Names::QWEN2)
    }

    /// Builds the LM from tensors already inventory-checked by the caller.
    pub fn from_weights(cfg: TextConfig, w: &Weights, names: Names) -> Result<Self> {
        let shapes = expected_tensors(&cfg, names);
        let get = |name: &str| -> Result<Vec<f32>> {
            let shape = shapes.get(name).ok_or_else(|| Error::MissingTensor {
                dir: w.dir().to_path_buf(),
                tensor: name.to_string(),
            })?;
            w.f32(name, shape)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let t = |rest: &str| get(&names.layer(l, rest));
                Ok(Layer {
                    input_norm: t("input_layernorm.weight")?,
                    qkv_w: [
                        t("self_attn.q_proj.weight")?,
                        t("self_attn.k_proj.weight")?,
                        t("self_attn.v_proj.weight")?,
                    ]
                    .concat(),
                    qkv_b: [
                        t("self_attn.q_proj.bias")?,
                        t("self_attn.k_proj.bias")?,
                        t("self_attn.v_proj.bias")?,
                    ]
                    .concat(),
                    o_w: t("self_attn.o_proj.weight")?,
                    post_norm: t("post_attention_layernorm.weight")?,
                    gate_up_w: [t("mlp.gate_proj.weight")?, t("mlp.up_proj.weight")?].concat(),
                    down_w: t("mlp.down_proj.weight")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Qwen2 {
            embed: get(&format!("{}embed_tokens.weight", names.prefix))?,
            norm: get(&format!("{}norm.weight", names.prefix))?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(get("lm_head.weight")?)
            },
            layers,
            cfg,
        })
    }

    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            capacity,
        )
    }

    /// Embedding rows of `tokens`: [n, D].
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let d = self.cfg.hidden_size;
        let mut out = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            if t as usize >= self.cfg.vocab_size {
                return Err(Error::TokenOutOfRange {
                    id: t,
                    vocab: self.cfg.vocab_size,
                });
            }
            out.extend_from_slice(&self.embed[t as usize * d..][..d]);
        }
        Ok(out)
    }

    /// Runs `tokens` after the cache's committed positions, commits them, returns logits.
    pub fn forward_tokens(&self, tokens: &[u32], cache: &mut KvCache, logits: Logits) -> Result<Vec<f32>> {
        let start = cache.len() as i32;
        let positions: Vec<i32> = (start..start + tokens.len() as i32).collect();
        let hidden = self.embed(tokens)?;
        self.forward(hidden, Positions::Seq(&positions), cache, logits)
    }

    /// The decoder on input embeddings `hidden` [n, D] at rotary `positions` (which need
    /// not equal cache indices), causal. Returns [rows, V] logits.
    pub fn forward(
        &self,
        hidden: Vec<f32>,
        positions: Positions,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        self.forward_masked(hidden, positions, cache, logits, None)
    }

    /// [`Qwen2::forward`] with the causal rule replaced by `mask` when one is given.
    pub fn forward_masked(
        &self,
        mut hidden: Vec<f32>,
        positions: Positions,
        cache: &mut KvCache,
        logits: Logits,
        mask: Option<TreeMask>,
    ) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (d, q_dim, kv_dim) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let n = hidden.len() / d;
        if n == 0 {
            return Err(Error::InvalidArgument("forward pass with no tokens".into()));
        }
        let (given, want) = match positions {
            Positions::Seq(p) => (p.len(), n),
            Positions::Multi(p) => (p.len(), 3 * n),
        };
        if given != want {
            return Err(Error::InvalidArgument(format!(
                "{given} position values for {n} tokens"
            )));
        }
        // Text positions under M-RoPE are the same on all three axes.
        let multi: Option<(Vec<i32>, [usize; 3])> = match (positions, c.mrope_section) {
            (Positions::Seq(_), None) => None,
            (Positions::Seq(p), Some(sec)) => Some((p.repeat(3), sec)),
            (Positions::Multi(p), Some(sec)) => Some((p.to_vec(), sec)),
            (Positions::Multi(_), None) => {
                return Err(Error::InvalidArgument(
                    "3-D positions given to a model without mrope_section".into(),
                ))
            }
        };
        cache.reserve(n)?;
        if let Some(m) = mask {
            let span = (cache.len() + n)
                .checked_sub(m.start)
                .filter(|_| m.start <= cache.len());
            if span.map(|s| s * n) != Some(m.allow.len()) {
                return Err(Error::InvalidArgument(format!(
                    "tree mask of {} entries from key {} does not fit {n} tokens after {} cached",
                    m.allow.len(),
                    m.start,
                    cache.len()
                )));
            }
            if (0..c.num_hidden_layers).any(|l| c.layer_window(l).is_some()) {
                return Err(Error::InvalidArgument(
                    "token trees are not supported with sliding-window attention".into(),
                ));
            }
        }
        let eps = c.rms_norm_eps as f32;
        let theta = c.rope_theta as f32;
        let start = cache.len();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = cpu::rmsnorm(&hidden, &layer.input_norm, d, eps);
            let qkv = cpu::linear(&h, &layer.qkv_w, Some(&layer.qkv_b), d);
            let (mut q, mut k, mut v) = (
                Vec::with_capacity(n * q_dim),
                Vec::with_capacity(n * kv_dim),
                Vec::with_capacity(n * kv_dim),
            );
            for row in qkv.chunks_exact(q_dim + 2 * kv_dim) {
                q.extend_from_slice(&row[..q_dim]);
                k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
                v.extend_from_slice(&row[q_dim + kv_dim..]);
            }
            match (&multi, positions) {
                (Some((p, sec)), _) => {
                    cpu::mrope(&mut q, p, *sec, c.num_attention_heads, c.head_dim, theta);
                    cpu::mrope(&mut k, p, *sec, c.num_key_value_heads, c.head_dim, theta);
                }
                (None, Positions::Seq(p)) | (None, Positions::Multi(p)) => {
                    cpu::rope(&mut q, p, c.num_attention_heads, c.head_dim, theta);
                    cpu::rope(&mut k, p, c.num_key_value_heads, c.head_dim, theta);
                }
            }
            let (kc, vc) = cache.write(l, &k, &v);
            let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
            let attn = match mask {
                None => cpu::attention(&q, kc, vc, start, hq, hkv, hd, c.layer_window(l)),
                Some(m) => cpu::attention_masked(&q, kc, vc, m.allow, m.start, start, hq, hkv, hd),
            };
            add_into(&mut hidden, &cpu::linear(&attn, &layer.o_w, None, q_dim));
            let h = cpu::rmsnorm(&hidden, &layer.post_norm, d, eps);
            let gu = cpu::linear(&h, &layer.gate_up_w, None, d);
            let act = cpu::swiglu(&gu, c.intermediate_size);
            add_into(
                &mut hidden,
                &cpu::linear(&act, &layer.down_w, None, c.intermediate_size),
            );
        }
        cache.commit(n);
        let rows = match logits {
            Logits::All => &hidden[..],
            Logits::Last => &hidden[(n - 1) * d..],
        };
        let normed = cpu::rmsnorm(rows, &self.norm, d, eps);
        Ok(cpu::linear(
            &normed,
            self.lm_head.as_deref().unwrap_or(&self.embed),
            None,
            d,
        ))
    }
}

/// acc += x, the residual connections.
pub(crate) fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
