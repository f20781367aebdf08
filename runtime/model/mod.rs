//! Model definitions, one file per architecture, and [`Target`]: whichever architecture
//! a model directory holds, behind one prefill / decode interface, its language model on
//! the CPU or on a CUDA device ([`Lm`], with its KV cache a [`Cache`] of the same kind).

pub mod cuda_projector;
pub mod cuda_qwen2;
pub mod cuda_vision;
pub mod projector;
pub mod qwen2;
pub mod qwen2_5_vl;

use std::path::Path;

use crate::backend::cuda::MAX_TOP_K;
use crate::backend::{Device, DeviceRequest};
use crate::config::{self, read_json_object, TextConfig};
use crate::error::{Error, Result};
use crate::generate::argmax;
use crate::image::Preprocessed;
use crate::kv_cache::KvCache;
use crate::reference;
use crate::sampling::{probabilities, SamplingParams};
use cuda_qwen2::{CudaKvCache, CudaQwen2, Input};
use cudarc::driver::CudaSlice;
use qwen2::{Logits, Positions, Qwen2, TreeMask};
use qwen2_5_vl::{Qwen25Vl, VisionOutput};

/// A Qwen2 decoder LM on the CPU (f32, the reference) or on a CUDA device (bf16 weights
/// and activations, f32 logits): the target's LM. Either way its logits come back as
/// host f32 rows.
#[allow(clippy::large_enum_variant)] // one per process, never moved in a hot path
pub enum Lm {
    Cpu(Qwen2),
    Cuda(CudaQwen2),
}

/// The KV cache of an [`Lm`], where that LM runs.
pub enum Cache {
    Cpu(KvCache),
    Cuda(CudaKvCache),
}

/// A mutable borrow of a cache of either kind: what [`Lm::forward`] and the Qwen2.5-VL
/// passes take, so they accept a [`Cache`] as well as a bare [`KvCache`] or [`CudaKvCache`].
pub enum CacheMut<'a> {
    Cpu(&'a mut KvCache),
    Cuda(&'a mut CudaKvCache),
}

impl<'a> From<&'a mut KvCache> for CacheMut<'a> {
    fn from(c: &'a mut KvCache) -> Self {
        CacheMut::Cpu(c)
    }
}

impl<'a> From<&'a mut CudaKvCache> for CacheMut<'a> {
    fn from(c: &'a mut CudaKvCache) -> Self {
        CacheMut::Cuda(c)
    }
}

impl<'a> From<&'a mut Cache> for CacheMut<'a> {
    fn from(c: &'a mut Cache) -> Self {
        match c {
            Cache::Cpu(c) => CacheMut::Cpu(c),
            Cache::Cuda(c) => CacheMut::Cuda(c),
        }
    }
}

