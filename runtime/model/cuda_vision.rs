//! The Qwen2.5-VL vision tower and merger of [`super::qwen2_5_vl::VisionTower`] on a CUDA
//! device, step for step the CPU tower, which stays the reference it is tested against.
//!
//! Weights are uploaded once as bf16. The activations of an image live in scratch buffers
//! sized for its patch count: kept between images and reallocated only for an image with
//! more patches than any before, so the blocks of one image launch kernels and allocate
//! nothing. Storage is bf16 (the residual stream included), sums are f32 inside the
//! kernels; the outputs come back as host f32.
//!
//! Window order. The CPU tower embeds the patches in the image processor's order and then
//! reorders the merged units window by window ([`window_index`]). The patch embedding is
//! a bias-free row-wise GEMM, so here the host reorders the pixel rows (and the patches'
//! grid rows and columns for the RoPE) before the upload instead: the embedded rows come
//! out in window order, the same rows the CPU computes. Every block then runs in window
//! order (cu_seqlens of the windows, or of the frames for the full-attention blocks), as
//! does the merger; `pre_merger` is returned in window order and the merged rows are put
//! back in raster order on the host, with the same `window_index` the CPU uses.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use half::bf16;

use super::cuda_qwen2::host_bf16;
use super::qwen2_5_vl::VISION_NORM_EPS;
use super::qwen2_5_vl::{check_vision_input, expected_vision_tensors, patch_positions, window_index, VisionOutput};
use crate::backend::cuda::{CudaDevice, ATTN_HEAD_DIMS};
use crate::config::VisionConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;

fn err(op: &str, msg: impl std::fmt::Display) -> Error {
    Error::Cuda {
        op: op.to_string(),
        reason: msg.to_string(),
    }
}

/// Whether the kernels serve this vision tower: its head dim among the attention kernels'
/// ([`ATTN_HEAD_DIMS`], a multiple of 4 for the 2-D RoPE), the hidden and output widths
/// multiples of 8 (16-byte rows). The MLP width may be any (the real towers' is 3420): a
/// GEMM with a dimension off the 8-element grid takes cuBLAS and a separate bias add
/// instead of cuBLASLt's fused bias ([`CudaDevice::linear`]).
pub fn check_served(v: &VisionConfig) -> Result<()> {
    let hd = v.head_dim();
    if v.num_heads == 0 || hd * v.num_heads != v.hidden_size {
        return Err(err(
            "load vision",
            format!(
                "hidden_size {} is not {} heads of equal width",
                v.hidden_size, v.num_heads
            ),
        ));
    }
    if !ATTN_HEAD_DIMS.contains(&hd) || hd % 4 != 0 {
        return Err(err(
            "load vision",
            format!("vision head dim {hd} is not served by the attention kernels (head dims {ATTN_HEAD_DIMS:?})"),
        ));
    }
    if v.spatial_merge_size == 0 {
        return Err(err("load vision", "spatial_merge_size is 0"));
    }
    if v.intermediate_size == 0 {
        return Err(err("load vision", "vision intermediate_size is 0"));
    }
    for (name, x) in [("hidden_size", v.hidden_size), ("out_hidden_size", v.out_hidden_size)] {
        if x % 8 != 0 || x == 0 {
            return Err(err(
                "load vision",
                format!("vision {name} {x} must be a positive multiple of 8"),
            ));
        }
    }
    Ok(())
}

/// One vision block on the device; C = hidden, I = intermediate. q, k and v are separate
/// tensors because the varlen attention reads rows of exactly heads · head_dim.
struct Block {
    norm1: CudaSlice<bf16>,     // [C]
    q_w: CudaSlice<bf16>,       // [C, C]
    k_w: CudaSlice<bf16>,       // [C, C]
    v_w: CudaSlice<bf16>,       // [C, C]
    q_b: CudaSlice<bf16>,       // [C]
    k_b: CudaSlice<bf16>,       // [C]
    v_b: CudaSlice<bf16>,       // [C]
    proj_w: CudaSlice<bf16>,    // [C, C]
    proj_b: CudaSlice<bf16>,    // [C]
    norm2: CudaSlice<bf16>,     // [C]
    gate_up_w: CudaSlice<bf16>, // [2I, C]: gate rows, then up rows (swiglu's layout)
    gate_up_b: CudaSlice<bf16>, // [2I]
    down_w: CudaSlice<bf16>,    // [C, I]
    down_b: CudaSlice<bf16>,    // [C]
}

