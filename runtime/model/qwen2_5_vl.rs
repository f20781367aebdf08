//! Qwen2.5-VL (transformers' `Qwen2_5_VLForConditionalGeneration`): the vision tower
//! (patch embedding, 2-D RoPE, window/full attention blocks, 2×2 merger), the M-RoPE
//! position ids of `get_rope_index`, and the Qwen2 LM with image embeddings scattered
//! into the `<|image_pad|>` positions. Follows transformers 4.57's modeling_qwen2_5_vl.py.
//!
//! The LM runs on the CPU or on a CUDA device ([`Lm`]); the vision tower and the merger
//! run on the CPU (f32), or beside a CUDA LM on its device where the kernels serve their
//! shapes ([`CudaVision`]). On the device a prompt goes in as spans: text tokens
//! (embedded on the device) and the merged image rows as host embeddings, each span at
//! its M-RoPE positions.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::backend::cuda::CudaDevice;
use crate::backend::{cpu, Device};
use crate::config::{self, VisionConfig, VlConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::cuda_qwen2::{CudaQwen2, Input};
use crate::model::cuda_vision::{self, CudaVision};
use crate::model::qwen2::{self, add_into, Logits, Positions, Qwen2};
use crate::model::{CacheMut, Lm};
use crate::weights::Weights;

pub(crate) const VISION_NORM_EPS: f32 = 1e-6;

/// Tensor-name layout of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `model.layers.*`, `visual.*`, `lm_head.*` (the hub checkpoints).
    Hub,
    /// `model.language_model.*`, `model.visual.*`, `lm_head.*` (transformers 5).
    Transformers5,
}

impl Layout {
    /// Names of the LM's tensors in this layout.
    pub fn lm(self) -> qwen2::Names<'static> {
        match self {
            Layout::Hub => qwen2::Names { prefix: "model." },
            Layout::Transformers5 => qwen2::Names {
                prefix: "model.language_model.",
            },
        }
    }

    /// Prefix of the vision tower's tensors in this layout.
    pub fn visual(self) -> &'static str {
        match self {
            Layout::Hub => "visual.",
            Layout::Transformers5 => "model.visual.",
        }
    }

    /// The layout of an opened checkpoint.
    pub fn detect(w: &Weights) -> Self {
        if w.contains("model.language_model.embed_tokens.weight") {
            Layout::Transformers5
        } else {
            Layout::Hub
        }
    }
}

/// Every tensor of the vision tower with the shape the config implies.
pub fn expected_vision_tensors(v: &VisionConfig, prefix: &str) -> BTreeMap<String, Vec<usize>> {
    let (c, i, m2) = (
        v.hidden_size,
        v.intermediate_size,
        v.spatial_merge_size * v.spatial_merge_size,
    );
    let mut t = BTreeMap::new();
    t.insert(
        format!("{prefix}patch_embed.proj.weight"),
        vec![c, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size],
    );
    for b in 0..v.depth {
        let mut put = |rest: &str, shape: Vec<usize>| t.insert(format!("{prefix}blocks.{b}.{rest}"), shape);
        put("norm1.weight", vec![c]);
        put("norm2.weight", vec![c]);
        put("attn.qkv.weight", vec![3 * c, c]);
        put("attn.qkv.bias", vec![3 * c]);
        put("attn.proj.weight", vec![c, c]);
        put("attn.proj.bias", vec![c]);
        put("mlp.gate_proj.weight", vec![i, c]);
        put("mlp.gate_proj.bias", vec![i]);
        put("mlp.up_proj.weight", vec![i, c]);
        put("mlp.up_proj.bias", vec![i]);
        put("mlp.down_proj.weight", vec![c, i]);
        put("mlp.down_proj.bias", vec![c]);
    }
    t.insert(format!("{prefix}merger.ln_q.weight"), vec![c]);
    t.insert(format!("{prefix}merger.mlp.0.weight"), vec![c * m2, c * m2]);
    t.insert(format!("{prefix}merger.mlp.0.bias"), vec![c * m2]);
    t.insert(format!("{prefix}merger.mlp.2.weight"), vec![v.out_hidden_size, c * m2]);
    t.insert(format!("{prefix}merger.mlp.2.bias"), vec![v.out_hidden_size]);
    t
}

