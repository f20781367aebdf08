//! Launchers of cuda/attention.cu: prefill, decode, verify and varlen attention.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtrMut, DeviceRepr, LaunchConfig};

use super::{aligned16, bf16, i32_arg, need, shape_err, CudaDevice, SPLIT_COUNTERS};
use crate::error::Result;

/// Keys per attention tile (ATTN_BC in cuda/attention.cu): split-K chunks are multiples.
const ATTN_TILE: usize = 64;
/// Query rows per warp in the attention kernels.
const ATTN_ROWS_PER_WARP: usize = 16;
/// Head dims the attention kernels are instantiated for.
pub const ATTN_HEAD_DIMS: [usize; 5] = [16, 32, 64, 80, 128];

/// Scratch of the split-K attention (decode / verify): partial outputs and their
/// (max, sum) per split. Sized once for the largest call.
pub struct AttnScratch {
    o_part: CudaSlice<f32>,
    ml_part: CudaSlice<f32>,
    rows: usize,
    splits: usize,
    head_dim: usize,
}

impl AttnScratch {
    pub fn max_splits(&self) -> usize {
        self.splits
    }
}

/// The part of [`AttnParams`] every attention launcher fills the same way.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query tokens.
    pub n: usize,
    /// Cache position of query token 0.
    pub start: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A cache length the kernels read on the device when they run (`at[0]`: the cached
/// tokens before this pass, its start), so that a CUDA graph can replay one launch at
/// every length. The kernels trust it: the caller keeps `at[0] + n ≤ capacity`.
#[derive(Clone, Copy)]
pub struct DeviceLen<'a> {
    pub at: &'a CudaView<'a, i32>,
    /// Rows the cache holds (bounds the launch: its splits and the buffers' sizes).
    pub capacity: usize,
}

/// Mirror of `struct AttnParams` in cuda/attention.cu (field for field, C layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    o_part: u64,
    ml_part: u64,
    mask: u64,
    cu_seqlens: u64,
    counters: u64,
    len_at: u64,
    n: i32,
    start: i32,
    mask_start: i32,
    kv_len: i32,
    hq: i32,
    hkv: i32,
    window: i32,
    keys_per_split: i32,
    q_stride: i32,
    kv_stride: i32,
    out_stride: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the C layout of the kernel's parameter struct.
unsafe impl DeviceRepr for AttnParams {}

/// The attention kernel variants (mode part of the symbol name).
#[derive(Debug, Clone, Copy)]
enum AttnMode {
    Prefill,
    Decode,
    Verify,
    Varlen,
}

impl AttnMode {
    fn name(self) -> &'static str {
        match self {
            AttnMode::Prefill => "prefill",
            AttnMode::Decode => "decode",
            AttnMode::Verify => "verify",
            AttnMode::Varlen => "varlen",
        }
    }
}

impl CudaDevice {
    /// Scratch for split-K attention: up to `max_splits` splits of `max_rows` output rows
    /// (query tokens · query heads) of `head_dim`.
    pub fn attn_scratch(&self, max_rows: usize, max_splits: usize, head_dim: usize) -> Result<AttnScratch> {
        let splits = max_splits.max(1);
        Ok(AttnScratch {
            o_part: self.alloc_zeros(splits * max_rows * head_dim)?,
            ml_part: self.alloc_zeros(splits * max_rows * 2)?,
            rows: max_rows,
            splits,
            head_dim,
        })
    }