/// Activations of one image of up to `patches` = N patches; U = N / m² merged units.
struct Scratch {
    patches: usize,
    pixels: CudaSlice<bf16>,   // [N, patch_dim] in window order
    rows: CudaSlice<i32>,      // [N] grid row of each patch, window order
    cols: CudaSlice<i32>,      // [N] grid column
    cu_window: CudaSlice<i32>, // [U + 1] (at most one window per merged unit)
    cu_full: CudaSlice<i32>,   // [U + 1] (frames ≤ U)
    hidden: CudaSlice<bf16>,   // [N, C] the residual stream
    normed: CudaSlice<bf16>,   // [N, C]
    q: CudaSlice<bf16>,        // [N, C]
    k: CudaSlice<bf16>,        // [N, C]
    v: CudaSlice<bf16>,        // [N, C]
    attn: CudaSlice<bf16>,     // [N, C]
    proj: CudaSlice<bf16>,     // [N, C] proj / down_proj output, added to the residual
    gate_up: CudaSlice<bf16>,  // [N, 2I]
    act: CudaSlice<bf16>,      // [N, I]
    fc1: CudaSlice<bf16>,      // [U, m²C]
    out: CudaSlice<bf16>,      // [U, D]
}

impl Scratch {
    fn new(dev: &CudaDevice, v: &VisionConfig, n: usize) -> Result<Self> {
        let (c, i, pd) = (v.hidden_size, v.intermediate_size, v.patch_dim());
        let units = n / (v.spatial_merge_size * v.spatial_merge_size);
        Ok(Scratch {
            patches: n,
            pixels: dev.alloc_zeros(n * pd)?,
            rows: dev.alloc_zeros(n)?,
            cols: dev.alloc_zeros(n)?,
            cu_window: dev.alloc_zeros(units + 1)?,
            cu_full: dev.alloc_zeros(units + 1)?,
            hidden: dev.alloc_zeros(n * c)?,
            normed: dev.alloc_zeros(n * c)?,
            q: dev.alloc_zeros(n * c)?,
            k: dev.alloc_zeros(n * c)?,
            v: dev.alloc_zeros(n * c)?,
            attn: dev.alloc_zeros(n * c)?,
            proj: dev.alloc_zeros(n * c)?,
            gate_up: dev.alloc_zeros(n * 2 * i)?,
            act: dev.alloc_zeros(n * i)?,
            fc1: dev.alloc_zeros(n * c)?,
            out: dev.alloc_zeros(units * v.out_hidden_size)?,
        })
    }
}

/// The vision tower and merger on a CUDA device.
pub struct CudaVision {
    pub cfg: VisionConfig,
    dev: Arc<CudaDevice>,
    patch_w: CudaSlice<bf16>, // [C, patch_dim]: the Conv3d with stride = kernel as a GEMM
    blocks: Vec<Block>,
    ln_q: CudaSlice<bf16>,   // [C]
    mlp0_w: CudaSlice<bf16>, // [m²C, m²C]
    mlp0_b: CudaSlice<bf16>, // [m²C]
    mlp2_w: CudaSlice<bf16>, // [D, m²C]
    mlp2_b: CudaSlice<bf16>, // [D]
    /// Grown for the largest image so far; behind a lock so the tower is shared
    /// read-only, as the CPU tower is.
    scratch: Mutex<Option<Scratch>>,
}

impl Drop for CudaVision {
    fn drop(&mut self) {
        self.dev.current_for_drop();
    }
}