/// Every tensor of the whole model in `layout`.
pub fn expected_tensors(cfg: &VlConfig, layout: Layout) -> BTreeMap<String, Vec<usize>> {
    let mut t = qwen2::expected_tensors(&cfg.text, layout.lm());
    t.extend(expected_vision_tensors(&cfg.vision, layout.visual()));
    t
}

/// One vision block; C = hidden, I = intermediate.
struct Block {
    norm1: Vec<f32>,     // [C]
    qkv_w: Vec<f32>,     // [3C, C]
    qkv_b: Vec<f32>,     // [3C]
    proj_w: Vec<f32>,    // [C, C]
    proj_b: Vec<f32>,    // [C]
    norm2: Vec<f32>,     // [C]
    gate_up_w: Vec<f32>, // [2I, C]: gate rows, then up rows
    gate_up_b: Vec<f32>, // [2I]
    down_w: Vec<f32>,    // [C, I]
    down_b: Vec<f32>,    // [C]
}

pub struct VisionTower {
    pub cfg: VisionConfig,
    patch_w: Vec<f32>, // [C, patch_dim]: the Conv3d with stride = kernel is a matmul
    blocks: Vec<Block>,
    ln_q: Vec<f32>,   // [C]
    mlp0_w: Vec<f32>, // [4C, 4C]
    mlp0_b: Vec<f32>, // [4C]
    mlp2_w: Vec<f32>, // [D, 4C]
    mlp2_b: Vec<f32>, // [D]
}

/// What one image produces in the vision tower.
pub struct VisionOutput {
    /// The blocks' output, the tensor the merger's `ln_q` receives: [N, C] in window
    /// order (the MASSV projector consumes it).
    pub pre_merger: Vec<f32>,
    /// Window permutation of the merged units: row j of the merger's output belongs to
    /// merged unit `window_index[j]` in raster order.
    pub window_index: Vec<usize>,
    /// The merger's output in raster order, one row per `<|image_pad|>`: [N/m², D].
    pub embeds: Vec<f32>,
}