    /// Causal GQA attention of n queries (q: [n, q_heads, d]) at cache positions
    /// start..start + n against k, v ([≥ start + n, kv_heads, d], the new keys written);
    /// out: [n, q_heads, d]. With a sliding `window`, query t sees the last `window` keys.
    /// `scratch` lets short prefills split the keys over more blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        shape: AttnShape,
        window: Option<usize>,
        scratch: Option<&mut AttnScratch>,
    ) -> Result<()> {
        let kv_len = shape.start + shape.n;
        self.attention(
            AttnMode::Prefill,
            q,
            k,
            v,
            out,
            shape,
            kv_len,
            window,
            None,
            scratch,
            None,
        )
    }

    /// One new query per sequence (q: [q_heads, d]) against the `len` cached keys (the new
    /// one included), split over the keys (split-K, merged by the last split).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        len: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        if len == 0 {
            return Err(shape_err(
                "attention_decode",
                "empty cache (the new key must be written first)",
            ));
        }
        let shape = AttnShape {
            n: 1,
            start: len - 1,
            q_heads,
            kv_heads,
            head_dim,
        };
        self.attention(
            AttnMode::Decode,
            q,
            k,
            v,
            out,
            shape,
            len,
            None,
            None,
            Some(scratch),
            None,
        )
    }

    /// [`Self::attention_decode`] with the cache length read on the device: `len.at[0]`
    /// keys before the new one, which is written. The keys are split for `len.capacity`
    /// (the splits past the length idle), so one launch serves every length.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode_at(
        &self,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        len: DeviceLen<'_>,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        let shape = AttnShape {
            n: 1,
            start: 0,
            q_heads,
            kv_heads,
            head_dim,
        };
        self.attention_at(AttnMode::Decode, q, k, v, out, len, shape, scratch)
    }

    /// [`Self::attention_prefill`] (no window) of n queries with their start read on the
    /// device: `len.at[0]` keys cached before them, theirs written after. As in
    /// [`Self::attention_decode_at`], the keys are split for `len.capacity`, so one launch
    /// serves every start (a CUDA graph's pass of several tokens).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill_at(
        &self,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        len: DeviceLen<'_>,
        n: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        let shape = AttnShape {
            n,
            start: 0,
            q_heads,
            kv_heads,
            head_dim,
        };
        self.attention_at(AttnMode::Prefill, q, k, v, out, len, shape, scratch)
    }

    /// Causal attention of `shape.n` queries (its start unused) at the start `len.at[0]`
    /// read on the device, split for `len.capacity`.
    #[allow(clippy::too_many_arguments)]
    fn attention_at(
        &self,
        mode: AttnMode,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        len: DeviceLen<'_>,
        shape: AttnShape,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        let op = attn_op(mode);
        need(op, "len", len.at.len(), 1)?;
        if shape.n > len.capacity {
            return Err(shape_err(
                op,
                format!("{} queries exceed a cache of {}", shape.n, len.capacity),
            ));
        }
        let at = self.rptr(len.at);
        self.attention(
            mode,
            q,
            k,
            v,
            out,
            shape,
            len.capacity,
            None,
            None,
            Some(scratch),
            Some(at),
        )
    }

    /// A block of n = γ + 1 (or tree) queries at positions start..start + n: every cached
    /// key before `mask_start` plus key mask_start + j for query t iff
    /// mask[t · span + j] != 0, span = start + n − mask_start (mask: [n, span] u8 on the
    /// device; mask_start = start for a target's chain or tree, below it for a drafter
    /// whose earlier tree depths are cached). Twin: `reference::attention_verify`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_verify(
        &self,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        mask: &CudaView<'_, u8>,
        mask_start: usize,
        shape: AttnShape,
        scratch: &mut AttnScratch,
    ) -> Result<()> {
        if mask_start > shape.start {
            return Err(shape_err(
                "attention_verify",
                format!("mask_start {mask_start} is past the block start {}", shape.start),
            ));
        }
        let span = shape.start + shape.n - mask_start;
        need("attention_verify", "mask", mask.len(), shape.n * span)?;
        let mp = self.rptr(mask);
        let kv_len = shape.start + shape.n;
        self.attention(
            AttnMode::Verify,
            q,
            k,
            v,
            out,
            shape,
            kv_len,
            None,
            Some((mp, mask_start)),
            Some(scratch),
            None,
        )
    }

    /// Non-causal attention within segments (the vision tower): tokens
    /// cu_seqlens[s]..cu_seqlens[s + 1] see each other. q, k, v, out: [total, heads, d];
    /// cu_seqlens: [segments + 1] on the device; `max_seqlen` bounds the longest segment.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_varlen(
        &self,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        cu_seqlens: &CudaView<'_, i32>,
        segments: usize,
        max_seqlen: usize,
        total: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const OP: &str = "attention_varlen";
        need(OP, "cu_seqlens", cu_seqlens.len(), segments + 1)?;
        check_head_dim(OP, head_dim)?;
        let row = heads * head_dim;
        for (name, len) in [("q", q.len()), ("k", k.len()), ("v", v.len()), ("out", out.len())] {
            need(OP, name, len, total * row)?;
        }
        if segments == 0 || max_seqlen == 0 {
            return Ok(());
        }
        let warps = max_seqlen.div_ceil(ATTN_ROWS_PER_WARP).min(4);
        let params = AttnParams {
            q: self.rptr(q),
            k: self.rptr(k),
            v: self.rptr(v),
            out: self.wptr(out),
            cu_seqlens: self.rptr(cu_seqlens),
            n: i32_arg(OP, "total", total)?,
            kv_len: total as i32,
            hq: heads as i32,
            hkv: heads as i32,
            keys_per_split: i32::MAX,
            q_stride: row as i32,
            kv_stride: row as i32,
            out_stride: row as i32,
            scale_log2: std::f32::consts::LOG2_E / (head_dim as f32).sqrt(),
            ..Default::default()
        };
        check_attn_alignment(OP, &params)?;
        let cfg = LaunchConfig {
            grid_dim: (
                max_seqlen.div_ceil(warps * ATTN_ROWS_PER_WARP) as u32,
                heads as u32,
                segments as u32,
            ),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("attention", attn_name(AttnMode::Varlen, head_dim), cfg, &[&params])
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        mode: AttnMode,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        s: AttnShape,
        kv_len: usize,
        window: Option<usize>,
        mask: Option<(u64, usize)>,
        scratch: Option<&mut AttnScratch>,
        len_at: Option<u64>,
    ) -> Result<()> {
        // With `len_at`, kv_len is the capacity: it bounds the buffers and the splits.
        let op = attn_op(mode);
        check_head_dim(op, s.head_dim)?;
        if s.kv_heads == 0 || s.q_heads % s.kv_heads != 0 {
            return Err(shape_err(
                op,
                format!("{} query heads are not groups of {} KV heads", s.q_heads, s.kv_heads),
            ));
        }
        let (q_row, kv_row) = (s.q_heads * s.head_dim, s.kv_heads * s.head_dim);
        need(op, "q", q.len(), s.n * q_row)?;
        need(op, "out", out.len(), s.n * q_row)?;
        need(op, "k", k.len(), kv_len * kv_row)?;
        need(op, "v", v.len(), kv_len * kv_row)?;
        if s.n == 0 {
            return Ok(());
        }
        let group = s.q_heads / s.kv_heads;
        let rows = s.n * group;
        let warps = rows.div_ceil(ATTN_ROWS_PER_WARP).min(4);
        let row_tiles = rows.div_ceil(warps * ATTN_ROWS_PER_WARP);
        let base_blocks = row_tiles * s.kv_heads;
        let out_rows = s.n * s.q_heads;
        // Split the keys over blocks when the row tiles alone cannot fill the GPU.
        let mut splits = 1;
        let (mut op_ptr, mut ml_ptr) = (0u64, 0u64);
        if let Some(sc) = scratch {
            let target = 2 * self.info.multiprocessors as usize;
            let counted = base_blocks <= SPLIT_COUNTERS;
            if base_blocks < target && counted && sc.rows >= out_rows && sc.head_dim >= s.head_dim {
                let by_keys = kv_len.div_ceil(ATTN_TILE);
                splits = target.div_ceil(base_blocks).min(by_keys).min(sc.splits).max(1);
                if splits > 1 {
                    op_ptr = sc.o_part.device_ptr_mut(&self.stream).0;
                    ml_ptr = sc.ml_part.device_ptr_mut(&self.stream).0;
                }
            }
        }
        // The kernel spreads a length read on the device over the splits itself (0).
        let (keys_per_split, splits) = match len_at {
            Some(_) => (0, splits),
            None => {
                let keys = kv_len.div_ceil(splits).div_ceil(ATTN_TILE) * ATTN_TILE;
                (keys, kv_len.div_ceil(keys).max(1))
            }
        };
        let params = AttnParams {
            q: self.rptr(q),
            k: self.rptr(k),
            v: self.rptr(v),
            out: self.wptr(out),
            o_part: op_ptr,
            ml_part: ml_ptr,
            mask: mask.map_or(0, |m| m.0),
            cu_seqlens: 0,
            counters: if splits > 1 { self.counters_ptr() } else { 0 },
            len_at: len_at.unwrap_or(0),
            n: i32_arg(op, "n", s.n)?,
            start: i32_arg(op, "start", s.start)?,
            mask_start: i32_arg(op, "mask_start", mask.map_or(s.start, |m| m.1))?,
            kv_len: i32_arg(op, "kv_len", kv_len)?,
            hq: s.q_heads as i32,
            hkv: s.kv_heads as i32,
            window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
            keys_per_split: i32_arg(op, "keys per split", keys_per_split)?,
            q_stride: q_row as i32,
            kv_stride: kv_row as i32,
            out_stride: q_row as i32,
            scale_log2: std::f32::consts::LOG2_E / (s.head_dim as f32).sqrt(),
        };
        check_attn_alignment(op, &params)?;
        let cfg = LaunchConfig {
            grid_dim: (row_tiles as u32, s.kv_heads as u32, splits as u32),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("attention", attn_name(mode, s.head_dim), cfg, &[&params])
    }
}

