//! Launchers of cuda/gemv.cu (decode) and the cuBLAS / cuBLASLt GEMMs (prefill).

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublaslt::result::CublasError;
use cudarc::cublaslt::sys::cublasStatus_t;
use cudarc::cublaslt::{Matmul, MatmulConfig};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

use super::layers::rope_head_dim;
use super::{aligned16, bf16, cuda_err, i32_arg, need, shape_err, AttnShape, CudaDevice, DeviceLen};
use crate::error::Result;
pub use crate::reference::GemvFuse;

/// Output rows per GEMV block (GEMV_WARPS * GEMV_ROWS in cuda/gemv.cu).
const GEMV_ROWS_PER_BLOCK: usize = 16;
/// Largest row count of gemv_bf16 (one kernel instantiation per count).
pub const GEMV_MAX_ROWS: usize = 8;
/// What a GEMV writes: bf16 y, f32 y, or f32 y and each row's argmax (into the ids at
/// this device address).
#[derive(Clone, Copy)]
enum Out {
    Bf16,
    F32,
    F32Argmax(u64),
}

/// A GEMV launch's common arguments ([`CudaDevice::gemv_launch`]).
struct GemvLaunch {
    cfg: LaunchConfig,
    x: u64,
    w: u64,
    bias: u64,
    partial: u64,
    counters: u64,
    n: i32,
    k: i32,
    eps: f32,
}

/// Column blocks a split-K GEMV may have (its arrival counters); a split pays only below
/// two blocks per multiprocessor, far fewer.
pub(super) const SPLIT_COUNTERS: usize = 4096;