impl VisionTower {
    pub fn load(cfg: &VisionConfig, w: &Weights, prefix: &str) -> Result<Self> {
        let shapes = expected_vision_tensors(cfg, prefix);
        let get = |rest: &str| {
            let name = format!("{prefix}{rest}");
            let shape = shapes.get(&name).ok_or_else(|| Error::MissingTensor {
                dir: w.dir().to_path_buf(),
                tensor: name.clone(),
            })?;
            w.f32(&name, shape)
        };
        let blocks = (0..cfg.depth)
            .map(|b| {
                let t = |rest: &str| get(&format!("blocks.{b}.{rest}"));
                Ok(Block {
                    norm1: t("norm1.weight")?,
                    qkv_w: t("attn.qkv.weight")?,
                    qkv_b: t("attn.qkv.bias")?,
                    proj_w: t("attn.proj.weight")?,
                    proj_b: t("attn.proj.bias")?,
                    norm2: t("norm2.weight")?,
                    gate_up_w: [t("mlp.gate_proj.weight")?, t("mlp.up_proj.weight")?].concat(),
                    gate_up_b: [t("mlp.gate_proj.bias")?, t("mlp.up_proj.bias")?].concat(),
                    down_w: t("mlp.down_proj.weight")?,
                    down_b: t("mlp.down_proj.bias")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch_w: get("patch_embed.proj.weight")?,
            ln_q: get("merger.ln_q.weight")?,
            mlp0_w: get("merger.mlp.0.weight")?,
            mlp0_b: get("merger.mlp.0.bias")?,
            mlp2_w: get("merger.mlp.2.weight")?,
            mlp2_b: get("merger.mlp.2.bias")?,
            blocks,
            cfg: cfg.clone(),
        })
    }

    /// Runs one image: `pixel_values` [N, patch_dim] in the image processor's order,
    /// `grid_thw` its patch grid.
    pub fn forward(&self, pixel_values: &[f32], grid_thw: [usize; 3]) -> Result<VisionOutput> {
        let v = &self.cfg;
        let (c, pd, heads, hd) = (v.hidden_size, v.patch_dim(), v.num_heads, v.head_dim());
        let [gt, gh, gw] = grid_thw;
        let (m, unit) = (v.spatial_merge_size, v.spatial_merge_size * v.spatial_merge_size);
        let n = check_vision_input(v, pixel_values, grid_thw)?;
        let (rows, cols) = patch_positions(grid_thw, m);
        let (window_index, cu_window) = window_index(grid_thw, m, v.window_units());
        let cu_full: Vec<usize> = (0..=gt).map(|f| f * gh * gw).collect();

        // Work in window order: each merged unit's m² patches stay together.
        let embedded = cpu::linear(pixel_values, &self.patch_w, None, pd);
        let mut hidden = Vec::with_capacity(n * c);
        let (mut win_rows, mut win_cols) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &u in &window_index {
            hidden.extend_from_slice(&embedded[u * unit * c..(u + 1) * unit * c]);
            win_rows.extend_from_slice(&rows[u * unit..(u + 1) * unit]);
            win_cols.extend_from_slice(&cols[u * unit..(u + 1) * unit]);
        }
        let theta = v.rope_theta as f32;
        for (b, blk) in self.blocks.iter().enumerate() {
            let cu = if v.fullatt_block_indexes.contains(&b) {
                &cu_full
            } else {
                &cu_window
            };
            let h = cpu::rmsnorm(&hidden, &blk.norm1, c, VISION_NORM_EPS);
            let qkv = cpu::linear(&h, &blk.qkv_w, Some(&blk.qkv_b), c);
            let (mut q, mut k, mut val) = (
                Vec::with_capacity(n * c),
                Vec::with_capacity(n * c),
                Vec::with_capacity(n * c),
            );
            for row in qkv.chunks_exact(3 * c) {
                q.extend_from_slice(&row[..c]);
                k.extend_from_slice(&row[c..2 * c]);
                val.extend_from_slice(&row[2 * c..]);
            }
            cpu::rope_vision(&mut q, &win_rows, &win_cols, heads, hd, theta);
            cpu::rope_vision(&mut k, &win_rows, &win_cols, heads, hd, theta);
            let attn = cpu::attention_varlen(&q, &k, &val, cu, heads, hd);
            add_into(&mut hidden, &cpu::linear(&attn, &blk.proj_w, Some(&blk.proj_b), c));
            let h = cpu::rmsnorm(&hidden, &blk.norm2, c, VISION_NORM_EPS);
            let gu = cpu::linear(&h, &blk.gate_up_w, Some(&blk.gate_up_b), c);
            let act = cpu::swiglu(&gu, v.intermediate_size);
            add_into(
                &mut hidden,
                &cpu::linear(&act, &blk.down_w, Some(&blk.down_b), v.intermediate_size),
            );
        }

        // Merger: RMSNorm each patch, concatenate each unit's m² patches, MLP with GELU.
        let normed = cpu::rmsnorm(&hidden, &self.ln_q, c, VISION_NORM_EPS);
        let mut x = cpu::linear(&normed, &self.mlp0_w, Some(&self.mlp0_b), c * unit);
        cpu::gelu(&mut x);
        let merged = cpu::linear(&x, &self.mlp2_w, Some(&self.mlp2_b), c * unit);
        let d = v.out_hidden_size;
        let mut embeds = vec![0.0; merged.len()];
        for (j, &u) in window_index.iter().enumerate() {
            embeds[u * d..(u + 1) * d].copy_from_slice(&merged[j * d..(j + 1) * d]);
        }
        Ok(VisionOutput {
            pre_merger: hidden,
            window_index,
            embeds,
        })
    }
}

/// The patch count N of one image after checking its grid (multiples of the merge size)
/// against its `pixel_values` ([N, patch_dim]).
pub(crate) fn check_vision_input(v: &VisionConfig, pixel_values: &[f32], grid_thw: [usize; 3]) -> Result<usize> {
    let [gt, gh, gw] = grid_thw;
    let (m, pd) = (v.spatial_merge_size, v.patch_dim());
    let n = gt * gh * gw;
    if n == 0 || m == 0 || gh % m != 0 || gw % m != 0 || pixel_values.len() != n * pd {
        return Err(Error::InvalidArgument(format!(
            "vision input: grid {grid_thw:?} (must be multiples of {m}) with {} values, expected {n}×{pd}",
            pixel_values.len()
        )));
    }
    Ok(n)
}

/// Row and column of every patch in the image processor's order (merged units in raster
/// order, the m×m patches of a unit inside), repeated for each temporal frame.
pub fn patch_positions(grid_thw: [usize; 3], m: usize) -> (Vec<i32>, Vec<i32>) {
    let [gt, gh, gw] = grid_thw;
    let (mut rows, mut cols) = (Vec::new(), Vec::new());
    for _ in 0..gt {
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        rows.push((bh * m + mh) as i32);
                        cols.push((bw * m + mw) as i32);
                    }
                }
            }
        }
    }
    (rows, cols)
}