/// The launcher's name, for errors.
fn attn_op(mode: AttnMode) -> &'static str {
    match mode {
        AttnMode::Prefill => "attention_prefill",
        AttnMode::Decode => "attention_decode",
        AttnMode::Verify => "attention_verify",
        AttnMode::Varlen => "attention_varlen",
    }
}

fn attn_name(mode: AttnMode, head_dim: usize) -> &'static str {
    const NAMES: [[&str; 5]; 4] = [
        [
            "attention_prefill_d16",
            "attention_prefill_d32",
            "attention_prefill_d64",
            "attention_prefill_d80",
            "attention_prefill_d128",
        ],
        [
            "attention_decode_d16",
            "attention_decode_d32",
            "attention_decode_d64",
            "attention_decode_d80",
            "attention_decode_d128",
        ],
        [
            "attention_verify_d16",
            "attention_verify_d32",
            "attention_verify_d64",
            "attention_verify_d80",
            "attention_verify_d128",
        ],
        [
            "attention_varlen_d16",
            "attention_varlen_d32",
            "attention_varlen_d64",
            "attention_varlen_d80",
            "attention_varlen_d128",
        ],
    ];
    let d = ATTN_HEAD_DIMS
        .iter()
        .position(|&d| d == head_dim)
        .unwrap_or(ATTN_HEAD_DIMS.len() - 1);
    let name = NAMES[mode as usize][d];
    debug_assert!(name.contains(mode.name()));
    name
}

fn check_head_dim(op: &str, head_dim: usize) -> Result<()> {
    if !ATTN_HEAD_DIMS.contains(&head_dim) {
        return Err(shape_err(
            op,
            format!("head dim {head_dim} (kernels exist for {ATTN_HEAD_DIMS:?})"),
        ));
    }
    Ok(())
}

fn check_attn_alignment(op: &str, p: &AttnParams) -> Result<()> {
    aligned16(op, "k", p.k)?;
    aligned16(op, "v", p.v)?;
    for (name, ptr) in [("q", p.q), ("out", p.out)] {
        if ptr % 4 != 0 {
            return Err(shape_err(op, format!("{name} is not 4-byte aligned")));
        }
    }
    Ok(())
}