impl CudaVision {
    /// Uploads the tower from tensors already inventory-checked by the caller (names under
    /// `prefix`, as [`super::qwen2_5_vl::VisionTower::load`] reads them). An error where
    /// the kernels do not serve its shapes ([`check_served`]).
    pub fn from_weights(dev: Arc<CudaDevice>, cfg: &VisionConfig, w: &Weights, prefix: &str) -> Result<Self> {
        check_served(cfg)?;
        let shapes = expected_vision_tensors(cfg, prefix);
        let host = |rest: &str| -> Result<Vec<bf16>> {
            let name = format!("{prefix}{rest}");
            let shape = shapes.get(&name).ok_or_else(|| Error::MissingTensor {
                dir: w.dir().to_path_buf(),
                tensor: name.clone(),
            })?;
            host_bf16(w, &name, shape)
        };
        let up = |v: Vec<bf16>| dev.upload(&v);
        let c = cfg.hidden_size;
        let blocks = (0..cfg.depth)
            .map(|b| {
                let t = |rest: &str| host(&format!("blocks.{b}.{rest}"));
                let (qkv_w, qkv_b) = (t("attn.qkv.weight")?, t("attn.qkv.bias")?);
                Ok(Block {
                    norm1: up(t("norm1.weight")?)?,
                    q_w: up(qkv_w[..c * c].to_vec())?,
                    k_w: up(qkv_w[c * c..2 * c * c].to_vec())?,
                    v_w: up(qkv_w[2 * c * c..].to_vec())?,
                    q_b: up(qkv_b[..c].to_vec())?,
                    k_b: up(qkv_b[c..2 * c].to_vec())?,
                    v_b: up(qkv_b[2 * c..].to_vec())?,
                    proj_w: up(t("attn.proj.weight")?)?,
                    proj_b: up(t("attn.proj.bias")?)?,
                    norm2: up(t("norm2.weight")?)?,
                    gate_up_w: up([t("mlp.gate_proj.weight")?, t("mlp.up_proj.weight")?].concat())?,
                    gate_up_b: up([t("mlp.gate_proj.bias")?, t("mlp.up_proj.bias")?].concat())?,
                    down_w: up(t("mlp.down_proj.weight")?)?,
                    down_b: up(t("mlp.down_proj.bias")?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaVision {
            patch_w: up(host("patch_embed.proj.weight")?)?,
            ln_q: up(host("merger.ln_q.weight")?)?,
            mlp0_w: up(host("merger.mlp.0.weight")?)?,
            mlp0_b: up(host("merger.mlp.0.bias")?)?,
            mlp2_w: up(host("merger.mlp.2.weight")?)?,
            mlp2_b: up(host("merger.mlp.2.bias")?)?,
            blocks,
            scratch: Mutex::new(None),
            cfg: cfg.clone(),
            dev,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// [`super::qwen2_5_vl::VisionTower::forward`] on the device: `pixel_values`
    /// [N, patch_dim] in the image processor's order, `grid_thw` its patch grid.
    pub fn forward(&self, pixel_values: &[f32], grid_thw: [usize; 3]) -> Result<VisionOutput> {
        const OP: &str = "vision forward";
        let v = &self.cfg;
        let n = check_vision_input(v, pixel_values, grid_thw)?;
        let (c, pd, inter, d) = (v.hidden_size, v.patch_dim(), v.intermediate_size, v.out_hidden_size);
        let (heads, hd, theta) = (v.num_heads, v.head_dim(), v.rope_theta as f32);
        let [gt, gh, gw] = grid_thw;
        let (m, unit) = (v.spatial_merge_size, v.spatial_merge_size * v.spatial_merge_size);
        let units = n / unit;

        // The CPU tower's indices; pixels and positions go up in window order.
        let (rows, cols) = patch_positions(grid_thw, m);
        let (window_index, cu_window) = window_index(grid_thw, m, v.window_units());
        let cu_full: Vec<usize> = (0..=gt).map(|f| f * gh * gw).collect();
        let mut pixels = Vec::with_capacity(n * pd);
        let (mut win_rows, mut win_cols) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &u in &window_index {
            pixels.extend(
                pixel_values[u * unit * pd..(u + 1) * unit * pd]
                    .iter()
                    .map(|&x| bf16::from_f32(x)),
            );
            win_rows.extend_from_slice(&rows[u * unit..(u + 1) * unit]);
            win_cols.extend_from_slice(&cols[u * unit..(u + 1) * unit]);
        }
        let segments = |cu: &[usize]| -> Result<(Vec<i32>, usize)> {
            let max = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            let cu = cu
                .iter()
                .map(|&x| i32::try_from(x).map_err(|_| err(OP, format!("{n} patches exceed i32"))))
                .collect::<Result<Vec<_>>>()?;
            Ok((cu, max))
        };
        let (cu_window, max_window) = segments(&cu_window)?;
        let (cu_full, max_full) = segments(&cu_full)?;

        let dev = &*self.dev;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|s| s.patches < n) {
            // Free the old buffers before allocating the larger ones.
            *guard = None;
            *guard = Some(Scratch::new(dev, v, n)?);
        }
        let s = guard.as_mut().ok_or_else(|| err(OP, "no scratch"))?;
        dev.upload_into(&pixels, &mut s.pixels.as_view_mut())?;
        dev.upload_into(&win_rows, &mut s.rows.as_view_mut())?;
        dev.upload_into(&win_cols, &mut s.cols.as_view_mut())?;
        dev.upload_into(&cu_window, &mut s.cu_window.as_view_mut())?;
        dev.upload_into(&cu_full, &mut s.cu_full.as_view_mut())?;

        let nc = n * c;
        dev.gemm_bf16(
            &s.pixels.slice(..n * pd),
            &self.patch_w.as_view(),
            &mut s.hidden.slice_mut(..nc),
            n,
            c,
            pd,
        )?;
        for (b, blk) in self.blocks.iter().enumerate() {
            let (cu, segs, max_seqlen) = if v.fullatt_block_indexes.contains(&b) {
                (&s.cu_full, cu_full.len() - 1, max_full)
            } else {
                (&s.cu_window, cu_window.len() - 1, max_window)
            };
            let mut normed = s.normed.slice_mut(..nc);
            if b == 0 {
                dev.rmsnorm(
                    &s.hidden.slice(..nc),
                    &blk.norm1.as_view(),
                    &mut normed,
                    n,
                    c,
                    VISION_NORM_EPS,
                )?;
            } else {
                let mut hidden = s.hidden.slice_mut(..nc);
                dev.rmsnorm_residual(
                    &s.proj.slice(..nc),
                    &mut hidden,
                    &blk.norm1.as_view(),
                    &mut normed,
                    n,
                    c,
                    VISION_NORM_EPS,
                )?;
            }
            let x = s.normed.slice(..nc);
            for (w, bias, y) in [
                (&blk.q_w, &blk.q_b, &mut s.q),
                (&blk.k_w, &blk.k_b, &mut s.k),
                (&blk.v_w, &blk.v_b, &mut s.v),
            ] {
                dev.linear(&x, &w.as_view(), Some(&bias.as_view()), &mut y.slice_mut(..nc), n, c, c)?;
            }
            let (r, co) = (s.rows.as_view(), s.cols.as_view());
            dev.rope_vision(&mut s.q.slice_mut(..nc), &r, &co, n, heads, hd, theta)?;
            dev.rope_vision(&mut s.k.slice_mut(..nc), &r, &co, n, heads, hd, theta)?;
            dev.attention_varlen(
                &s.q.slice(..nc),
                &s.k.slice(..nc),
                &s.v.slice(..nc),
                &mut s.attn.slice_mut(..nc),
                &cu.as_view(),
                segs,
                max_seqlen,
                n,
                heads,
                hd,
            )?;
            dev.linear(
                &s.attn.slice(..nc),
                &blk.proj_w.as_view(),
                Some(&blk.proj_b.as_view()),
                &mut s.proj.slice_mut(..nc),
                n,
                c,
                c,
            )?;
            dev.rmsnorm_residual(
                &s.proj.slice(..nc),
                &mut s.hidden.slice_mut(..nc),
                &blk.norm2.as_view(),
                &mut s.normed.slice_mut(..nc),
                n,
                c,
                VISION_NORM_EPS,
            )?;
            dev.linear(
                &s.normed.slice(..nc),
                &blk.gate_up_w.as_view(),
                Some(&blk.gate_up_b.as_view()),
                &mut s.gate_up.slice_mut(..n * 2 * inter),
                n,
                2 * inter,
                c,
            )?;
            dev.swiglu(
                &s.gate_up.slice(..n * 2 * inter),
                &mut s.act.slice_mut(..n * inter),
                n,
                inter,
            )?;
            dev.linear(
                &s.act.slice(..n * inter),
                &blk.down_w.as_view(),
                Some(&blk.down_b.as_view()),
                &mut s.proj.slice_mut(..nc),
                n,
                c,
                inter,
            )?;
        }

        // Merger: the last residual add, RMSNorm (ln_q) of each patch; a unit's m² patches
        // are consecutive rows, so [N, C] is read as fc1's input [U, m²C].
        if self.blocks.is_empty() {
            dev.rmsnorm(
                &s.hidden.slice(..nc),
                &self.ln_q.as_view(),
                &mut s.normed.slice_mut(..nc),
                n,
                c,
                VISION_NORM_EPS,
            )?;
        } else {
            dev.rmsnorm_residual(
                &s.proj.slice(..nc),
                &mut s.hidden.slice_mut(..nc),
                &self.ln_q.as_view(),
                &mut s.normed.slice_mut(..nc),
                n,
                c,
                VISION_NORM_EPS,
            )?;
        }
        dev.linear(
            &s.normed.slice(..nc),
            &self.mlp0_w.as_view(),
            Some(&self.mlp0_b.as_view()),
            &mut s.fc1.slice_mut(..nc),
            units,
            unit * c,
            unit * c,
        )?;
        dev.gelu(&mut s.fc1.slice_mut(..nc), nc)?;
        dev.linear(
            &s.fc1.slice(..nc),
            &self.mlp2_w.as_view(),
            Some(&self.mlp2_b.as_view()),
            &mut s.out.slice_mut(..units * d),
            units,
            d,
            unit * c,
        )?;

        let to_f32 = |x: Vec<bf16>| -> Vec<f32> { x.into_iter().map(bf16::to_f32).collect() };
        let pre_merger = to_f32(dev.download(&s.hidden.slice(..nc))?);
        let merged = to_f32(dev.download(&s.out.slice(..units * d))?);
        drop(guard);
        let mut embeds = vec![0.0; merged.len()];
        for (j, &u) in window_index.iter().enumerate() {
            embeds[u * d..(u + 1) * d].copy_from_slice(&merged[j * d..(j + 1) * d]);
        }
        Ok(VisionOutput {
            pre_merger,
            window_index,
            embeds,
        })
    }
}