/// transformers' `get_window_index` for one image: the merged units reordered window by
/// window (windows of `units`×`units` merged units in raster order, partial at the right
/// and bottom edges), and the cumulative patch counts of the windows (empty windows
/// dropped, as `unique_consecutive` does).
pub fn window_index(grid_thw: [usize; 3], m: usize, units: usize) -> (Vec<usize>, Vec<usize>) {
    let [gt, gh, gw] = grid_thw;
    let (lh, lw) = (gh / m, gw / m);
    let (nwh, nww) = (lh.div_ceil(units), lw.div_ceil(units));
    let mut index = Vec::with_capacity(gt * lh * lw);
    let mut cu = vec![0usize];
    for f in 0..gt {
        for wy in 0..nwh {
            for wx in 0..nww {
                let before = index.len();
                for y in wy * units..((wy + 1) * units).min(lh) {
                    for x in wx * units..((wx + 1) * units).min(lw) {
                        index.push(f * lh * lw + y * lw + x);
                    }
                }
                if index.len() > before {
                    cu.push(index.len() * m * m);
                }
            }
        }
    }
    (index, cu)
}

/// transformers' `get_rope_index` for a prompt with images: text tokens advance all
/// three axes together; the `units` tokens of an image get (t, row, col) of their merged
/// unit offset by the position where the image starts; text after an image continues
/// from the largest position so far + 1. Returns positions [3, S] and the delta
/// (next position − S) that decoding adds to cache indices.
pub fn rope_index(ids: &[u32], image_token: u32, grids: &[[usize; 3]], m: usize) -> Result<(Vec<i32>, i32)> {
    let s = ids.len();
    let mut pos = [Vec::with_capacity(s), Vec::with_capacity(s), Vec::with_capacity(s)];
    let mut next = 0i32; // max position so far + 1
    let mut i = 0;
    let mut images = grids.iter();
    while i < s {
        if ids[i] != image_token {
            for axis in &mut pos {
                axis.push(next);
            }
            next += 1;
            i += 1;
            continue;
        }
        let [gt, gh, gw] = *images.next().ok_or_else(|| {
            Error::InvalidArgument("the prompt has more image placeholders than images were given".into())
        })?;
        let (lh, lw) = (gh / m, gw / m);
        if i + gt * lh * lw > s || ids[i..i + gt * lh * lw].iter().any(|&t| t != image_token) {
            return Err(Error::InvalidArgument(format!(
                "an image of {} merged tokens needs as many consecutive image placeholders",
                gt * lh * lw
            )));
        }
        let mut max = next - 1;
        for _t in 0..gt {
            // Still images: every frame at temporal position 0 (second_per_grid_t = 0).
            for y in 0..lh {
                for x in 0..lw {
                    let p = [next, next + y as i32, next + x as i32];
                    for (axis, v) in pos.iter_mut().zip(p) {
                        axis.push(v);
                        max = max.max(v);
                    }
                }
            }
        }
        next = max + 1;
        i += gt * lh * lw;
    }
    if images.next().is_some() {
        return Err(Error::InvalidArgument(
            "an image was given but the prompt has no image placeholder for it".into(),
        ));
    }
    let delta = next - s as i32;
    Ok((pos.concat(), delta))
}