impl CudaDevice {
    /// y[b, n] = x[b, :] · w[n, :] (+ bias[n]) for `rows` = 1..=8 rows of x ([rows, k]),
    /// w: [n, k] bf16, y: [rows, n] bf16. k % 8 == 0. `scratch` (f32, at least
    /// splits · rows · n) lets a short matrix split K over more blocks; None = no split.
    /// `fuse` RMS-normalises x's rows on the way in and/or adds into y ([`GemvFuse`]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        n: usize,
        k: usize,
        fuse: GemvFuse,
    ) -> Result<()> {
        need("gemv_bf16", "y", y.len(), rows * n)?;
        let yp = self.wptr(y);
        self.gemv(Out::Bf16, x, w, bias, yp, scratch, rows, n, k, fuse)
    }

    /// As [`Self::gemv_bf16`] with f32 output (logits for sampling).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_f32(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, f32>,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        n: usize,
        k: usize,
        fuse: GemvFuse,
    ) -> Result<()> {
        need("gemv_bf16", "y", y.len(), rows * n)?;
        let yp = self.wptr(y);
        self.gemv(Out::F32, x, w, bias, yp, scratch, rows, n, k, fuse)
    }

    /// As [`Self::gemv_bf16_f32`], and each row's argmax into ids ([rows]): the first
    /// index of its maximum, NaNs skipped (as [`Self::argmax`] of y), taken by the GEMV's
    /// blocks as they finish rather than by a kernel rereading y (the LM head of greedy
    /// decoding and drafting). `fuse.add_to_y` is refused: the argmax is of the product.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_bf16_argmax(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, f32>,
        ids: &mut CudaViewMut<'_, i32>,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        n: usize,
        k: usize,
        fuse: GemvFuse,
    ) -> Result<()> {
        const OP: &str = "gemv_bf16_argmax";
        need(OP, "y", y.len(), rows * n)?;
        need(OP, "ids", ids.len(), rows)?;
        if fuse.add_to_y {
            return Err(shape_err(OP, "add_to_y: the argmax is of the product, not of y + it"));
        }
        if n == 0 && rows > 0 {
            return Err(shape_err(OP, "rows of 0 entries have no argmax"));
        }
        let (yp, ip) = (self.wptr(y), self.wptr(ids));
        self.gemv(Out::F32Argmax(ip), x, w, bias, yp, scratch, rows, n, k, fuse)
    }

    /// The MLP's gate/up GEMV with SwiGLU fused as its epilogue: y[b, j] = silu(x[b] ·
    /// w[j]) · (x[b] · w[inter + j]) for `rows` = 1..=8 rows; w: [2 · inter, k] (gate rows,
    /// then up rows), y: [rows, inter]. The [rows, 2 · inter] projection stays in
    /// registers (or, split over K, in the f32 scratch its last split reads). `rms_eps`
    /// RMS-normalises x's rows on the way in, as [`GemvFuse::rms_eps`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_swiglu(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        inter: usize,
        k: usize,
        rms_eps: Option<f32>,
    ) -> Result<()> {
        const OP: &str = "gemv_swiglu";
        need(OP, "y", y.len(), rows * inter)?;
        // Blocks cover GEMV_ROWS_PER_BLOCK / 2 outputs, as many as a 2 · inter GEMV's.
        let Some(g) = self.gemv_launch(OP, x, w, None, scratch, rows, 2 * inter, k, rms_eps)? else {
            return Ok(());
        };
        let (yp, ii) = (self.wptr(y), i32_arg(OP, "inter", inter)?);
        self.launch(
            "gemv",
            GEMV_SWIGLU[rows - 1],
            g.cfg,
            &[&g.x, &g.w, &yp, &g.partial, &g.counters, &ii, &g.k, &g.eps],
        )
    }

    /// A decoder layer's QKV GEMV with [`Self::rope_kv_append`] as its epilogue, one
    /// launch: the `s.n` = 1..=8 rows of x ([n, k]; the residual stream, RMS-scaled on the
    /// way in under `rms_eps` as [`GemvFuse::rms`]) times w ([(q_heads + 2 · kv_heads) ·
    /// head_dim, k], + bias), the queries rotated into q_out and the keys rotated and the
    /// values written into the caches as rope_kv_append writes them, the same bits as
    /// `gemv_bf16` then `rope_kv_append`; the qkv rows never reach memory. head_dim % 4 ==
    /// 0. `scratch` lets it split K, as [`Self::gemv_bf16`]'s.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_rope_kv_append(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        positions: &CudaView<'_, i32>,
        q_out: &mut CudaViewMut<'_, bf16>,
        k_cache: &mut CudaViewMut<'_, bf16>,
        v_cache: &mut CudaViewMut<'_, bf16>,
        s: AttnShape,
        k: usize,
        rms_eps: Option<f32>,
        theta: f32,
        section: Option<[usize; 3]>,
        len_at: Option<DeviceLen<'_>>,
    ) -> Result<()> {
        const OP: &str = "gemv_rope_kv_append";
        let (n, hd) = (s.n, s.head_dim);
        let width = (s.q_heads + 2 * s.kv_heads) * hd;
        rope_head_dim(OP, hd)?;
        if hd % 4 != 0 {
            return Err(shape_err(OP, format!("head_dim {hd} is not a multiple of 4")));
        }
        let Some(g) = self.gemv_launch(OP, x, w, bias, scratch, n, width, k, rms_eps)? else {
            return Ok(());
        };
        let a = self.rope_kv_dest(OP, positions, q_out, k_cache, v_cache, s, section, len_at)?;
        self.launch(
            "gemv",
            GEMV_ROPE_KV[n - 1],
            g.cfg,
            &[
                &g.x,
                &g.w,
                &g.bias,
                &g.partial,
                &g.counters,
                &g.n,
                &g.k,
                &g.eps,
                &a.positions,
                &(s.q_heads as i32),
                &(s.kv_heads as i32),
                &(hd as i32),
                &theta,
                &a.s0,
                &a.s1,
                &a.q_out,
                &a.k_cache,
                &a.v_cache,
                &a.len,
                &a.len_at,
            ],
        )
    }

    /// The launch of a GEMV over `cols` weight rows: GEMV_ROWS_PER_BLOCK a block and, where
    /// `scratch` lets short matrices split K ([`Self::gemv_splits`]), the splits along y
    /// with the scratch pointer they write (0 unsplit).
    fn gemv_grid(
        &self,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> (LaunchConfig, u64) {
        let (splits, sp) = match scratch {
            Some(s) => {
                let splits = self.gemv_splits(rows, cols, k, s.len());
                (splits, if splits > 1 { self.wptr(s) } else { 0 })
            }
            None => (1, 0),
        };
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, splits as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        (cfg, sp)
    }

    /// The split-K arrival counters the GEMV and attention kernels take (one launch at a
    /// time on the stream, so one set serves all).
    pub(super) fn counters_ptr(&self) -> u64 {
        self.rptr(&self.split_counters.as_view())
    }

    /// The fused argmax's row keys and arrival counter (the counter one past those the
    /// split-K launches use).
    fn argmax_scratch_ptrs(&self) -> (u64, u64) {
        (
            self.rptr(&self.argmax_keys.as_view()),
            self.rptr(&self.split_counters.slice(SPLIT_COUNTERS..)),
        )
    }

    /// Splits of K the GEMV would use for this shape with `scratch_len` f32 of scratch.
    pub fn gemv_splits(&self, rows: usize, n: usize, k: usize, scratch_len: usize) -> usize {
        let blocks = n.div_ceil(GEMV_ROWS_PER_BLOCK);
        let target = 2 * self.info.multiprocessors as usize;
        if blocks >= target || blocks > SPLIT_COUNTERS || rows * n == 0 {
            return 1;
        }
        // At least 512 elements (two unrolled steps of a warp) of K per split.
        let by_k = (k / 512).max(1);
        target
            .div_ceil(blocks)
            .min(by_k)
            .min(scratch_len / (rows * n))
            .clamp(1, 64)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemv(
        &self,
        out: Out,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        yp: u64,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        n: usize,
        k: usize,
        fuse: GemvFuse,
    ) -> Result<()> {
        const OP: &str = "gemv_bf16";
        let Some(g) = self.gemv_launch(OP, x, w, bias, scratch, rows, n, k, fuse.rms_eps)? else {
            return Ok(());
        };
        let name = gemv_name(!matches!(out, Out::Bf16), rows);
        let add = fuse.add_to_y as i32;
        let (ip, (kp, ap)) = match out {
            Out::F32Argmax(ip) => (ip, self.argmax_scratch_ptrs()),
            _ => (0, (0, 0)),
        };
        let (c, xp, wp, bp, sp, cp) = (g.cfg, g.x, g.w, g.bias, g.partial, g.counters);
        let (ni, ki, eps) = (g.n, g.k, g.eps);
        match out {
            Out::Bf16 => self.launch("gemv", name, c, &[&xp, &wp, &bp, &yp, &sp, &cp, &ni, &ki, &eps, &add]),
            Out::F32 | Out::F32Argmax(_) => self.launch(
                "gemv",
                name,
                c,
                &[&xp, &wp, &bp, &yp, &sp, &cp, &ni, &ki, &eps, &add, &ip, &kp, &ap],
            ),
        }
    }

    /// What every GEMV over w ([n, k], + bias [n]) and `rows` rows of x ([rows, k])
    /// launches with, checked: its grid (split over K where `scratch` allows), the
    /// pointers and sizes, and the RMS eps (-1: none). None when n == 0 (nothing to do).
    #[allow(clippy::too_many_arguments)]
    fn gemv_launch(
        &self,
        op: &str,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        n: usize,
        k: usize,
        rms_eps: Option<f32>,
    ) -> Result<Option<GemvLaunch>> {
        gemv_checks(op, rows, k)?;
        need(op, "x", x.len(), rows * k)?;
        need(op, "w", w.len(), n * k)?;
        if let Some(b) = bias {
            need(op, "bias", b.len(), n)?;
        }
        let eps = eps_arg(op, rms_eps)?;
        if n == 0 {
            return Ok(None);
        }
        let (xp, wp) = (self.rptr(x), self.rptr(w));
        aligned16(op, "x", xp)?;
        aligned16(op, "w", wp)?;
        let (ni, ki) = (i32_arg(op, "n", n)?, i32_arg(op, "k", k)?);
        let (cfg, partial) = self.gemv_grid(scratch, rows, n, k);
        Ok(Some(GemvLaunch {
            cfg,
            x: xp,
            w: wp,
            bias: bias.map_or(0u64, |b| self.rptr(b)),
            partial,
            counters: self.counters_ptr(),
            n: ni,
            k: ki,
            eps,
        }))
    }

    /// y = x · wᵀ with cuBLAS (bf16 in and out, f32 accumulation): x [m, k], w [n, k]
    /// (nn.Linear layout), y [m, n]. The prefill / vision GEMMs.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need("gemm_bf16", "y", y.len(), m * n)?;
        let yp = self.wptr(y);
        self.gemm_ex("gemm_bf16", x, w, yp, cudaDataType_t::CUDA_R_16BF, m, n, k)
    }

    /// As [`Self::gemm_bf16`] with f32 output: the LM head over more rows than the GEMVs
    /// take (a tree's), its matrix streamed once for them all.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_f32(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need("gemm_bf16_f32", "y", y.len(), m * n)?;
        let yp = self.wptr(y);
        self.gemm_ex("gemm_bf16_f32", x, w, yp, cudaDataType_t::CUDA_R_32F, m, n, k)
    }

    /// cublasGemmEx of bf16 x and w into y (`y_type`, its m · n checked by the caller),
    /// f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex(
        &self,
        op: &str,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        yp: u64,
        y_type: cudaDataType_t,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        need(op, "x", x.len(), m * k)?;
        need(op, "w", w.len(), n * k)?;
        self.uncaptured(op)?;
        let blas = self.blas.as_ref().map_err(|e| cuda_err(op, e))?;
        if m * n == 0 {
            return Ok(());
        }
        let (mi, ni, ki) = (i32_arg(op, "m", m)?, i32_arg(op, "n", n)?, i32_arg(op, "k", k)?);
        let ld = ki.max(1);
        self.bind()?;
        let (xp, wp) = (self.rptr(x), self.rptr(w));
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major y = x wᵀ is column-major yᵀ = w xᵀ: A = w (k × n col-major, transposed),
        // B = x (k × m col-major), C = yᵀ (n × m).
        // SAFETY: x, w and y hold m·k, n·k and m·n elements (checked); the handle is bound
        // to this device's stream, on which the buffers live; alpha and beta outlive the
        // call (cuBLAS reads host scalars before it returns).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                wp as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                ld,
                xp as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                ld,
                (&beta as *const f32).cast(),
                yp as *mut c_void,
                y_type,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err(op, e))
    }

    /// y = x · wᵀ + bias with cuBLASLt, the bias fused as the GEMM's epilogue. Shapes as
    /// [`Self::gemm_bf16`], bias [n]. Where n or k is off the 8-element grid (a leading
    /// dimension not 16-byte aligned, which cuBLASLt's heuristics need not serve, e.g. the
    /// real vision towers' MLP width 3420), or cuBLASLt finds no algorithm for the shape,
    /// it is cuBLAS and a separate bias add.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        y: &mut CudaViewMut<'_, bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "linear";
        need(OP, "x", x.len(), m * k)?;
        need(OP, "w", w.len(), n * k)?;
        need(OP, "y", y.len(), m * n)?;
        if let Some(b) = bias {
            need(OP, "bias", b.len(), n)?;
        }
        let gemm_then_bias = |y: &mut CudaViewMut<'_, bf16>| {
            self.gemm_bf16(x, w, y, m, n, k)?;
            match bias {
                Some(b) => self.bias_add(y, b, m, n),
                None => Ok(()),
            }
        };
        if n % 8 != 0 || k % 8 != 0 {
            return gemm_then_bias(y);
        }
        self.uncaptured(OP)?;
        let lt = self.blas_lt.as_ref().map_err(|e| cuda_err(OP, e))?;
        if m * n == 0 {
            return Ok(());
        }
        self.bind()?;
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k.max(1) as i64,
            ldb: k.max(1) as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: sizes checked above; the bias has the n entries of the output rows.
        match unsafe { lt.matmul(cfg, w, x, y, bias, None) } {
            // The heuristic found no algorithm (nothing ran).
            Err(CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => gemm_then_bias(y),
            r => r.map_err(|e| cuda_err(OP, e)),
        }
    }
}