impl CacheMut<'_> {
    /// A shorter borrow of the same cache (to pass it on and keep using it).
    pub fn reborrow(&mut self) -> CacheMut<'_> {
        match self {
            CacheMut::Cpu(c) => CacheMut::Cpu(c),
            CacheMut::Cuda(c) => CacheMut::Cuda(c),
        }
    }

    /// Committed tokens.
    pub fn len(&self) -> usize {
        match self {
            CacheMut::Cpu(c) => c.len(),
            CacheMut::Cuda(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fails unless `n` more tokens fit.
    pub fn reserve(&self, n: usize) -> Result<()> {
        match self {
            CacheMut::Cpu(c) => c.reserve(n),
            CacheMut::Cuda(c) => c.reserve(n),
        }
    }

    /// Forgets every token at position `len` and after.
    pub fn rollback_to(&mut self, len: usize) -> Result<()> {
        match self {
            CacheMut::Cpu(c) => c.rollback_to(len),
            CacheMut::Cuda(c) => c.rollback_to(len),
        }
    }
}

impl Cache {
    pub fn device(&self) -> Device {
        match self {
            Cache::Cpu(_) => Device::Cpu,
            Cache::Cuda(_) => Device::Cuda,
        }
    }

    /// Committed tokens.
    pub fn len(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.len(),
            Cache::Cuda(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        match self {
            Cache::Cpu(c) => c.capacity(),
            Cache::Cuda(c) => c.capacity(),
        }
    }

    /// Forgets every token at position `len` and after (a rejected draft).
    pub fn rollback_to(&mut self, len: usize) -> Result<()> {
        match self {
            Cache::Cpu(c) => c.rollback_to(len),
            Cache::Cuda(c) => c.rollback_to(len),
        }
    }

    /// Keeps, after the first `dst` tokens, the tokens at positions `keep` (ascending, each
    /// at least `dst`) in that order: a verified tree's accepted path ([`KvCache::compact`]).
    pub fn compact(&mut self, dst: usize, keep: &[usize]) -> Result<()> {
        match self {
            Cache::Cpu(c) => c.compact(dst, keep),
            Cache::Cuda(c) => c.compact(dst, keep),
        }
    }

    /// A copy (on the device for a device cache; an error when its memory runs out).
    pub fn try_clone(&self) -> Result<Cache> {
        Ok(match self {
            Cache::Cpu(c) => Cache::Cpu(c.clone()),
            Cache::Cuda(c) => Cache::Cuda(c.try_clone()?),
        })
    }

    /// Keys and values of the committed tokens of `layer` of a CPU cache (tests,
    /// diagnostics); a device cache has no host copy to borrow: [`Cache::layer_to_host`].
    pub fn layer(&self, layer: usize) -> Result<(&[f32], &[f32])> {
        match self {
            Cache::Cpu(c) => Ok(c.layer(layer)),
            Cache::Cuda(_) => Err(Error::InvalidArgument(
                "Cache::layer on a CUDA cache: use layer_to_host".into(),
            )),
        }
    }

    /// Keys and values of the committed tokens of `layer` as host f32, from either kind.
    pub fn layer_to_host(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Cache::Cpu(c) => {
                let (k, v) = c.layer(layer);
                Ok((k.to_vec(), v.to_vec()))
            }
            Cache::Cuda(c) => c.layer_to_host(layer),
        }
    }
}

impl Lm {
    /// Loads a Qwen2 causal-LM directory on `device` (for CUDA: a context on the first
    /// GPU, an error naming the reason where there is none or the shapes are not served).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Ok(match device {
            Device::Cpu => Lm::Cpu(Qwen2::load(dir)?),
            Device::Cuda => Lm::Cuda(CudaQwen2::open(dir)?),
        })
    }

    pub fn cfg(&self) -> &TextConfig {
        match self {
            Lm::Cpu(m) => &m.cfg,
            Lm::Cuda(m) => &m.cfg,
        }
    }

    /// Where this LM runs and, on a GPU, how its kernels are launched: which GPU, whether
    /// drafted chains replay as CUDA graphs (`graph_status`) and whether launches are
    /// programmatic (`CudaDevice::set_pdl`). For reports such as `massv generate --json`,
    /// so that timings can be told apart by launch mode.
    pub fn placement(&self) -> serde_json::Value {
        match self {
            Lm::Cpu(_) => serde_json::json!({"device": "cpu"}),
            Lm::Cuda(m) => serde_json::json!({
                "device": "cuda",
                "gpu": m.device().info().name,
                "graphs": m.graph_status().is_ok(),
                "pdl": m.device().pdl(),
            }),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Lm::Cpu(_) => Device::Cpu,
            Lm::Cuda(_) => Device::Cuda,
        }
    }

    /// A cache of `capacity` positions where this LM runs.
    pub fn new_cache(&self, capacity: usize) -> Result<Cache> {
        Ok(match self {
            Lm::Cpu(m) => Cache::Cpu(m.new_cache(capacity)),
            Lm::Cuda(m) => Cache::Cuda(m.new_cache(capacity)?),
        })
    }

    /// `input` at rotary `positions` after the cache's committed tokens, causal unless
    /// `mask` is given ([`Qwen2::forward_masked`]); commits the tokens and returns
    /// [rows, V] logits. The cache must be of this LM's kind.
    pub fn forward<'c>(
        &self,
        input: Input,
        positions: Positions,
        cache: impl Into<CacheMut<'c>>,
        logits: Logits,
        mask: Option<TreeMask>,
    ) -> Result<Vec<f32>> {
        match (self, cache.into()) {
            (Lm::Cpu(m), CacheMut::Cpu(c)) => {
                let hidden = match input {
                    Input::Tokens(t) => m.embed(t)?,
                    Input::Embeddings(e) => e.to_vec(),
                };
                m.forward_masked(hidden, positions, c, logits, mask)
            }
            (Lm::Cuda(m), CacheMut::Cuda(c)) => m.forward(input, positions, c, logits, mask),
            (lm, _) => Err(Error::InvalidArgument(format!(
                "a forward pass of the LM on the {} was given a cache of the other device",
                lm.device().name()
            ))),
        }
    }

    /// [`Lm::forward`] handing back each row's argmax instead of its logits (first index
    /// of the maximum): on a device the argmax runs there and only ids cross; on the CPU it
    /// is the host argmax of the same logits.
    pub fn forward_argmax<'c>(
        &self,
        input: Input,
        positions: Positions,
        cache: impl Into<CacheMut<'c>>,
        logits: Logits,
        mask: Option<TreeMask>,
    ) -> Result<Vec<u32>> {
        match (self, cache.into()) {
            (Lm::Cuda(m), CacheMut::Cuda(c)) => m.forward_argmax(input, positions, c, logits, mask),
            (lm, c) => {
                let rows = lm.forward(input, positions, c, logits, mask)?;
                let v = lm.cfg().vocab_size;
                Ok(rows.chunks_exact(v).map(|r| argmax(r) as u32).collect())
            }
        }
    }

    /// [`Lm::forward`] handing back each row's distribution under `params`
    /// (`sampling::probabilities`) instead of its logits: on a device computed there.
    pub fn forward_host_probs<'c>(
        &self,
        input: Input,
        positions: Positions,
        cache: impl Into<CacheMut<'c>>,
        logits: Logits,
        mask: Option<TreeMask>,
        params: &SamplingParams,
    ) -> Result<Vec<f32>> {
        match (self, cache.into()) {
            (Lm::Cuda(m), CacheMut::Cuda(c)) => m.forward_host_probs(input, positions, c, logits, mask, params),
            (lm, c) => {
                let rows = lm.forward(input, positions, c, logits, mask)?;
                let v = lm.cfg().vocab_size;
                Ok(rows.chunks_exact(v).flat_map(|r| probabilities(r, params)).collect())
            }
        }
    }

    /// [`Lm::forward`] handing back each row's `k` most likely tokens under the plain
    /// softmax with their probabilities, best first (`reference::top_k`: what a T = 0
    /// token tree ranks children by): on a device the `top_k` kernel picks them there and
    /// only k pairs a row cross (for k ≤ [`MAX_TOP_K`]); otherwise from host logits.
    pub fn forward_top_k<'c>(
        &self,
        input: Input,
        positions: Positions,
        cache: impl Into<CacheMut<'c>>,
        logits: Logits,
        mask: Option<TreeMask>,
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        match (self, cache.into()) {
            (Lm::Cuda(m), CacheMut::Cuda(c)) if (1..=MAX_TOP_K).contains(&k) => {
                m.forward_top_k(input, positions, c, logits, mask, k)
            }
            (lm, c) => {
                let rows = lm.forward(input, positions, c, logits, mask)?;
                let v = lm.cfg().vocab_size;
                Ok(rows.chunks_exact(v).map(|r| reference::top_k(r, k)).collect())
            }
        }
    }

    /// [`Lm::forward`] writing each row's distribution under `params` into device rows
    /// `out[row0..]` ([`CudaQwen2::forward_probs`]); only an LM on a CUDA device has them.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_probs<'c>(
        &self,
        input: Input,
        positions: Positions,
        cache: impl Into<CacheMut<'c>>,
        logits: Logits,
        mask: Option<TreeMask>,
        params: &SamplingParams,
        out: &mut CudaSlice<f32>,
        row0: usize,
    ) -> Result<()> {
        match (self, cache.into()) {
            (Lm::Cuda(m), CacheMut::Cuda(c)) => m.forward_probs(input, positions, c, logits, mask, params, out, row0),
            _ => Err(Error::InvalidArgument(
                "device distributions need the LM and its cache on a CUDA device".into(),
            )),
        }
    }

    /// [`Lm::forward`] (causal) for the cache only: on the device the head does not run;
    /// on the CPU the last row's logits are computed and dropped.
    pub fn extend<'c>(&self, input: Input, positions: Positions, cache: impl Into<CacheMut<'c>>) -> Result<()> {
        match (self, cache.into()) {
            (Lm::Cuda(m), CacheMut::Cuda(c)) => m.extend(input, positions, c),
            (_, c) => self.forward(input, positions, c, Logits::Last, None).map(drop),
        }
    }
}

