//! The Qwen2 decoder LM of [`super::qwen2`] on a CUDA device, step for step the CPU
//! model, so that the CPU stays the reference it is tested against.
//!
//! Weights are uploaded once as bf16; every activation lives in scratch buffers sized at
//! load time for a block of [`PREFILL_BLOCK`] tokens, so a decode or verify step only
//! launches kernels and copies ids, positions (and a tree mask) in and logits (or one
//! argmax per row) out.
//! The residual stream is bf16 like every activation (the launchers' storage type); sums
//! are f32 inside the kernels and logits are f32. Up to `GEMV_MAX_ROWS` rows (decode,
//! verify) take the GEMV kernels, which stream each weight once for all rows; longer
//! blocks (prefill) take cuBLASLt.
//!
//! The RMSNorm weights before the QKV and gate/up projections are folded into those
//! matrices' columns at load (w' = w · diag(norm), rounded to bf16 once), so a norm is
//! only its row scale. A GEMV step then launches no norm at all: the QKV and gate/up
//! GEMVs scale their input rows themselves and the o and down GEMVs add into the
//! residual stream (cuda/gemv.cu's fusions), six launches a layer. An untied LM head
//! takes the final norm's weight the same way (a tied one shares the embedding matrix and
//! norms first). A GEMM block norms with unit weights (rmsnorm / rmsnorm_residual with
//! `ones`) before its GEMMs.

mod cache;
mod chain;
mod pass;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use super::qwen2::{expected_tensors, Logits, Names, Positions, TreeMask};
use crate::backend::cuda::{AttnScratch, CudaDevice, DeviceGraph, ATTN_HEAD_DIMS, GEMV_MAX_ROWS, MAX_TOP_K};
use crate::config::{self, TextConfig};
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::weights::{DType, Weights};

pub use cache::{compact_path, CudaKvCache};
pub use chain::ChainPick;
use chain::{graphs_serve, ChainKey};
use pass::Head;

/// Tokens per forward block by default ([`CudaQwen2::set_prefill_block`]): a prefill
/// runs in blocks of this many, and every block streams all the weights once, so short
/// blocks make a long prompt's prefill memory-bound (a 7B LM reads its 15 GB of weights
/// per block: at 64 tokens a block that alone is more time than the block's FLOPs; at
/// 512 the GEMMs are compute-bound). The scratch for 512 tokens of the 7B target is
/// about 160 MB (39 MB of it the logits of a tree's 64 rows, [`HEAD_ROWS`]).
pub const PREFILL_BLOCK: usize = 512;

/// The most tokens of a masked (tree) block: it runs as one block, its mask rows
/// indexing keys of the whole block.
pub const MAX_TREE_BLOCK: usize = 64;

/// Rows of logits the head makes at once where they stay on the device (argmax, top-k,
/// probabilities): a tree block's, its LM-head matrix streamed once (one cuBLAS GEMM)
/// instead of once per GEMV group of 8 rows (8 times the 7B target's 1.1 GB for 64
/// nodes). Rows copied back go in GEMV groups.
const HEAD_ROWS: usize = MAX_TREE_BLOCK;

/// Splits of K the GEMV scratch allows (short matrices of the small models need them to
/// fill the GPU).
const GEMV_SPLITS: usize = 8;
/// Splits of the keys the attention scratch allows (long contexts, few row tiles).
const ATTN_SPLITS: usize = 16;
/// Captured chains a model keeps ([`CudaQwen2::draft_chain`]): one, two and more tokens
/// fed, each at a few γ.
const CHAIN_GRAPHS: usize = 8;

fn err(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Cuda {
        op: op.to_string(),
        reason: msg.to_string(),
    }
}