pub struct Qwen25Vl {
    pub cfg: VlConfig,
    pub layout: Layout,
    /// On the CPU or a CUDA device.
    pub lm: Lm,
    /// The vision tower and merger: on the LM's device when the LM is on CUDA and the
    /// kernels serve the tower's shapes ([`cuda_vision::check_served`]), else on the CPU.
    pub vision: Vision,
}

/// Where the vision tower runs; only that copy of its weights is held.
#[allow(clippy::large_enum_variant)] // one per model, never moved in a hot path
pub enum Vision {
    /// The reference, in f32.
    Cpu(VisionTower),
    Cuda(CudaVision),
}

impl Vision {
    pub fn device(&self) -> Device {
        match self {
            Vision::Cpu(_) => Device::Cpu,
            Vision::Cuda(_) => Device::Cuda,
        }
    }

    /// [`VisionTower::forward`] where the tower runs.
    pub fn forward(&self, pixel_values: &[f32], grid_thw: [usize; 3]) -> Result<VisionOutput> {
        match self {
            Vision::Cpu(v) => v.forward(pixel_values, grid_thw),
            Vision::Cuda(v) => v.forward(pixel_values, grid_thw),
        }
    }
}

/// A prompt ready for the LM: token ids with each image's placeholder expanded to its
/// merged tokens, and the image embeddings for those positions.
pub struct Prefill {
    pub ids: Vec<u32>,
    pub positions: Vec<i32>, // [3, S]
    pub rope_delta: i32,
    pub image_embeds: Vec<f32>, // [image tokens, D], in prompt order
}