/// The row counts and K the GEMV kernels serve (one instantiation per count, 16-byte
/// steps along K).
fn gemv_checks(op: &str, rows: usize, k: usize) -> Result<()> {
    if !(1..=GEMV_MAX_ROWS).contains(&rows) {
        return Err(shape_err(op, format!("{rows} rows (supported: 1..={GEMV_MAX_ROWS})")));
    }
    if k % 8 != 0 || k == 0 {
        return Err(shape_err(op, format!("k = {k} is not a positive multiple of 8")));
    }
    Ok(())
}

/// The kernels' rms_eps: the norm's eps, or −1 for none.
fn eps_arg(op: &str, rms_eps: Option<f32>) -> Result<f32> {
    match rms_eps {
        None => Ok(-1.0),
        Some(e) if e.is_finite() && e >= 0.0 => Ok(e),
        Some(e) => Err(shape_err(
            op,
            format!("RMSNorm eps {e} is not a finite non-negative number"),
        )),
    }
}

const GEMV_ROPE_KV: [&str; GEMV_MAX_ROWS] = [
    "gemv_rope_kv_append_b1",
    "gemv_rope_kv_append_b2",
    "gemv_rope_kv_append_b3",
    "gemv_rope_kv_append_b4",
    "gemv_rope_kv_append_b5",
    "gemv_rope_kv_append_b6",
    "gemv_rope_kv_append_b7",
    "gemv_rope_kv_append_b8",
];

