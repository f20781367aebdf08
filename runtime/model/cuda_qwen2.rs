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
//! residual stream (cuda/gemv.cu's fusions), six launches a layer. A GEMM block norms
//! with unit weights (rmsnorm / rmsnorm_residual with `ones`) before its GEMMs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use half::{bf16, f16};

use super::qwen2::{expected_tensors, Logits, Names, Positions, TreeMask};
use crate::backend::cuda::{
    AttnScratch, AttnShape, CudaDevice, DeviceGraph, DeviceLen, GemvFuse, ATTN_HEAD_DIMS, GEMV_MAX_ROWS, MAX_TOP_K,
};
use crate::config::{self, TextConfig};
use crate::error::{Error, Result};
use crate::kv_cache::Extent;
use crate::sampling::SamplingParams;
use crate::weights::{DType, Weights};

/// Tokens per forward block by default ([`CudaQwen2::set_prefill_block`]): a prefill
/// runs in blocks of this many, and every block streams all the weights once, so short
/// blocks make a long prompt's prefill memory-bound (a 7B LM reads its 15 GB of weights
/// per block: at 64 tokens a block that alone is more time than the block's FLOPs; at
/// 512 the GEMMs are compute-bound). The scratch for 512 tokens of the 7B target is
/// about 85 MB.
pub const PREFILL_BLOCK: usize = 512;

/// The most tokens of a masked (tree) block: it runs as one block, its mask rows
/// indexing keys of the whole block.
pub const MAX_TREE_BLOCK: usize = 64;

/// Splits of K the GEMV scratch allows (short matrices of the small models need them to
/// fill the GPU).
const GEMV_SPLITS: usize = 8;
/// Splits of the keys the attention scratch allows (long contexts, few row tiles).
const ATTN_SPLITS: usize = 16;
/// Captured chains a model keeps ([`CudaQwen2::draft_chain`]): one and several tokens
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

/// What a captured chain baked in: it replays only while all of it is unchanged.
#[derive(PartialEq)]
struct ChainKey {
    gamma: usize,
    /// The first pass in the graph: 0, or 1 after a first pass run outside it.
    from: usize,
    /// The tokens the graph's first pass is fed (1 or 2; 1 from pass 1 on).
    fed: usize,
    /// The cache: its keys' address, capacity (the attention's splits) and values' address.
    cache: (u64, usize, u64),
    /// The scratch's ids and starts.
    ids: (u64, u64),
    /// A sampled chain's q rows and uniforms (addresses, lengths) and parameters' bits.
    sample: Option<(u64, usize, u64, usize, u32, usize, u32)>,
}

/// How [`CudaQwen2::draft_chain`] picks each draft on the device.
pub enum ChainPick<'a> {
    /// The argmax of the logits (T = 0).
    Argmax,
    /// A draw from the distribution under `params` (`probabilities` kernel), with the
    /// uniform `uniforms[i]` for draft i (`sample` kernel); draft i's distribution is
    /// left in row i of `q` ([γ, V]) for the verification.
    Sample {
        params: &'a SamplingParams,
        q: &'a mut CudaSlice<f32>,
        uniforms: &'a CudaSlice<f64>,
    },
}

impl ChainPick<'_> {
    /// The same pick for one pass.
    fn reborrow(&mut self) -> ChainPick<'_> {
        match self {
            ChainPick::Argmax => ChainPick::Argmax,
            ChainPick::Sample { params, q, uniforms } => ChainPick::Sample { params, q, uniforms },
        }
    }
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
    logits: CudaSlice<f32>,    // [GEMV_MAX_ROWS, V]
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
            logits: dev.alloc_zeros(GEMV_MAX_ROWS * c.vocab_size)?,
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