impl Qwen25Vl {
    /// Loads a Qwen2.5-VL directory in either config layout and either tensor layout, on
    /// the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, Device::Cpu)
    }

    /// [`Qwen25Vl::load`] with the LM on `device`; the vision tower goes with it onto a
    /// CUDA device where the kernels serve its shapes, else stays on the CPU.
    pub fn load_on(dir: &Path, device: Device) -> Result<Self> {
        let cfg = config::load_qwen2_5_vl(&dir.join("config.json"))?;
        let weights = Weights::open(dir)?;
        let layout = Layout::detect(&weights);
        weights.check_inventory(&expected_tensors(&cfg, layout))?;
        let lm = match device {
            Device::Cpu => Lm::Cpu(Qwen2::from_weights(cfg.text.clone(), &weights, layout.lm())?),
            Device::Cuda => Lm::Cuda(CudaQwen2::from_weights(
                Arc::new(CudaDevice::new()?),
                cfg.text.clone(),
                &weights,
                layout.lm(),
            )?),
        };
        let vision =
            match &lm {
                Lm::Cuda(m) if cuda_vision::check_served(&cfg.vision).is_ok() => Vision::Cuda(
                    CudaVision::from_weights(m.device().clone(), &cfg.vision, &weights, layout.visual())?,
                ),
                _ => Vision::Cpu(VisionTower::load(&cfg.vision, &weights, layout.visual())?),
            };
        Ok(Qwen25Vl {
            cfg,
            layout,
            lm,
            vision,
        })
    }

    /// A host cache of `capacity` positions, for an LM on the CPU; [`Lm::new_cache`]
    /// makes one wherever the LM runs.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let t = &self.cfg.text;
        KvCache::new(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, capacity)
    }

    /// Only the vision tower of a checkpoint (e.g. to compute features for training
    /// without holding the LM in memory); the whole inventory is still checked.
    pub fn load_vision(dir: &Path) -> Result<(VlConfig, VisionTower)> {
        let cfg = config::load_qwen2_5_vl(&dir.join("config.json"))?;
        let weights = Weights::open(dir)?;
        let layout = Layout::detect(&weights);
        weights.check_inventory(&expected_tensors(&cfg, layout))?;
        let vision = VisionTower::load(&cfg.vision, &weights, layout.visual())?;
        Ok((cfg, vision))
    }

    /// Expands each single `<|image_pad|>` of `ids` (as the chat template writes it) to
    /// the merged-token count of the matching image, in order.
    pub fn expand_image_placeholders(&self, ids: &[u32], grids: &[[usize; 3]]) -> Result<Vec<u32>> {
        let img = self.cfg.image_token_id;
        let m2 = self.cfg.vision.spatial_merge_size.pow(2);
        let placeholders = ids.iter().filter(|&&t| t == img).count();
        if placeholders != grids.len() {
            return Err(Error::InvalidArgument(format!(
                "the prompt has {placeholders} image placeholder(s) but {} image(s) were given",
                grids.len()
            )));
        }
        let mut grids = grids.iter();
        let mut out = Vec::with_capacity(ids.len());
        for &t in ids {
            match (t == img).then(|| grids.next()).flatten() {
                Some(g) => out.extend(std::iter::repeat_n(img, g.iter().product::<usize>() / m2)),
                None => out.push(t),
            }
        }
        Ok(out)
    }

    /// The vision tower on one preprocessed image, where it runs.
    pub fn encode_image(&self, pixel_values: &[f32], grid_thw: [usize; 3]) -> Result<VisionOutput> {
        self.vision.forward(pixel_values, grid_thw)
    }

    /// Token ids (already expanded) plus the images' grids and merged embeddings (in
    /// prompt order) → everything the LM's prefill needs.
    pub fn prepare(&self, ids: Vec<u32>, grids: &[[usize; 3]], image_embeds: Vec<f32>) -> Result<Prefill> {
        let (positions, rope_delta) =
            rope_index(&ids, self.cfg.image_token_id, grids, self.cfg.vision.spatial_merge_size)?;
        Ok(Prefill {
            ids,
            positions,
            rope_delta,
            image_embeds,
        })
    }

    /// Prefill: embeds the prompt, puts the image embeddings at the placeholders, runs the
    /// LM at the M-RoPE positions. The cache must be of the LM's kind.
    pub fn prefill<'c>(&self, p: &Prefill, cache: impl Into<CacheMut<'c>>, logits: Logits) -> Result<Vec<f32>> {
        let (lm, cache) = match (&self.lm, cache.into()) {
            (Lm::Cpu(lm), CacheMut::Cpu(cache)) => (lm, cache),
            (Lm::Cuda(_), cache @ CacheMut::Cuda(_)) => return self.prefill_spans(p, cache, logits),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "a prefill of the LM on the {} was given a cache of the other device",
                    self.lm.device().name()
                )))
            }
        };
        let d = self.cfg.text.hidden_size;
        let mut hidden = lm.embed(&p.ids)?;
        let mut rows = p.image_embeds.chunks_exact(d);
        for (i, _) in p.ids.iter().enumerate().filter(|(_, &t)| t == self.cfg.image_token_id) {
            let row = rows
                .next()
                .ok_or_else(|| Error::InvalidArgument("more image placeholders than image embeddings".into()))?;
            hidden[i * d..(i + 1) * d].copy_from_slice(row);
        }
        if rows.next().is_some() {
            return Err(Error::InvalidArgument(
                "more image embeddings than image placeholders".into(),
            ));
        }
        lm.forward(hidden, Positions::Multi(&p.positions), cache, logits)
    }

    /// [`Qwen25Vl::prefill`] as the device runs it: the prompt in spans of text tokens and
    /// of image rows (host embeddings), in order, each at its M-RoPE positions; only the
    /// spans whose logits are asked for run the head. All or nothing: a failure rolls the
    /// cache back to where it was. On the CPU it gives what `prefill` gives (tested there).
    pub fn prefill_spans<'c>(&self, p: &Prefill, cache: impl Into<CacheMut<'c>>, logits: Logits) -> Result<Vec<f32>> {
        let mut cache = cache.into();
        let (d, s, img) = (self.cfg.text.hidden_size, p.ids.len(), self.cfg.image_token_id);
        let rows = p.ids.iter().filter(|&&t| t == img).count();
        if rows * d < p.image_embeds.len() {
            return Err(Error::InvalidArgument(
                "more image embeddings than image placeholders".into(),
            ));
        }
        if rows * d > p.image_embeds.len() {
            return Err(Error::InvalidArgument(
                "more image placeholders than image embeddings".into(),
            ));
        }
        if p.positions.len() != 3 * s {
            return Err(Error::InvalidArgument(format!(
                "{} position values for {s} tokens",
                p.positions.len()
            )));
        }
        if s == 0 {
            return Err(Error::InvalidArgument("forward pass with no tokens".into()));
        }
        cache.reserve(s)?;
        let start = cache.len();
        let mut out = Vec::new();
        let mut row = 0;
        let mut run = |cache: &mut CacheMut| -> Result<()> {
            for (span, image) in spans(&p.ids, img) {
                let pos: Vec<i32> = (0..3)
                    .flat_map(|a| &p.positions[a * s + span.start..a * s + span.end])
                    .copied()
                    .collect();
                let input = if image {
                    let e = &p.image_embeds[row * d..(row + span.len()) * d];
                    row += span.len();
                    Input::Embeddings(e)
                } else {
                    Input::Tokens(&p.ids[span.clone()])
                };
                let positions = Positions::Multi(&pos);
                if logits == Logits::All || span.end == s {
                    out.extend(self.lm.forward(input, positions, cache.reborrow(), logits, None)?);
                } else {
                    self.lm.extend(input, positions, cache.reborrow())?;
                }
            }
            Ok(())
        };
        match run(&mut cache) {
            Ok(()) => Ok(out),
            Err(e) => {
                cache.rollback_to(start)?;
                Err(e)
            }
        }
    }

    /// Decodes `tokens` after the cache: text positions are cache index + rope_delta on
    /// every axis.
    pub fn decode<'c>(
        &self,
        tokens: &[u32],
        rope_delta: i32,
        cache: impl Into<CacheMut<'c>>,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let cache = cache.into();
        let start = cache.len() as i32 + rope_delta;
        let positions: Vec<i32> = (start..start + tokens.len() as i32).collect();
        self.lm
            .forward(Input::Tokens(tokens), Positions::Seq(&positions), cache, logits, None)
    }
}

/// The maximal runs of `ids` that are all `image` tokens or all other tokens, in order,
/// each with whether it is an image run.
fn spans(ids: &[u32], image: u32) -> Vec<(Range<usize>, bool)> {
    let mut out: Vec<(Range<usize>, bool)> = Vec::new();
    for (i, &t) in ids.iter().enumerate() {
        match out.last_mut() {
            Some((r, img)) if *img == (t == image) => r.end = i + 1,
            _ => out.push((i..i + 1, t == image)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::spans;

    #[test]
    fn spans_are_the_maximal_runs_in_order() {
        let ids = [1, 2, 9, 9, 9, 3, 9, 9];
        let want = vec![(0..2, false), (2..5, true), (5..6, false), (6..8, true)];
        assert_eq!(spans(&ids, 9), want);
        assert_eq!(spans(&[9], 9), vec![(0..1, true)]);
        assert_eq!(spans(&[4, 5], 9), vec![(0..2, false)]);
        assert!(spans(&[], 9).is_empty());
    }
}