const GEMV_SWIGLU: [&str; GEMV_MAX_ROWS] = [
    "gemv_swiglu_b1",
    "gemv_swiglu_b2",
    "gemv_swiglu_b3",
    "gemv_swiglu_b4",
    "gemv_swiglu_b5",
    "gemv_swiglu_b6",
    "gemv_swiglu_b7",
    "gemv_swiglu_b8",
];

fn gemv_name(f32_out: bool, rows: usize) -> &'static str {
    const BF16: [&str; GEMV_MAX_ROWS] = [
        "gemv_bf16_b1",
        "gemv_bf16_b2",
        "gemv_bf16_b3",
        "gemv_bf16_b4",
        "gemv_bf16_b5",
        "gemv_bf16_b6",
        "gemv_bf16_b7",
        "gemv_bf16_b8",
    ];
    const F32: [&str; GEMV_MAX_ROWS] = [
        "gemv_bf16_f32_b1",
        "gemv_bf16_f32_b2",
        "gemv_bf16_f32_b3",
        "gemv_bf16_f32_b4",
        "gemv_bf16_f32_b5",
        "gemv_bf16_f32_b6",
        "gemv_bf16_f32_b7",
        "gemv_bf16_f32_b8",
    ];
    if f32_out {
        F32[rows - 1]
    } else {
        BF16[rows - 1]
    }
}