/// Where the head's rows go.
enum Head<'a> {
    Logits(&'a mut Vec<f32>),
    Argmax(&'a mut Vec<u32>),
    /// Each row's distribution under `params` (`probabilities` kernel), copied back.
    HostProbs {
        params: &'a SamplingParams,
        out: &'a mut Vec<f32>,
    },
    /// Each row's `k` most likely tokens with their probabilities (`top_k` kernel).
    TopK {
        k: usize,
        out: &'a mut Vec<Vec<(u32, f32)>>,
    },
    /// The processed distributions (`probabilities` kernel) into device rows, from row
    /// `next` of the buffer on: they never leave the device.
    Probs {
        out: &'a mut CudaSlice<f32>,
        params: &'a SamplingParams,
        next: usize,
    },
    /// The last row's draft ([`ChainPick`]) into slot `slot` of the scratch's `chain`:
    /// nothing is copied back.
    Chain {
        pick: ChainPick<'a>,
        slot: usize,
    },
    /// Nowhere: the head is not run.
    Skip,
}

pub struct CudaQwen2 {
    pub cfg: TextConfig,
    dev: Arc<CudaDevice>,
    embed: CudaSlice<bf16>, // [V, D]
    layers: Vec<Layer>,
    norm: CudaSlice<bf16>,            // [D]
    ones: CudaSlice<bf16>,            // [D] the folded norms' weight in a GEMM block
    lm_head: Option<CudaSlice<bf16>>, // [V, D]; None when tied to `embed`
    /// Behind a lock so the model is shared read-only, as the CPU model is.
    scratch: Mutex<Scratch>,
    /// Whether a drafted chain's passes replay as one CUDA graph ([`Self::set_graphs`]);
    /// off for models whose passes a graph cannot serve.
    graphs: AtomicBool,
    /// Why a capture failed, when one did (graphs are then off).
    graph_failure: Mutex<Option<String>>,
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
            norm: up(host(&format!("{}norm.weight", names.prefix))?)?,
            ones: up(vec![bf16::ONE; cfg.hidden_size])?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(up(host("lm_head.weight")?)?)
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

    /// Turns the CUDA graph of drafted chains on or off (on by default where it serves:
    /// 1-D RoPE, no sliding window; MASSV_CUDA_GRAPHS=0 starts it off). Either way the
    /// drafts are the same.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on && graphs_serve(&self.cfg), Ordering::Relaxed);
    }

    /// Whether drafted chains replay as a CUDA graph, or why not.
    pub fn graph_status(&self) -> std::result::Result<(), String> {
        if let Some(why) = self.graph_failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(format!("capturing a chain failed: {why}"));
        }
        if !graphs_serve(&self.cfg) {
            return Err("M-RoPE or sliding-window models draft without graphs".into());
        }
        if !self.graphs.load(Ordering::Relaxed) {
            return Err("turned off (MASSV_CUDA_GRAPHS=0 or set_graphs)".into());
        }
        Ok(())
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

    /// Drafts a chain of `gamma` tokens: `first` after the cache's committed positions,
    /// then each draft fed back, every pass at the next 1-D positions and committed. Each
    /// draft is picked on the device ([`ChainPick`]) into an id buffer the next pass's
    /// embedding reads, so the host queues all γ passes without waiting for one and a
    /// single copy brings the γ ids back (a pass-by-pass loop waits γ times, and the
    /// GPU idles while the host queues each next pass: a small drafter's step is mostly
    /// launch time). Where graphs serve ([`Self::set_graphs`]) the passes replay as one
    /// CUDA graph, one launch instead of about 6 a layer each: all of them when one or two
    /// tokens are fed (a correction, or the last draft and the bonus after a chain was
    /// accepted whole), those after the first when more are.
    pub fn draft_chain(
        &self,
        first: Input,
        cache: &mut CudaKvCache,
        gamma: usize,
        mut pick: ChainPick,
    ) -> Result<Vec<u32>> {
        const OP: &str = "draft_chain";
        if gamma == 0 {
            return Ok(Vec::new());
        }
        let v = self.cfg.vocab_size;
        if let ChainPick::Sample { q, uniforms, .. } = &pick {
            if q.len() < gamma * v || uniforms.len() < gamma {
                return Err(err(
                    OP,
                    format!(
                        "{gamma} drafts of a {v}-token vocabulary need {} q values and {gamma} uniforms, given {} and {}",
                        gamma * v,
                        q.len(),
                        uniforms.len()
                    ),
                ));
            }
        }
        // The scratch stays locked for the whole chain: its ids live there between passes,
        // where another request's pass would overwrite them.
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        if s.chain.len() < gamma {
            s.chain = self.dev.alloc_zeros(gamma)?;
        }
        let mut feed = Feed::Host(first);
        let mut plain = 0..gamma;
        let kind = usize::from(matches!(pick, ChainPick::Sample { .. }));
        // One or two tokens fed (the usual cases) are read on the device with the drafts,
        // so the graph holds every pass; else the first runs here, the rest in a graph.
        let fed = match first {
            Input::Tokens(t) if t.len() <= 2 && t.iter().all(|&id| (id as usize) < v) => t,
            _ => &[],
        };
        let whole = !fed.is_empty() && (fed.len() == 1 || s.pair_warm);
        if s.chain_warm[kind] && self.graphs.load(Ordering::Relaxed) && (whole || gamma > 1) {
            if !whole {
                self.chain_pass(s, feed, cache, 0, pick.reborrow())?;
                plain = 1..gamma;
                feed = Feed::Drafted(0);
            }
            if self.chain_graph(s, cache, gamma, whole.then_some(fed), pick.reborrow())? {
                plain = 0..0;
            }
        }
        for slot in plain {
            self.chain_pass(s, feed, cache, slot, pick.reborrow())?;
            feed = Feed::Drafted(slot);
        }
        let ids = self.dev.download(&s.chain.slice(..gamma))?;
        Ok(ids.into_iter().map(|id| id as u32).collect())
    }

    /// Pass `slot` of a chain launched here (not from a graph), fed `feed`; marks the
    /// kernels it loaded as warm for a capture.
    fn chain_pass(
        &self,
        s: &mut Scratch,
        feed: Feed,
        cache: &mut CudaKvCache,
        slot: usize,
        pick: ChainPick,
    ) -> Result<()> {
        let n = self.rows(feed)?;
        let kind = usize::from(matches!(pick, ChainPick::Sample { .. }));
        let positions = next_positions(cache, n);
        let head = Head::Chain { pick, slot };
        self.run_in(s, feed, Positions::Seq(&positions), cache, Logits::Last, None, head)?;
        s.chain_warm[kind] |= slot > 0;
        s.pair_warm |= n == 2 && matches!(feed, Feed::Host(Input::Tokens(_)));
        Ok(())
    }

    /// The passes of a chain from its first (fed `first`, one or two tokens) or, with
    /// `first` None, from its second (the first ran): fed the previous draft, at the next
    /// positions, committed; replayed as one CUDA graph, captured on the first such chain
    /// after one ran pass by pass (with the same kind of pick and first pass) and again
    /// when what it baked in changes ([`ChainKey`]). Ok(false): the capture failed (graphs
    /// are then off for this model, the reason kept for [`Self::graph_status`]) and
    /// nothing ran.
    fn chain_graph(
        &self,
        s: &mut Scratch,
        cache: &mut CudaKvCache,
        gamma: usize,
        first: Option<&[u32]>,
        pick: ChainPick,
    ) -> Result<bool> {
        let from = usize::from(first.is_none());
        let fed = first.map_or(1, <[u32]>::len);
        let n = gamma - from + fed - 1;
        cache.reserve(n)?;
        let at_len = gamma + 2 * fed - 1;
        if s.chain_at.len() < at_len {
            s.chain_at = self.dev.alloc_zeros(at_len)?;
        }
        // chain_at ([`Scratch::chain_at`]): token j's position base + j (pass 0 of a chain
        // run whole at base = the cache's length), then the tokens fed; one upload.
        let base = i32::try_from(cache.len()).map_err(|_| err("draft_chain", "cache length exceeds i32"))?;
        let mut chain_in: Vec<i32> = (0..(gamma + fed - 1) as i32).map(|j| base + j - from as i32).collect();
        chain_in.extend(first.unwrap_or(&[0]).iter().map(|&id| id as i32));
        self.dev
            .upload_into(&chain_in, &mut s.chain_at.slice_mut(..chain_in.len()))?;
        let stream = self.dev.stream();
        let addr = |p: (u64, _)| p.0;
        let key = ChainKey {
            gamma,
            from,
            fed,
            cache: (
                addr(cache.k.device_ptr(stream)),
                cache.capacity(),
                addr(cache.v.device_ptr(stream)),
            ),
            ids: (addr(s.chain.device_ptr(stream)), addr(s.chain_at.device_ptr(stream))),
            sample: match &pick {
                ChainPick::Argmax => None,
                ChainPick::Sample { params, q, uniforms } => Some((
                    addr(q.device_ptr(stream)),
                    q.len(),
                    addr(uniforms.device_ptr(stream)),
                    uniforms.len(),
                    params.temperature.to_bits(),
                    params.top_k,
                    params.top_p.to_bits(),
                )),
            },
        };
        let found = s.chain_graphs.iter().position(|(k, _)| *k == key);
        if found.is_none() {
            if s.chain_graphs.len() == CHAIN_GRAPHS {
                s.chain_graphs.remove(0);
            }
            let mut pick = pick;
            let captured = self.dev.capture(|| {
                for slot in from..gamma {
                    self.pass_at(s, cache, gamma, fed, slot, pick.reborrow())?;
                }
                Ok(())
            });
            match captured {
                Ok(graph) => s.chain_graphs.push((key, graph)),
                Err(e) => {
                    self.graphs.store(false, Ordering::Relaxed);
                    *self.graph_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return Ok(false);
                }
            }
        }
        let at = found.unwrap_or(s.chain_graphs.len() - 1);
        self.dev.launch_graph(&s.chain_graphs[at].1)?;
        cache.commit(n)?;
        Ok(true)
    }

    /// Pass `slot` of a chain as a graph holds it, its positions read on the device
    /// ([`Scratch::chain_at`]): the draft of slot − 1, or for slot 0 the `fed` tokens
    /// uploaded; its draft into slot `slot`.
    fn pass_at(
        &self,
        s: &mut Scratch,
        cache: &mut CudaKvCache,
        gamma: usize,
        fed: usize,
        slot: usize,
        pick: ChainPick,
    ) -> Result<()> {
        let d = self.cfg.hidden_size;
        let (ids, n, at) = match slot {
            0 => (s.chain_at.slice(gamma + fed - 1..gamma + 2 * fed - 1), fed, 0),
            _ => (s.chain.slice(slot - 1..slot), 1, slot + fed - 1),
        };
        self.dev
            .embedding(&ids, &self.embed.as_view(), &mut s.hidden.as_view_mut(), n, d)?;
        self.layers(s, cache, At::Device(at), n, None)?;
        self.head(s, n, n - 1..n, &mut Head::Chain { pick, slot })
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

    /// The decoder layers on the block of n tokens in `s.hidden`, at cache positions
    /// start.. (their keys and values written there), rotary positions at the head of
    /// `s.step_in` (or, for [`At::Device`], a few tokens whose start and positions are
    /// read on the device). A GEMV block (n ≤ GEMV_MAX_ROWS) leaves the residual stream whole in
    /// `s.hidden`; a GEMM block leaves the last layer's down_proj output in `s.proj`, not
    /// yet added ([`Self::head`] takes either).
    fn layers(
        &self,
        s: &mut Scratch,
        cache: &mut CudaKvCache,
        at: At,
        n: usize,
        mask_start: Option<usize>,
    ) -> Result<()> {
        let (dev, c) = (&*self.dev, &self.cfg);
        let (start, on_device) = match at {
            At::Host(start) => (start, None),
            At::Device(i) if gemv_block(n) && mask_start.is_none() && graphs_serve(c) => (0, Some(i)),
            At::Device(_) => return Err(err("forward", "a start on the device serves a few 1-D causal tokens")),
        };
        let capacity = cache.capacity();
        let (d, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (eps, theta) = (c.rms_norm_eps as f32, c.rope_theta as f32);
        let qkv_width = qd + 2 * kvd;
        let pos_len = if c.mrope_section.is_some() { 3 * n } else { n };
        let shape = AttnShape {
            n,
            start,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
        };
        let gemv = gemv_block(n);
        let ones = self.ones.as_view();
        for (l, w) in self.layers.iter().enumerate() {
            let (wv, bv) = (w.qkv_w.as_view(), w.qkv_b.as_view());
            let mut qkv = s.qkv.slice_mut(..n * qkv_width);
            if gemv {
                let (x, mut sv) = (s.hidden.slice(..n * d), s.gemv.as_view_mut());
                let fuse = GemvFuse::rms(eps);
                dev.gemv_bf16(&x, &wv, Some(&bv), &mut qkv, Some(&mut sv), n, qkv_width, d, fuse)?;
            } else {
                let mut normed = s.normed.slice_mut(..n * d);
                if l == 0 {
                    dev.rmsnorm(&s.hidden.slice(..n * d), &ones, &mut normed, n, d, eps)?;
                } else {
                    let mut hidden = s.hidden.slice_mut(..n * d);
                    dev.rmsnorm_residual(&s.proj.slice(..n * d), &mut hidden, &ones, &mut normed, n, d, eps)?;
                }
                dev.linear(&s.normed.slice(..n * d), &wv, Some(&bv), &mut qkv, n, qkv_width, d)?;
            }
            {
                let (mut kc, mut vc) = cache.layer_mut(l);
                let qkv = s.qkv.slice(..n * qkv_width);
                let mut q = s.q.slice_mut(..n * qd);
                match on_device {
                    None => {
                        let pos = s.step_in.slice(..pos_len);
                        dev.rope_kv_append(
                            &qkv,
                            &pos,
                            &mut q,
                            &mut kc,
                            &mut vc,
                            shape,
                            theta,
                            c.mrope_section,
                            None,
                        )?
                    }
                    Some(i) => {
                        let (pos, at) = (s.chain_at.slice(i..i + n), s.chain_at.slice(i..i + 1));
                        let len = DeviceLen { at: &at, capacity };
                        dev.rope_kv_append(&qkv, &pos, &mut q, &mut kc, &mut vc, shape, theta, None, Some(len))?
                    }
                }
            }
            let (kc, vc) = cache.layer(l);
            let q = s.q.slice(..n * qd);
            let mut out = s.attn.slice_mut(..n * qd);
            match (mask_start, c.layer_window(l), on_device) {
                (None, None, Some(i)) => {
                    let at = s.chain_at.slice(i..i + 1);
                    let len = DeviceLen { at: &at, capacity };
                    let sc = &mut s.attn_split;
                    if n == 1 {
                        dev.attention_decode_at(&q, &kc, &vc, &mut out, len, hq, hkv, hd, sc)?
                    } else {
                        dev.attention_prefill_at(&q, &kc, &vc, &mut out, len, n, hq, hkv, hd, sc)?
                    }
                }
                (Some(ms), _, _) => {
                    dev.attention_verify(&q, &kc, &vc, &mut out, &s.mask.as_view(), ms, shape, &mut s.attn_split)?
                }
                (None, None, _) if n == 1 => {
                    dev.attention_decode(&q, &kc, &vc, &mut out, start + 1, hq, hkv, hd, &mut s.attn_split)?
                }
                (None, window, _) => {
                    dev.attention_prefill(&q, &kc, &vc, &mut out, shape, window, Some(&mut s.attn_split))?
                }
            }
            let attn = s.attn.slice(..n * qd);
            let mut act = s.act.slice_mut(..n * inter);
            if gemv {
                let mut hidden = s.hidden.slice_mut(..n * d);
                let o_w = w.o_w.as_view();
                let mut sv = s.gemv.as_view_mut();
                dev.gemv_bf16(&attn, &o_w, None, &mut hidden, Some(&mut sv), n, d, qd, GemvFuse::ADD)?;
                let (x, mut sv) = (s.hidden.slice(..n * d), s.gemv.as_view_mut());
                dev.gemv_swiglu(
                    &x,
                    &w.gate_up_w.as_view(),
                    &mut act,
                    Some(&mut sv),
                    n,
                    inter,
                    d,
                    Some(eps),
                )?;
                let (act, mut hidden) = (s.act.slice(..n * inter), s.hidden.slice_mut(..n * d));
                let down_w = w.down_w.as_view();
                let mut sv = s.gemv.as_view_mut();
                dev.gemv_bf16(
                    &act,
                    &down_w,
                    None,
                    &mut hidden,
                    Some(&mut sv),
                    n,
                    d,
                    inter,
                    GemvFuse::ADD,
                )?;
            } else {
                dev.linear(&attn, &w.o_w.as_view(), None, &mut s.proj.slice_mut(..n * d), n, d, qd)?;
                let (mut hidden, mut normed) = (s.hidden.slice_mut(..n * d), s.normed.slice_mut(..n * d));
                dev.rmsnorm_residual(&s.proj.slice(..n * d), &mut hidden, &ones, &mut normed, n, d, eps)?;
                let (x, mut gu) = (s.normed.slice(..n * d), s.gate_up.slice_mut(..n * 2 * inter));
                dev.linear(&x, &w.gate_up_w.as_view(), None, &mut gu, n, 2 * inter, d)?;
                dev.swiglu(&s.gate_up.slice(..n * 2 * inter), &mut act, n, inter)?;
                let (act, mut proj) = (s.act.slice(..n * inter), s.proj.slice_mut(..n * d));
                dev.linear(&act, &w.down_w.as_view(), None, &mut proj, n, d, inter)?;
            }
        }
        Ok(())
    }

    /// Final norm of `rows` of a block of n (after the pending residual add of a GEMM
    /// block, see [`Self::layers`]), then the LM head on them in groups of GEMV rows:
    /// logits copied back, or their argmax.
    fn head(&self, s: &mut Scratch, n: usize, rows: std::ops::Range<usize>, out: &mut Head) -> Result<()> {
        let (dev, c) = (&*self.dev, &self.cfg);
        let (d, v, eps) = (c.hidden_size, c.vocab_size, c.rms_norm_eps as f32);
        let (r0, r1) = (rows.start, rows.end);
        {
            let (norm, span) = (self.norm.as_view(), r0 * d..r1 * d);
            let mut normed = s.normed.slice_mut(span.clone());
            if gemv_block(n) {
                dev.rmsnorm(&s.hidden.slice(span), &norm, &mut normed, r1 - r0, d, eps)?;
            } else {
                let mut hidden = s.hidden.slice_mut(span.clone());
                dev.rmsnorm_residual(&s.proj.slice(span), &mut hidden, &norm, &mut normed, r1 - r0, d, eps)?;
            }
        }
        let w = self.lm_head.as_ref().unwrap_or(&self.embed).as_view();
        for g0 in (r0..r1).step_by(GEMV_MAX_ROWS) {
            let g1 = (g0 + GEMV_MAX_ROWS).min(r1);
            let g = g1 - g0;
            let x = s.normed.slice(g0 * d..g1 * d);
            let mut y = s.logits.slice_mut(..g * v);
            let mut sv = s.gemv.as_view_mut();
            dev.gemv_bf16_f32(&x, &w, None, &mut y, Some(&mut sv), g, v, d, GemvFuse::NONE)?;
            match out {
                Head::Logits(o) => o.extend(dev.download(&s.logits.slice(..g * v))?),
                Head::Argmax(_) => dev.argmax(&s.logits.slice(..g * v), &mut s.argmax.slice_mut(g0..g1), g, v)?,
                Head::HostProbs { params, out } => {
                    dev.probabilities(&s.logits.slice(..g * v), &mut s.probs.slice_mut(..g * v), g, v, params)?;
                    out.extend(dev.download(&s.probs.slice(..g * v))?);
                }
                Head::TopK { k, .. } => dev.top_k(
                    &s.logits.slice(..g * v),
                    &mut s.top_ids.slice_mut(g0 * *k..g1 * *k),
                    &mut s.top_probs.slice_mut(g0 * *k..g1 * *k),
                    g,
                    v,
                    *k,
                )?,
                Head::Probs { out, params, next } => {
                    let (a, b) = (*next * v, (*next + g) * v);
                    if b > out.len() {
                        return Err(err(
                            "forward_probs",
                            format!("{} output rows of {v} hold fewer than row {}", out.len() / v, *next + g),
                        ));
                    }
                    dev.probabilities(&s.logits.slice(..g * v), &mut out.slice_mut(a..b), g, v, params)?;
                    *next += g;
                }
                Head::Chain { pick, slot } => {
                    // Only the last row's logits reach a chain's head (Logits::Last).
                    let mut id = s.chain.slice_mut(*slot..*slot + 1);
                    match pick {
                        ChainPick::Argmax => dev.argmax(&s.logits.slice(..v), &mut id, 1, v)?,
                        ChainPick::Sample { params, q, uniforms } => {
                            let row = *slot * v..(*slot + 1) * v;
                            dev.probabilities(&s.logits.slice(..v), &mut q.slice_mut(row.clone()), 1, v, params)?;
                            let u = uniforms.slice(*slot..*slot + 1);
                            dev.sample(&q.slice(row), &u, &mut id, 1, v)?;
                        }
                    }
                }
                Head::Skip => {}
            }
        }
        match out {
            Head::Argmax(o) => o.extend(dev.download(&s.argmax.slice(r0..r1))?.iter().map(|&i| i as u32)),
            Head::TopK { k, out } => {
                let ids = dev.download(&s.top_ids.slice(r0 * *k..r1 * *k))?;
                let probs = dev.download(&s.top_probs.slice(r0 * *k..r1 * *k))?;
                for (ri, rp) in ids.chunks_exact(*k).zip(probs.chunks_exact(*k)) {
                    // Ids past the row's last non-zero probability are -1.
                    let row = ri
                        .iter()
                        .zip(rp)
                        .map_while(|(&i, &p)| u32::try_from(i).ok().map(|i| (i, p)));
                    out.push(row.collect());
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Whether a drafted chain's passes can replay as one CUDA graph: each reads its start
/// on the device as its one 1-D position (not M-RoPE's three), and no layer's window
/// moves with the length.
fn graphs_serve(c: &TextConfig) -> bool {
    c.mrope_section.is_none() && (0..c.num_hidden_layers).all(|l| c.layer_window(l).is_none())
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

/// [`crate::kv_cache::KvCache`] on the device: `capacity` positions per layer, the first
/// `len` committed; rollback is a length change, tree compaction one kv_compact launch
/// for the keys of every layer and one for the values. `try_clone` copies it on the
/// device (no `Clone`: cudarc's would panic when the device is out of memory).
pub struct CudaKvCache {
    dev: Arc<CudaDevice>,
    /// [layers, capacity, row] keys and values: one allocation each, so that one
    /// kv_compact launch moves a tensor's rows in every layer.
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    path: CudaSlice<i32>, // [capacity]: the rows kv_compact gathers
    layers: usize,
    row: usize,
    extent: Extent,
}

impl Drop for CudaKvCache {
    fn drop(&mut self) {
        self.dev.current_for_drop();
    }
}

impl CudaKvCache {
    /// A copy on the device (speculation from a saved state); fails when memory runs out.
    pub fn try_clone(&self) -> Result<Self> {
        let dup = |src: &CudaSlice<bf16>| -> Result<CudaSlice<bf16>> {
            let mut dst = self.dev.alloc_zeros::<bf16>(src.len())?;
            self.dev.copy(&src.as_view(), &mut dst.as_view_mut())?;
            Ok(dst)
        };
        Ok(CudaKvCache {
            dev: Arc::clone(&self.dev),
            k: dup(&self.k)?,
            v: dup(&self.v)?,
            path: self.dev.alloc_zeros::<i32>(self.capacity().max(1))?,
            layers: self.layers,
            row: self.row,
            extent: self.extent,
        })
    }

    pub fn new(dev: Arc<CudaDevice>, layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let row = kv_heads * head_dim;
        if i32::try_from(capacity).is_err() {
            return Err(err("kv cache", format!("capacity {capacity} exceeds i32")));
        }
        let total = layers
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(row))
            .ok_or_else(|| err("kv cache", format!("{layers} layers × {capacity} positions overflow")))?;
        Ok(CudaKvCache {
            k: dev.alloc_zeros(total)?,
            v: dev.alloc_zeros(total)?,
            path: dev.alloc_zeros(capacity)?,
            dev,
            layers,
            row,
            extent: Extent::new(capacity),
        })
    }

    pub fn len(&self) -> usize {
        self.extent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extent.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.extent.capacity()
    }

    /// Fails unless `n` more tokens fit.
    pub fn reserve(&self, n: usize) -> Result<()> {
        self.extent.reserve(n)
    }

    /// Makes the `n` rows written after the committed ones part of the cache.
    pub fn commit(&mut self, n: usize) -> Result<()> {
        self.extent.commit(n)
    }

    /// Forgets every token at position `len` and after.
    pub fn rollback_to(&mut self, len: usize) -> Result<()> {
        self.extent.rollback_to(len)
    }

    /// Keeps, after the first `dst` tokens, the tokens at positions `keep` (ascending, each
    /// at least `dst`) in that order: [`crate::kv_cache::KvCache::compact`].
    pub fn compact(&mut self, dst: usize, keep: &[usize]) -> Result<()> {
        let path = compact_path(self.len(), dst, keep)?;
        if !path.is_empty() {
            self.dev.upload_into(&path, &mut self.path.as_view_mut())?;
            let stride = self.capacity() * self.row;
            for cache in [&mut self.k, &mut self.v] {
                let p = self.path.slice(..path.len());
                let (m, row) = (path.len(), self.row);
                self.dev
                    .kv_compact(&mut cache.as_view_mut(), &p, m, dst, row, self.layers, stride)?;
            }
        }
        self.extent.compact(dst, keep)
    }

    /// Keys and values of the committed tokens of `layer`, as f32 (tests, diagnostics).
    pub fn layer_to_host(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if layer >= self.layers {
            return Err(err("kv cache", format!("layer {layer} of {}", self.layers)));
        }
        let (k, v) = self.layer(layer);
        let e = self.len() * self.row;
        let f = |x: Vec<bf16>| x.iter().map(|v| v.to_f32()).collect();
        Ok((
            f(self.dev.download(&k.slice(..e))?),
            f(self.dev.download(&v.slice(..e))?),
        ))
    }

    fn layer(&self, l: usize) -> (CudaView<'_, bf16>, CudaView<'_, bf16>) {
        let at = l * self.capacity() * self.row..(l + 1) * self.capacity() * self.row;
        (self.k.slice(at.clone()), self.v.slice(at))
    }

    fn layer_mut(&mut self, l: usize) -> (CudaViewMut<'_, bf16>, CudaViewMut<'_, bf16>) {
        let at = l * self.capacity() * self.row..(l + 1) * self.capacity() * self.row;
        (self.k.slice_mut(at.clone()), self.v.slice_mut(at))
    }
}

/// The source rows kv_compact gathers for `compact(dst, keep)` on a cache of `len`
/// tokens, after the same checks as every cache ([`Extent::compact`]).
pub fn compact_path(len: usize, dst: usize, keep: &[usize]) -> Result<Vec<i32>> {
    let mut extent = Extent::new(len);
    extent.commit(len)?;
    extent.compact(dst, keep)?;
    keep.iter()
        .map(|&p| i32::try_from(p).map_err(|_| err("kv_compact", format!("position {p} exceeds i32"))))
        .collect()
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