/// What a forward pass reads: token ids, or embeddings computed on the host (the
/// drafter's projected image tokens, Qwen2.5-VL's merged vision tokens).
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Tokens(&'a [u32]),
    /// [n, hidden] row-major.
    Embeddings(&'a [f32]),
}

/// What a pass of [`CudaQwen2::run`] reads: an [`Input`] from the host, or the one token a
/// chain drafted into slot i of the scratch's `chain` ids (it never went to the host).
#[derive(Clone, Copy)]
enum Feed<'a> {
    Host(Input<'a>),
    Drafted(usize),
}

/// Where a pass's tokens start in the cache.
#[derive(Clone, Copy)]
enum At {
    /// Known on the host: the block's positions are at the head of `step_in`.
    Host(usize),
    /// Read on the device when the kernels run (a chain's captured pass): `chain_at[i]`,
    /// the pass's first 1-D position, its n positions at `chain_at[i..i + n]`.
    Device(usize),
}

/// One decoder layer on the device. D = hidden, Q = heads·head_dim, KV = kv_heads·
/// head_dim, I = intermediate.
struct Layer {
    qkv_w: CudaSlice<bf16>,     // [Q + 2·KV, D]: q, k, v projections stacked, input norm folded in
    qkv_b: CudaSlice<bf16>,     // [Q + 2·KV]
    o_w: CudaSlice<bf16>,       // [D, Q]
    gate_up_w: CudaSlice<bf16>, // [2·I, D]: gate rows, then up rows (swiglu's layout), post norm folded in
    down_w: CudaSlice<bf16>,    // [D, I]
}

/// Activations of one block of B tokens ([`PREFILL_BLOCK`] by default), reused by every
/// pass.
struct Scratch {
    block: usize, // B
    /// [4·B]: a block's positions ([3, n] under M-RoPE, else [n]), then its token ids
    /// (for token input): one upload a pass.
    step_in: CudaSlice<i32>,
    embeds: CudaSlice<f32>,    // [B, D] host embeddings before the bf16 conversion
    hidden: CudaSlice<bf16>,   // [B, D] the residual stream
    normed: CudaSlice<bf16>,   // [B, D]
    qkv: CudaSlice<bf16>,      // [B, Q + 2·KV]: each token's q, k, v
    q: CudaSlice<bf16>,        // [B, Q] the rotated queries attention reads
    attn: CudaSlice<bf16>,     // [B, Q]
    proj: CudaSlice<bf16>,     // [B, D] a GEMM block's o_proj / down_proj output, added to the residual
    gate_up: CudaSlice<bf16>,  // [B, 2·I] blocks over GEMV_MAX_ROWS (else gemv_swiglu)
    act: CudaSlice<bf16>,      // [B, I]
    logits: CudaSlice<f32>,    // [HEAD_ROWS, V]
    probs: CudaSlice<f32>,     // [GEMV_MAX_ROWS, V] distributions of Head::HostProbs
    argmax: CudaSlice<i32>,    // [B]
    top_ids: CudaSlice<i32>,   // [B, MAX_TOP_K]
    top_probs: CudaSlice<f32>, // [B, MAX_TOP_K]
    /// [γ] the ids of the chain being drafted ([`CudaQwen2::draft_chain`]); grows with
    /// the first chain longer than it.
    chain: CudaSlice<i32>,
    /// [γ + 2·f − 1] for a chain whose first pass is fed f tokens: the 1-D positions of
    /// its passes' tokens (pass 0's f, then one a pass; a pass starts in the cache at its
    /// first), then the f tokens fed, all read on the device by the captured passes; one
    /// upload a chain.
    chain_at: CudaSlice<i32>,
    /// Chains' passes (all, or those after a first pass of several tokens), each set
    /// captured as one CUDA graph with what it baked in; the last few kept (a request's
    /// γ shrinks by its last tokens).
    chain_graphs: Vec<(ChainKey, DeviceGraph)>,
    /// Whether a chain picking by argmax [0] / by sampling [1] ran pass by pass: its
    /// kernels are then loaded (CUDA loads a module's kernels lazily, at their first
    /// launch), so that a capture holds launches only.
    chain_warm: [bool; 2],
    /// Whether a chain's first pass of two tokens ran (its GEMV and attention entries
    /// differ from one token's): a graph may then hold it.
    pair_warm: bool,
    /// Tree mask; starts at [T, T], T = MAX_TREE_BLOCK (a target's tree) and grows only
    /// for a wider one (a drafter whose earlier depths are cached).
    mask: CudaSlice<u8>,
    gemv: CudaSlice<f32>, // split-K partials of the GEMVs
    attn_split: AttnScratch,
}

impl Scratch {
    fn new(dev: &CudaDevice, c: &TextConfig, b: usize) -> Result<Self> {
        // Attention splits over the keys only for a few rows (decode, verify, trees):
        // its partials need no room for a prefill block's.
        let split_rows = b.min(MAX_TREE_BLOCK) * c.num_attention_heads;
        let t = MAX_TREE_BLOCK;
        let (d, q, kv, i) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let widest = (q + 2 * kv).max(2 * i).max(d);
        Ok(Scratch {
            block: b,
            step_in: dev.alloc_zeros(4 * b)?,
            embeds: dev.alloc_zeros(b * d)?,
            hidden: dev.alloc_zeros(b * d)?,
            normed: dev.alloc_zeros(b * d)?,
            qkv: dev.alloc_zeros(b * (q + 2 * kv))?,
            q: dev.alloc_zeros(b * q)?,
            attn: dev.alloc_zeros(b * q)?,
            proj: dev.alloc_zeros(b * d)?,
            gate_up: dev.alloc_zeros(b * 2 * i)?,
            act: dev.alloc_zeros(b * i)?,
            logits: dev.alloc_zeros(HEAD_ROWS * c.vocab_size)?,
            probs: dev.alloc_zeros(GEMV_MAX_ROWS * c.vocab_size)?,
            argmax: dev.alloc_zeros(b)?,
            top_ids: dev.alloc_zeros(b * MAX_TOP_K)?,
            top_probs: dev.alloc_zeros(b * MAX_TOP_K)?,
            chain: dev.alloc_zeros(8)?,
            chain_at: dev.alloc_zeros(8)?,
            chain_graphs: Vec::new(),
            chain_warm: [false; 2],
            pair_warm: false,
            mask: dev.alloc_zeros(t * t)?,
            gemv: dev.alloc_zeros(GEMV_SPLITS * GEMV_MAX_ROWS * widest)?,
            attn_split: dev.attn_scratch(split_rows, ATTN_SPLITS, c.head_dim)?,
        })
    }
}

pub struct CudaQwen2 {
    pub cfg: TextConfig,
    dev: Arc<CudaDevice>,
    embed: CudaSlice<bf16>, // [V, D]
    layers: Vec<Layer>,
    ones: CudaSlice<bf16>, // [D] the folded norms' weight in a GEMM block
    lm_head: LmHead,
    /// Behind a lock so the model is shared read-only, as the CPU model is.
    scratch: Mutex<Scratch>,
    /// Whether a drafted chain's passes replay as one CUDA graph ([`Self::set_graphs`]);
    /// off for models whose passes a graph cannot serve.
    graphs: AtomicBool,
    /// Why a capture failed, when one did (graphs are then off).
    graph_failure: Mutex<Option<String>>,
}

/// The final norm and the LM head.
enum LmHead {
    /// The head is `embed` (which the token gather reads too): the final norm keeps its
    /// own weight and runs before the head.
    Tied { norm: CudaSlice<bf16> }, // [D]
    /// The head's own [V, D] matrix with the final norm's weight folded in: a GEMV
    /// block's head scales the residual rows on the way in and launches no norm.
    Folded(CudaSlice<bf16>),
}

impl Drop for CudaQwen2 {
    fn drop(&mut self) {
        self.dev.current_for_drop();
    }
}

impl CudaQwen2 {
    /// Loads `dir` on the first GPU: an error naming the reason (no kernels, no driver, no
    /// device) where there is none.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::load(Arc::new(CudaDevice::new()?), dir)
    }

    /// Loads a Qwen2 causal-LM directory: config.json + safetensors, inventory-checked as
    /// [`super::qwen2::Qwen2::load`] does.
    pub fn load(dev: Arc<CudaDevice>, dir: &Path) -> Result<Self> {
        let cfg = config::load_qwen2(&dir.join("config.json"))?;
        check_served(&cfg)?;
        let weights = Weights::open(dir)?;
        weights.check_inventory(&expected_tensors(&cfg, Names::QWEN2))?;
        Self::from_weights(dev, cfg, &weights, Names::QWEN2)
    }

    /// Uploads the LM from tensors already inventory-checked by the caller.
    pub fn from_weights(dev: Arc<CudaDevice>, cfg: TextConfig, w: &Weights, names: Names) -> Result<Self> {
        check_served(&cfg)?;
        let shapes = expected_tensors(&cfg, names);
        let host = |name: &str| -> Result<Vec<bf16>> {
            let shape = shapes.get(name).ok_or_else(|| Error::MissingTensor {
                dir: w.dir().to_path_buf(),
                tensor: name.to_string(),
            })?;
            host_bf16(w, name, shape)
        };
        let layer = |l: usize, rest: &str| format!("{}layers.{l}.{rest}", names.prefix);
        let up = |v: Vec<bf16>| dev.upload(&v);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let t = |rest: &str| host(&layer(l, rest));
                let attn = |kind: &str| -> Result<Vec<bf16>> {
                    Ok([
                        t(&format!("self_attn.q_proj.{kind}"))?,
                        t(&format!("self_attn.k_proj.{kind}"))?,
                        t(&format!("self_attn.v_proj.{kind}"))?,
                    ]
                    .concat())
                };
                let gate_up = [t("mlp.gate_proj.weight")?, t("mlp.up_proj.weight")?].concat();
                Ok(Layer {
                    qkv_w: up(fold_norm(attn("weight")?, &t("input_layernorm.weight")?))?,
                    qkv_b: up(attn("bias")?)?,
                    o_w: up(t("self_attn.o_proj.weight")?)?,
                    gate_up_w: up(fold_norm(gate_up, &t("post_attention_layernorm.weight")?))?,
                    down_w: up(t("mlp.down_proj.weight")?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaQwen2 {
            embed: up(host(&format!("{}embed_tokens.weight", names.prefix))?)?,
            ones: up(vec![bf16::ONE; cfg.hidden_size])?,
            lm_head: {
                let norm = host(&format!("{}norm.weight", names.prefix))?;
                if cfg.tie_word_embeddings {
                    LmHead::Tied { norm: up(norm)? }
                } else {
                    LmHead::Folded(up(fold_norm(host("lm_head.weight")?, &norm))?)
                }
            },
            layers,
            scratch: Mutex::new(Scratch::new(&dev, &cfg, PREFILL_BLOCK)?),
            graphs: AtomicBool::new(
                graphs_serve(&cfg) && std::env::var("MASSV_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            ),
            graph_failure: Mutex::new(None),
            cfg,
            dev,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Runs prompts in blocks of `tokens` ([`PREFILL_BLOCK`] by default; at least
    /// [`MAX_TREE_BLOCK`], so that a tree fits in one): fewer tokens, less scratch memory
    /// (a device with little to spare), more passes over the weights. Reallocates the
    /// scratch.
    pub fn set_prefill_block(&mut self, tokens: usize) -> Result<()> {
        if tokens < MAX_TREE_BLOCK {
            return Err(err(
                "prefill block",
                format!("{tokens} tokens is below the {MAX_TREE_BLOCK} a tree block needs"),
            ));
        }
        let scratch = self.scratch.get_mut().unwrap_or_else(|p| p.into_inner());
        // The old buffers go first, so that both sets need not fit at once.
        *scratch = Scratch::new(&self.dev, &self.cfg, MAX_TREE_BLOCK)?;
        *scratch = Scratch::new(&self.dev, &self.cfg, tokens)?;
        Ok(())
    }

    pub fn new_cache(&self, capacity: usize) -> Result<CudaKvCache> {
        let c = &self.cfg;
        CudaKvCache::new(
            self.dev.clone(),
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
        )
    }

    /// Runs `tokens` after the cache's committed positions, commits them, returns logits.
    pub fn forward_tokens(&self, tokens: &[u32], cache: &mut CudaKvCache, logits: Logits) -> Result<Vec<f32>> {
        let positions = next_positions(cache, tokens.len());
        self.forward(Input::Tokens(tokens), Positions::Seq(&positions), cache, logits, None)
    }

    /// [`super::qwen2::Qwen2::forward_masked`] on the device: `input` at rotary
    /// `positions`, causal unless `mask` is given; commits the tokens; [rows, V] logits.
    pub fn forward(
        &self,
        input: Input,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
    ) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        let head = Head::Logits(&mut out);
        self.run(Feed::Host(input), positions, cache, logits, mask, head)?;
        Ok(out)
    }

    /// As [`Self::forward`], but each row's distribution under `params` (softmax of the
    /// logits / T, top-k, top-p) is written on the device into `out` from row `row0` on
    /// ([rows, V] row-major): T > 0 verification without copying the vocabulary back.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_probs(
        &self,
        input: Input,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
        params: &SamplingParams,
        out: &mut CudaSlice<f32>,
        row0: usize,
    ) -> Result<()> {
        let head = Head::Probs {
            out,
            params,
            next: row0,
        };
        self.run(Feed::Host(input), positions, cache, logits, mask, head)
    }

    /// As [`Self::forward`], but the argmax of each row stays on the device and only the
    /// token ids come back (greedy decoding copies nothing vocabulary-sized).
    pub fn forward_argmax(
        &self,
        input: Input,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let head = Head::Argmax(&mut out);
        self.run(Feed::Host(input), positions, cache, logits, mask, head)?;
        Ok(out)
    }

    /// As [`Self::forward`], but each row's distribution under `params` comes back instead
    /// of its logits (the softmax, top-k and top-p on the device: a T > 0 token tree's
    /// drafting, whose draws are the host's).
    pub fn forward_host_probs(
        &self,
        input: Input,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
        params: &SamplingParams,
    ) -> Result<Vec<f32>> {
        params.validate()?;
        let mut out = Vec::new();
        let head = Head::HostProbs { params, out: &mut out };
        self.run(Feed::Host(input), positions, cache, logits, mask, head)?;
        Ok(out)
    }

    /// As [`Self::forward`], but only each row's `k` ≤ [`MAX_TOP_K`] most likely tokens
    /// under the plain softmax come back, with their probabilities (best first, ties by
    /// lower id; fewer where the rest have probability 0): a T = 0 token tree's drafting.
    pub fn forward_top_k(
        &self,
        input: Input,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        if k == 0 || k > MAX_TOP_K {
            return Err(err("forward_top_k", format!("k = {k} (1 to {MAX_TOP_K})")));
        }
        let mut out = Vec::new();
        self.run(
            Feed::Host(input),
            positions,
            cache,
            logits,
            mask,
            Head::TopK { k, out: &mut out },
        )?;
        Ok(out)
    }

    /// As [`Self::forward`] (causal), but without the LM head: the tokens only go into
    /// the cache (a prompt segment whose logits nobody reads, such as the part of a
    /// Qwen2.5-VL prompt before its last span).
    pub fn extend(&self, input: Input, positions: Positions, cache: &mut CudaKvCache) -> Result<()> {
        self.run(Feed::Host(input), positions, cache, Logits::Last, None, Head::Skip)
    }

    /// The greedy next token after `tokens`, one i32 copied back.
    pub fn argmax_last(&self, tokens: &[u32], cache: &mut CudaKvCache) -> Result<u32> {
        let positions = next_positions(cache, tokens.len());
        let ids = self.forward_argmax(
            Input::Tokens(tokens),
            Positions::Seq(&positions),
            cache,
            Logits::Last,
            None,
        )?;
        ids.first().copied().ok_or_else(|| err("argmax_last", "no row"))
    }

    /// The tokens `input` holds.
    fn rows(&self, input: Feed) -> Result<usize> {
        let d = self.cfg.hidden_size;
        match input {
            Feed::Host(Input::Tokens(t)) => Ok(t.len()),
            Feed::Host(Input::Embeddings(e)) if e.len() % d == 0 => Ok(e.len() / d),
            Feed::Host(Input::Embeddings(e)) => Err(err(
                "forward",
                format!("{} embedding values are not rows of {d}", e.len()),
            )),
            Feed::Drafted(_) => Ok(1),
        }
    }

    fn run(
        &self,
        input: Feed,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
        head: Head,
    ) -> Result<()> {
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        self.run_in(&mut guard, input, positions, cache, logits, mask, head)
    }

    /// [`Self::run`] in the scratch `s`, locked by the caller.
    #[allow(clippy::too_many_arguments)]
    fn run_in(
        &self,
        s: &mut Scratch,
        input: Feed,
        positions: Positions,
        cache: &mut CudaKvCache,
        logits: Logits,
        mask: Option<TreeMask>,
        mut head: Head,
    ) -> Result<()> {
        const OP: &str = "forward";
        let c = &self.cfg;
        let d = c.hidden_size;
        let n = self.rows(input)?;
        if n == 0 {
            return Err(err(OP, "forward pass with no tokens"));
        }
        let (given, want) = match positions {
            Positions::Seq(p) => (p.len(), n),
            Positions::Multi(p) => (p.len(), 3 * n),
        };
        if given != want {
            return Err(err(OP, format!("{given} position values for {n} tokens")));
        }
        if matches!(positions, Positions::Multi(_)) && c.mrope_section.is_none() {
            return Err(err(OP, "3-D positions given to a model without mrope_section"));
        }
        if let Feed::Host(Input::Tokens(t)) = input {
            if let Some(&id) = t.iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: c.vocab_size,
                });
            }
        }
        if !Arc::ptr_eq(&cache.dev, &self.dev) || cache.layers != c.num_hidden_layers || cache.row != c.kv_dim() {
            return Err(err(
                OP,
                format!(
                    "the cache ({} layers of {} values per token) was not made for this model ({} of {}) on its device",
                    cache.layers,
                    cache.row,
                    c.num_hidden_layers,
                    c.kv_dim()
                ),
            ));
        }
        cache.reserve(n)?;
        let start = cache.len();
        if let Some(m) = mask {
            let span = (start + n).checked_sub(m.start).filter(|_| m.start <= start);
            if span.map(|s| s * n) != Some(m.allow.len()) {
                return Err(err(
                    OP,
                    format!(
                        "tree mask of {} entries from key {} does not fit {n} tokens after {start} cached",
                        m.allow.len(),
                        m.start
                    ),
                ));
            }
            if (0..c.num_hidden_layers).any(|l| c.layer_window(l).is_some()) {
                return Err(err(OP, "token trees are not supported with sliding-window attention"));
            }
            if n > MAX_TREE_BLOCK {
                return Err(err(OP, format!("a tree block of {n} tokens exceeds {MAX_TREE_BLOCK}")));
            }
            if s.mask.len() < m.allow.len() {
                s.mask = self.dev.alloc_zeros(m.allow.len())?;
            }
            self.dev.upload_into(m.allow, &mut s.mask.as_view_mut())?;
        }
        for b0 in (0..n).step_by(s.block) {
            let b1 = (b0 + s.block).min(n);
            let m = b1 - b0;
            let mut step_in = block_positions(positions, c.mrope_section.is_some(), n, b0, b1);
            let ids_at = step_in.len();
            if let Feed::Host(Input::Tokens(t)) = input {
                step_in.extend(t[b0..b1].iter().map(|&id| id as i32));
            }
            self.dev
                .upload_into(&step_in, &mut s.step_in.slice_mut(..step_in.len()))?;
            let table = self.embed.as_view();
            match input {
                Feed::Host(Input::Tokens(_)) => {
                    let ids = s.step_in.slice(ids_at..ids_at + m);
                    self.dev.embedding(&ids, &table, &mut s.hidden.as_view_mut(), m, d)?
                }
                Feed::Drafted(slot) => {
                    let ids = s.chain.slice(slot..slot + 1);
                    self.dev.embedding(&ids, &table, &mut s.hidden.as_view_mut(), m, d)?
                }
                Feed::Host(Input::Embeddings(e)) => {
                    self.dev.upload_into(&e[b0 * d..b1 * d], &mut s.embeds.as_view_mut())?;
                    self.dev
                        .f32_to_bf16(&s.embeds.as_view(), &mut s.hidden.as_view_mut(), m * d)?;
                }
            }
            self.layers(s, cache, At::Host(start + b0), m, mask.map(|m| m.start))?;
            if matches!(head, Head::Skip) {
                continue;
            }
            let rows = match logits {
                Logits::All => 0..m,
                Logits::Last if b1 == n => m - 1..m,
                Logits::Last => continue,
            };
            self.head(s, m, rows, &mut head)?;
        }
        cache.commit(n)?;
        Ok(())
    }
}

/// Whether a block of n tokens takes the GEMV kernels (which leave the residual stream
/// whole) rather than cuBLASLt (which leaves the last down_proj pending): `layers` and
/// `head` must agree.
fn gemv_block(n: usize) -> bool {
    n <= GEMV_MAX_ROWS
}

/// Positions cache.len().. for n tokens (text continuing the cache).
fn next_positions(cache: &CudaKvCache, n: usize) -> Vec<i32> {
    let start = cache.len() as i32;
    (start..start + n as i32).collect()
}

/// The rotary positions of tokens b0..b1 of a pass of n, as the rope launchers read them:
/// [b1 − b0], or [3, b1 − b0] under M-RoPE (text positions repeated on the three axes).
fn block_positions(positions: Positions, mrope: bool, n: usize, b0: usize, b1: usize) -> Vec<i32> {
    match positions {
        Positions::Seq(p) if mrope => p[b0..b1].repeat(3),
        Positions::Seq(p) => p[b0..b1].to_vec(),
        Positions::Multi(p) => (0..3).flat_map(|a| &p[a * n + b0..a * n + b1]).copied().collect(),
    }
}

/// The shapes the kernels serve (head dims of [`ATTN_HEAD_DIMS`], hidden and intermediate
/// sizes multiples of 8), checked before anything is uploaded; the error says which one
/// `c` misses.
pub fn check_served(c: &TextConfig) -> Result<()> {
    if !ATTN_HEAD_DIMS.contains(&c.head_dim) {
        return Err(err(
            "load",
            format!(
                "head_dim {} is not served by the attention kernels (head dims {ATTN_HEAD_DIMS:?})",
                c.head_dim
            ),
        ));
    }
    if c.hidden_size % 8 != 0 || c.intermediate_size % 8 != 0 {
        return Err(err(
            "load",
            format!(
                "hidden_size {} and intermediate_size {} must be multiples of 8 (the GEMV's 16-byte loads)",
                c.hidden_size, c.intermediate_size
            ),
        ));
    }
    Ok(())
}

/// `name` as bf16 after checking its shape: bf16 bits as stored, f32 / f16 rounded to
/// nearest, converted one tensor at a time (never the whole model in f32).
pub(crate) fn host_bf16(w: &Weights, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
    let t = w.get(name)?;
    if t.shape != shape {
        return Err(Error::ShapeMismatch {
            dir: w.dir().to_path_buf(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual: t.shape.to_vec(),
        });
    }
    Ok(match t.dtype {
        DType::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
            .collect(),
        DType::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32()))
            .collect(),
        DType::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
    })
}

/// w'[n, k] = w[n, k] · norm[k] for w: [N, K] (K = norm.len()), rounded to bf16 once: the
/// RMSNorm's weight folded into the projection that reads the norm's output.
fn fold_norm(mut w: Vec<bf16>, norm: &[bf16]) -> Vec<bf16> {
    // The inventory check gave every matrix [N, D] and every norm [D].
    debug_assert_eq!(w.len() % norm.len(), 0);
    for row in w.chunks_exact_mut(norm.len()) {
        for (x, g) in row.iter_mut().zip(norm) {
            *x = bf16::from_f32(x.to_f32() * g.to_f32());
        }
    }
    w
}