#[allow(clippy::large_enum_variant)] // one per process, never moved in a hot path
pub enum Target {
    Text(Lm),
    Vl(Qwen25Vl),
}

/// Per-request decoding state of one model (`try_clone` to keep a copy).
pub struct Session {
    /// On the device the target's LM runs on.
    pub cache: Cache,
    /// Added to cache indices to get text positions (M-RoPE; 0 for text LMs).
    pub rope_delta: i32,
    /// The prompt as the model saw it (image placeholders expanded).
    pub prompt: Vec<u32>,
}

impl Session {
    /// A copy of this state (the cache copied where it lives).
    pub fn try_clone(&self) -> Result<Session> {
        Ok(Session {
            cache: self.cache.try_clone()?,
            rope_delta: self.rope_delta,
            prompt: self.prompt.clone(),
        })
    }
}

impl Target {
    /// Loads `dir` on the CPU according to its config.json's `model_type`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, Device::Cpu)
    }

    /// Loads `dir` with its LM on `device` (a Qwen2.5-VL's vision tower and merger stay on
    /// the CPU). Fails where the device cannot serve it (see [`Target::choose_device`]).
    pub fn load_on(dir: &Path, device: Device) -> Result<Self> {
        let path = dir.join("config.json");
        match model_type(dir)?.as_deref() {
            Some("qwen2") => Ok(Target::Text(Lm::load(dir, device)?)),
            Some("qwen2_5_vl") => Ok(Target::Vl(Qwen25Vl::load_on(dir, device)?)),
            other => Err(unsupported(&path, other)),
        }
    }

    /// Loads `dir` on the device `req` resolves to for it ([`Target::choose_device`],
    /// then [`Target::load_resolved`]).
    pub fn load_for(dir: &Path, req: DeviceRequest) -> Result<Self> {
        let device = Self::choose_device(dir, req)?;
        Self::load_resolved(dir, req, device)
    }

    /// [`Target::load_on`] `device`, what `req` resolved to; under `auto`, a target that
    /// fails to load on the GPU (out of memory, kernels not built for this GPU) loads on
    /// the CPU instead, with a one-line note on stderr.
    pub fn load_resolved(dir: &Path, req: DeviceRequest, device: Device) -> Result<Self> {
        match Self::load_on(dir, device) {
            Err(e) if req == DeviceRequest::Auto && device == Device::Cuda => {
                let target = Self::load_on(dir, Device::Cpu)?;
                eprintln!("massv: using the CPU: {}", one_line(&e));
                Ok(target)
            }
            r => r,
        }
    }

    /// The device `req` means for the model in `dir`: [`DeviceRequest::resolve`], and for
    /// CUDA also whether the kernels serve the LM's shapes (head dims 32 / 64 / 80 / 128, hidden
    /// and intermediate sizes multiples of 8). Shapes they do not serve are `cuda`'s error
    /// and, under `auto`, the CPU with a one-line note on stderr. Reads only config.json;
    /// one that cannot be read is left for the load to report.
    pub fn choose_device(dir: &Path, req: DeviceRequest) -> Result<Device> {
        if req.resolve()? == Device::Cpu {
            return Ok(Device::Cpu);
        }
        let Ok(cfg) = text_config_of(dir) else {
            return Ok(Device::Cuda);
        };
        match cuda_qwen2::check_served(&cfg) {
            Ok(()) => Ok(Device::Cuda),
            Err(e) if req == DeviceRequest::Auto => {
                eprintln!("massv: using the CPU: {}", one_line(&e));
                Ok(Device::Cpu)
            }
            Err(e) => Err(e),
        }
    }

    pub fn text_config(&self) -> &TextConfig {
        match self {
            Target::Text(m) => m.cfg(),
            Target::Vl(m) => &m.cfg.text,
        }
    }

    /// The target's language model.
    pub fn lm(&self) -> &Lm {
        match self {
            Target::Text(m) => m,
            Target::Vl(m) => &m.lm,
        }
    }

    /// Where the language model runs (a Qwen2.5-VL vision tower runs there too when the
    /// kernels serve its shapes, else on the CPU).
    pub fn device(&self) -> Device {
        self.lm().device()
    }

    /// The vision tower on each image (empty for text LMs, which take no images).
    pub fn encode_images(&self, images: &[Preprocessed]) -> Result<Vec<VisionOutput>> {
        match self {
            Target::Text(_) if !images.is_empty() => Err(Error::InvalidArgument(
                "an image was given but the model is text-only".into(),
            )),
            Target::Text(_) => Ok(Vec::new()),
            Target::Vl(m) => images
                .iter()
                .map(|p| m.encode_image(&p.pixel_values, p.grid_thw))
                .collect(),
        }
    }

    /// Runs the prompt into a fresh session that can hold `extra` more tokens. `ids`
    /// carry one `<|image_pad|>` per image, as the chat template writes them; `vision`
    /// is `encode_images` of `images`.
    pub fn prefill(
        &self,
        ids: &[u32],
        images: &[Preprocessed],
        vision: &[VisionOutput],
        extra: usize,
        logits: Logits,
    ) -> Result<(Vec<f32>, Session)> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        match self {
            Target::Text(m) => {
                if !images.is_empty() {
                    return Err(Error::InvalidArgument(
                        "an image was given but the model is text-only".into(),
                    ));
                }
                let mut cache = new_cache(m, ids.len(), extra)?;
                let positions: Vec<i32> = (0..ids.len() as i32).collect();
                let out = m.forward(Input::Tokens(ids), Positions::Seq(&positions), &mut cache, logits, None)?;
                Ok((
                    out,
                    Session {
                        cache,
                        rope_delta: 0,
                        prompt: ids.to_vec(),
                    },
                ))
            }
            Target::Vl(m) => {
                let grids: Vec<[usize; 3]> = images.iter().map(|p| p.grid_thw).collect();
                let expanded = m.expand_image_placeholders(ids, &grids)?;
                let embeds = vision.iter().flat_map(|v| v.embeds.iter().copied()).collect();
                let pre = m.prepare(expanded, &grids, embeds)?;
                let mut cache = new_cache(&m.lm, pre.ids.len(), extra)?;
                let out = m.prefill(&pre, &mut cache, logits)?;
                Ok((
                    out,
                    Session {
                        cache,
                        rope_delta: pre.rope_delta,
                        prompt: pre.ids,
                    },
                ))
            }
        }
    }

    /// Runs `tokens` after the session's cache.
    pub fn decode(&self, tokens: &[u32], s: &mut Session, logits: Logits) -> Result<Vec<f32>> {
        let positions = positions_after(s, 0..tokens.len());
        self.lm().forward(
            Input::Tokens(tokens),
            Positions::Seq(&positions),
            &mut s.cache,
            logits,
            None,
        )
    }

    /// Greedy verification of a chain: [`Target::decode`] of `tokens` handing back only
    /// each row's argmax (on a device nothing vocabulary-sized is copied back).
    pub fn decode_argmax(&self, tokens: &[u32], s: &mut Session) -> Result<Vec<u32>> {
        let positions = positions_after(s, 0..tokens.len());
        self.lm().forward_argmax(
            Input::Tokens(tokens),
            Positions::Seq(&positions),
            &mut s.cache,
            Logits::All,
            None,
        )
    }

    /// T > 0 verification of a chain on the device: [`Target::decode`] of `tokens` with
    /// each row's distribution under `params` left in `out` (rows 0..) on the device.
    pub fn decode_probs(
        &self,
        tokens: &[u32],
        s: &mut Session,
        params: &SamplingParams,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let positions = positions_after(s, 0..tokens.len());
        let input = Input::Tokens(tokens);
        self.lm().forward_probs(
            input,
            Positions::Seq(&positions),
            &mut s.cache,
            Logits::All,
            None,
            params,
            out,
            0,
        )
    }

    /// [`Target::decode_tree`] leaving each node's distribution under `params` in device
    /// rows `out[0..n]` (T > 0 tree verification on the device; CUDA only).
    pub fn decode_tree_probs(
        &self,
        tokens: &[u32],
        depths: &[usize],
        mask: &[u8],
        s: &mut Session,
        params: &SamplingParams,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let positions = tree_positions(tokens, depths, s)?;
        let mask = TreeMask {
            start: s.cache.len(),
            allow: mask,
        };
        let input = Input::Tokens(tokens);
        self.lm().forward_probs(
            input,
            Positions::Seq(&positions),
            &mut s.cache,
            Logits::All,
            Some(mask),
            params,
            out,
            0,
        )
    }

    /// Scores a token tree after the session's cache in one pass: node i (tree order,
    /// parents first) sits at position (cache length + depths[i]) and sees the cache and
    /// the nodes `mask` allows ([n, n]: its ancestors and itself). Logits of every node.
    pub fn decode_tree(&self, tokens: &[u32], depths: &[usize], mask: &[u8], s: &mut Session) -> Result<Vec<f32>> {
        let positions = tree_positions(tokens, depths, s)?;
        let mask = TreeMask {
            start: s.cache.len(),
            allow: mask,
        };
        let input = Input::Tokens(tokens);
        self.lm()
            .forward(input, Positions::Seq(&positions), &mut s.cache, Logits::All, Some(mask))
    }

    /// [`Target::decode_tree`] handing back only each node's argmax (greedy tree
    /// verification).
    pub fn decode_tree_argmax(
        &self,
        tokens: &[u32],
        depths: &[usize],
        mask: &[u8],
        s: &mut Session,
    ) -> Result<Vec<u32>> {
        let positions = tree_positions(tokens, depths, s)?;
        let mask = TreeMask {
            start: s.cache.len(),
            allow: mask,
        };
        let input = Input::Tokens(tokens);
        self.lm()
            .forward_argmax(input, Positions::Seq(&positions), &mut s.cache, Logits::All, Some(mask))
    }
}

/// Text positions of tokens at `offsets` after the session's cache: cache index +
/// `rope_delta` on every axis (0 for text LMs; Qwen2.5-VL's M-RoPE shift otherwise).
fn positions_after(s: &Session, offsets: impl IntoIterator<Item = usize>) -> Vec<i32> {
    let start = s.cache.len() as i32 + s.rope_delta;
    offsets.into_iter().map(|o| start + o as i32).collect()
}

/// Positions of a tree's nodes: node i at its depth after the cache.
fn tree_positions(tokens: &[u32], depths: &[usize], s: &Session) -> Result<Vec<i32>> {
    if depths.len() != tokens.len() {
        return Err(Error::InvalidArgument(format!(
            "{} tree depths for {} tokens",
            depths.len(),
            tokens.len()
        )));
    }
    Ok(positions_after(s, depths.iter().copied()))
}

fn new_cache(m: &Lm, prompt: usize, extra: usize) -> Result<Cache> {
    let capacity = prompt + extra;
    let max = m.cfg().max_position_embeddings;
    if capacity > max {
        return Err(Error::ContextOverflow {
            tokens: prompt,
            new: extra,
            capacity: max,
        });
    }
    m.new_cache(capacity)
}

/// config.json's `model_type`.
fn model_type(dir: &Path) -> Result<Option<String>> {
    let root = read_json_object(&dir.join("config.json"))?;
    Ok(root.get("model_type").and_then(|v| v.as_str()).map(str::to_string))
}

fn unsupported(path: &Path, model_type: Option<&str>) -> Error {
    Error::config(
        path,
        format!("model_type {model_type:?} is not supported (qwen2, qwen2_5_vl)"),
    )
}

/// The language model's config of the model in `dir`, either architecture.
pub fn text_config_of(dir: &Path) -> Result<TextConfig> {
    let path = dir.join("config.json");
    match model_type(dir)?.as_deref() {
        Some("qwen2") => config::load_qwen2(&path),
        Some("qwen2_5_vl") => Ok(config::load_qwen2_5_vl(&path)?.text),
        other => Err(unsupported(&path, other)),
    }
}

/// An error's message on one line (the note of an `auto` fallback).
pub(crate) fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}
