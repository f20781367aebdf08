//! The CUDA backend: one context and stream, the fatbins build.rs embedded (one module per
//! `cuda/*.cu`) loaded once, kernel functions cached by name, and one launcher per kernel
//! with the kernel's name. Launchers check shapes (an `Err`, never a panic), write into
//! caller-provided device buffers and allocate nothing, so a model can preallocate every
//! activation and capture a step in a CUDA graph. cuBLAS / cuBLASLt serve the prefill
//! GEMMs. Storage is bf16 ([`bf16`]), accumulation f32; the CPU twins of every kernel are
//! in [`crate::reference`].
//!
//! cudarc loads libcuda / libcublas at run time (`dynamic-loading`), so this compiles and
//! runs on machines without CUDA: [`CudaDevice::new`] probes for the driver library first
//! (cudarc would panic without it) and reports a missing driver, GPU or cuBLAS as an error.
//!
//! Buffers are cudarc's [`CudaSlice`]; launchers take views (`slice.as_view()`,
//! `slice.slice(a..b)`, `slice.as_view_mut()`), so one allocation can hold many tensors
//! (every layer's KV cache, say). Everything runs on [`CudaDevice::stream`]; cudarc's
//! per-buffer event tracking is turned off (one stream needs none, and it would cost a
//! few microseconds per launch).

use std::collections::HashMap;
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
pub use half::bf16;

use super::kernels;
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::spec::tree::Proposal;

/// Keys per attention tile (ATTN_BC in cuda/attention.cu): split-K chunks are multiples.
const ATTN_TILE: usize = 64;
/// Query rows per warp in the attention kernels.
const ATTN_ROWS_PER_WARP: usize = 16;
/// Head dims the attention kernels are instantiated for.
pub const ATTN_HEAD_DIMS: [usize; 5] = [16, 32, 64, 80, 128];
/// Output rows per GEMV block (GEMV_WARPS * GEMV_ROWS in cuda/gemv.cu).
const GEMV_ROWS_PER_BLOCK: usize = 16;
/// Largest row count of gemv_bf16 (one kernel instantiation per count).
pub const GEMV_MAX_ROWS: usize = 8;
/// Longest row of the single-block sampling kernels (MAX_TILES * SAMPLE_TILE).
pub const SAMPLE_MAX_N: usize = 256 * 1024;

/// A CUDA failure as a runtime error. (error.rs has no CUDA variant yet: these surface
/// as `invalid argument: CUDA …`.)
fn cuda_err(what: &str, e: impl Display) -> Error {
    Error::Cuda {
        op: what.to_string(),
        reason: e.to_string(),
    }
}

fn shape_err(op: &str, msg: impl Display) -> Error {
    cuda_err(op, msg)
}

fn i32_arg(op: &str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(op, format!("{name} = {v} exceeds i32")))
}

fn need(op: &str, name: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(shape_err(op, format!("{name} holds {len} elements, needs {want}")));
    }
    Ok(())
}

fn aligned16(op: &str, name: &str, ptr: u64) -> Result<()> {
    if ptr % 16 != 0 {
        return Err(shape_err(
            op,
            format!("{name} is not 16-byte aligned (vectorised loads)"),
        ));
    }
    Ok(())
}

/// Most tokens [`CudaDevice::top_k`] takes per row (a token tree's widest node).
pub const MAX_TOP_K: usize = 64;

/// What [`probe`] found: the device's name and compute capability.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub total_memory: usize,
}

/// Why no CUDA device can be used, or the first device's description. Never panics.
pub fn probe() -> Result<DeviceInfo> {
    if !kernels::COMPILED {
        return Err(Error::NoCudaKernels);
    }
    // SAFETY: only tries to dlopen the driver library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::InvalidArgument(
            "CUDA device requested but the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine"
                .into(),
        ));
    }
    guard("probe", || {
        let count = cudarc::driver::result::init()
            .and_then(|_| cudarc::driver::result::device::get_count())
            .map_err(|e| cuda_err("driver initialisation", e))?;
        if count < 1 {
            return Err(Error::InvalidArgument(
                "CUDA device requested but the driver reports no CUDA device".into(),
            ));
        }
        let ctx = CudaContext::new(0).map_err(|e| cuda_err("context", e))?;
        info(&ctx)
    })
}

fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    Ok(DeviceInfo {
        name: ctx.name().map_err(|e| cuda_err("device name", e))?,
        compute_capability: ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?,
        multiprocessors: ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("multiprocessor count", e))? as u32,
        total_memory: ctx.total_mem().map_err(|e| cuda_err("memory size", e))?,
    })
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an old driver, say)
/// into an error.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into());
        Err(cuda_err(what, msg))
    })
}

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

/// One CUDA device with the massv kernels loaded.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: std::result::Result<CudaBlas, String>,
    blas_lt: std::result::Result<CudaBlasLT, String>,
    info: DeviceInfo,
}

impl CudaDevice {
    /// The first GPU. A clear error (never a panic) without kernels, driver or device.
    pub fn new() -> Result<Self> {
        Self::with_ordinal(0)
    }

    pub fn with_ordinal(ordinal: usize) -> Result<Self> {
        probe()?;
        guard("initialisation", || Self::init(ordinal))
    }

    fn init(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("context", e))?;
        // SAFETY: every buffer of this device lives on its one stream (see the module doc).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let info = info(&ctx)?;
        let mut modules = HashMap::new();
        for &(name, image) in kernels::MODULES {
            // cuModuleLoadData takes a fatbin; the copy is heap memory (16-byte aligned by
            // the allocator), unlike the 1-byte-aligned include_bytes! data.
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| {
                    cuda_err(
                        &format!("loading cuda/{name}.cu"),
                        format!(
                            "{e} (kernels built for {}; this GPU is sm_{}{})",
                            kernels::ARCHS,
                            info.compute_capability.0,
                            info.compute_capability.1
                        ),
                    )
                })?;
            modules.insert(name, module);
        }
        let blas =
            cublas_present().and_then(|_| CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS handle: {e}")));
        let blas_lt = cublas_lt_present()
            .and_then(|_| CudaBlasLT::new(stream.clone()).map_err(|e| format!("cuBLASLt handle: {e}")));
        Ok(CudaDevice {
            ctx,
            stream,
            modules,
            funcs: Mutex::new(HashMap::new()),
            blas,
            blas_lt,
            info,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether the GEMM path can run (cuBLAS found at run time), and why not.
    pub fn cublas_status(&self) -> std::result::Result<(), String> {
        self.blas.as_ref().map(|_| ()).map_err(Clone::clone)
    }

    /// Makes this device's context current on the calling thread (launches and copies do
    /// it themselves; cuBLAS calls and function loading need it).
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }

    // ---------------------------------------------------------------------------------
    // Memory

    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| cuda_err(&format!("allocating {len} elements"), e))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            // SAFETY: a one-element allocation never read before it is written.
            return unsafe { self.stream.alloc(1) }.map_err(|e| cuda_err("allocation", e));
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| cuda_err("host-to-device copy", e))
    }

    /// Copies `host` into the start of `dst` (nothing for an empty `host`).
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        need("upload_into", "dst", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let mut dst = dst.slice_mut(..host.len());
        self.stream
            .memcpy_htod(host, &mut dst)
            .map_err(|e| cuda_err("host-to-device copy", e))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, src: &CudaView<'_, T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(src)
            .map_err(|e| cuda_err("device-to-host copy", e))
    }

    /// Device-to-device copy of `src` into the start of `dst`.
    pub fn copy<T: DeviceRepr>(&self, src: &CudaView<'_, T>, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        need("copy", "dst", dst.len(), src.len())?;
        let mut dst = dst.slice_mut(..src.len());
        self.stream
            .memcpy_dtod(src, &mut dst)
            .map_err(|e| cuda_err("device-to-device copy", e))
    }

    /// Milliseconds `f` takes on the stream (events around it; `f` only queues work).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        let start = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("event", e))?;
        let end = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("event", e))?;
        start.record(&self.stream).map_err(|e| cuda_err("event", e))?;
        f()?;
        end.record(&self.stream).map_err(|e| cuda_err("event", e))?;
        end.synchronize().map_err(|e| cuda_err("event", e))?;
        start.elapsed_ms(&end).map_err(|e| cuda_err("event", e))
    }

    // ---------------------------------------------------------------------------------
    // Launch plumbing

    /// The kernel `name` of module `module` (= cuda/<module>.cu), loaded once.
    fn func(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut funcs = self.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = funcs.get(name) {
            return Ok(f.clone());
        }
        self.bind()?;
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| cuda_err("kernels", format!("module {module} (cuda/{module}.cu) is not embedded")))?;
        let f = m
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name} in cuda/{module}.cu"), e))?;
        funcs.insert(name, f.clone());
        Ok(f)
    }

    fn launch(&self, module: &'static str, name: &'static str, cfg: LaunchConfig, args: &[&dyn Arg]) -> Result<()> {
        let f = self.func(module, name)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: each launcher checked the buffer sizes against the kernel's contract
        // and passes the arguments in the kernel's order and C types.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {name}"), e))?;
        Ok(())
    }

    fn rptr<T>(&self, x: &CudaView<'_, T>) -> u64 {
        x.device_ptr(&self.stream).0
    }

    fn wptr<T>(&self, x: &mut CudaViewMut<'_, T>) -> u64 {
        x.device_ptr_mut(&self.stream).0
    }

    // ---------------------------------------------------------------------------------
    // Normalisation, activations, rotary embeddings (cuda/rmsnorm.cu, swiglu.cu, rope.cu,
    // projector.cu)

    /// y = rmsnorm(x) · w per row; x, y: [rows, dim], w: [dim].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm";
        need(OP, "x", x.len(), rows * dim)?;
        need(OP, "w", w.len(), dim)?;
        need(OP, "y", y.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, wp, yp) = (self.rptr(x), self.rptr(w), self.wptr(y));
        self.launch(
            "rmsnorm",
            "rmsnorm",
            row_cfg(rows, dim),
            &[&xp, &wp, &yp, &i32_arg(OP, "dim", dim)?, &eps],
        )
    }

    /// residual += x, y = rmsnorm(residual) · w; x, residual, y: [rows, dim].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual(
        &self,
        x: &CudaView<'_, bf16>,
        residual: &mut CudaViewMut<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rmsnorm_residual";
        need(OP, "x", x.len(), rows * dim)?;
        need(OP, "residual", residual.len(), rows * dim)?;
        need(OP, "w", w.len(), dim)?;
        need(OP, "y", y.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, rp, wp, yp) = (self.rptr(x), self.wptr(residual), self.rptr(w), self.wptr(y));
        self.launch(
            "rmsnorm",
            OP,
            row_cfg(rows, dim),
            &[&xp, &rp, &wp, &yp, &i32_arg(OP, "dim", dim)?, &eps],
        )
    }

    /// out = silu(gate) · up; gate_up: [rows, 2 · inter] (gate first), out: [rows, inter].
    pub fn swiglu(
        &self,
        gate_up: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu";
        need(OP, "gate_up", gate_up.len(), rows * 2 * inter)?;
        need(OP, "out", out.len(), rows * inter)?;
        if rows * inter == 0 {
            return Ok(());
        }
        let (gp, op) = (self.rptr(gate_up), self.wptr(out));
        self.launch(
            "swiglu",
            "swiglu",
            elementwise_cfg(rows * inter),
            &[&gp, &op, &i32_arg(OP, "rows", rows)?, &i32_arg(OP, "inter", inter)?],
        )
    }

    /// RoPE in place; x: [tokens, heads, head_dim], positions: [tokens].
    pub fn rope(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        positions: &CudaView<'_, i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope";
        rope_checks(OP, x.len(), tokens, heads, head_dim)?;
        need(OP, "positions", positions.len(), tokens)?;
        if tokens == 0 {
            return Ok(());
        }
        let (xp, pp) = (self.wptr(x), self.rptr(positions));
        self.launch(
            "rope",
            "rope",
            rope_cfg(tokens, heads, head_dim),
            &[&xp, &pp, &(heads as i32), &(head_dim as i32), &theta],
        )
    }

    /// M-RoPE in place; positions: [3, tokens] (temporal, height, width rows); `section`
    /// pairs per axis, summing to head_dim / 2.
    #[allow(clippy::too_many_arguments)]
    pub fn mrope(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        positions: &CudaView<'_, i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
        section: [usize; 3],
    ) -> Result<()> {
        const OP: &str = "mrope";
        rope_checks(OP, x.len(), tokens, heads, head_dim)?;
        need(OP, "positions", positions.len(), 3 * tokens)?;
        if section.iter().sum::<usize>() != head_dim / 2 {
            return Err(shape_err(
                OP,
                format!("section {section:?} does not sum to head_dim / 2"),
            ));
        }
        if tokens == 0 {
            return Ok(());
        }
        let (xp, pp) = (self.wptr(x), self.rptr(positions));
        self.launch(
            "rope",
            "mrope",
            rope_cfg(tokens, heads, head_dim),
            &[
                &xp,
                &pp,
                &i32_arg(OP, "tokens", tokens)?,
                &(heads as i32),
                &(head_dim as i32),
                &theta,
                &(section[0] as i32),
                &(section[1] as i32),
            ],
        )
    }

    /// The vision tower's 2-D RoPE in place; rows, cols: [tokens] (the patch's grid row and
    /// column).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_vision(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        rows: &CudaView<'_, i32>,
        cols: &CudaView<'_, i32>,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        const OP: &str = "rope_vision";
        rope_checks(OP, x.len(), tokens, heads, head_dim)?;
        need(OP, "rows", rows.len(), tokens)?;
        need(OP, "cols", cols.len(), tokens)?;
        if head_dim % 4 != 0 {
            return Err(shape_err(OP, format!("head_dim {head_dim} is not a multiple of 4")));
        }
        if tokens == 0 {
            return Ok(());
        }
        let (xp, rp, cp) = (self.wptr(x), self.rptr(rows), self.rptr(cols));
        self.launch(
            "rope",
            OP,
            rope_cfg(tokens, heads, head_dim),
            &[&xp, &rp, &cp, &(heads as i32), &(head_dim as i32), &theta],
        )
    }

    /// Exact GELU in place over x's first n values.
    pub fn gelu(&self, x: &mut CudaViewMut<'_, bf16>, n: usize) -> Result<()> {
        need("gelu", "x", x.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let xp = self.wptr(x);
        self.launch("projector", "gelu", elementwise_cfg(n), &[&xp, &xp, &(n as i64)])
    }

    /// x = gelu(x + bias) in place; x: [rows, cols], bias: [cols].
    pub fn bias_gelu(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        bias: &CudaView<'_, bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.bias_op("bias_gelu", x, bias, rows, cols)
    }

    /// x += bias in place; x: [rows, cols], bias: [cols].
    pub fn bias_add(
        &self,
        x: &mut CudaViewMut<'_, bf16>,
        bias: &CudaView<'_, bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.bias_op("bias_add", x, bias, rows, cols)
    }

    fn bias_op(
        &self,
        op: &'static str,
        x: &mut CudaViewMut<'_, bf16>,
        bias: &CudaView<'_, bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        need(op, "x", x.len(), rows * cols)?;
        need(op, "bias", bias.len(), cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let (xp, bp) = (self.wptr(x), self.rptr(bias));
        self.launch(
            "projector",
            op,
            elementwise_cfg(rows * cols),
            &[&xp, &bp, &i32_arg(op, "rows", rows)?, &i32_arg(op, "cols", cols)?],
        )
    }

    /// RMSNorm of each vision patch (x: [patches, dv]) into fc1's input rows
    /// (y: [patches / m2, m2 · dv]); patches must be a multiple of m2.
    #[allow(clippy::too_many_arguments)]
    pub fn projector_norm_gather(
        &self,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
        patches: usize,
        dv: usize,
        m2: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "projector_norm_gather";
        if m2 == 0 || patches % m2 != 0 {
            return Err(shape_err(OP, format!("{patches} patches are not groups of {m2}")));
        }
        need(OP, "x", x.len(), patches * dv)?;
        need(OP, "w", w.len(), dv)?;
        need(OP, "y", y.len(), patches * dv)?;
        if patches == 0 {
            return Ok(());
        }
        let (xp, wp, yp) = (self.rptr(x), self.rptr(w), self.wptr(y));
        self.launch(
            "projector",
            OP,
            row_cfg(patches, dv),
            &[&xp, &wp, &yp, &i32_arg(OP, "dv", dv)?, &eps],
        )
    }

    // ---------------------------------------------------------------------------------
    // Embeddings, KV cache, conversions (cuda/embedding.cu, kv_cache.cu, convert.cu)

    /// out[t] = table[ids[t]] (zero rows for ids outside the table); table: [vocab, dim].
    pub fn embedding(
        &self,
        ids: &CudaView<'_, i32>,
        table: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
        n: usize,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "embedding";
        need(OP, "ids", ids.len(), n)?;
        need(OP, "out", out.len(), n * dim)?;
        if dim == 0 || table.len() % dim != 0 {
            return Err(shape_err(
                OP,
                format!("table of {} values is not rows of {dim}", table.len()),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let (ip, tp, op) = (self.rptr(ids), self.rptr(table), self.wptr(out));
        if dim % 8 == 0 {
            aligned16(OP, "table", tp)?;
            aligned16(OP, "out", op)?;
        }
        self.launch(
            "embedding",
            OP,
            row_cfg(n, dim / 8 + 1),
            &[&ip, &tp, &op, &i32_arg(OP, "vocab", table.len() / dim)?, &(dim as i32)],
        )
    }

    /// dst[positions[i]] = src[i] for the m rows of src; rows past dst_rows are skipped.
    pub fn scatter_rows(
        &self,
        src: &CudaView<'_, bf16>,
        positions: &CudaView<'_, i32>,
        dst: &mut CudaViewMut<'_, bf16>,
        m: usize,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "scatter_rows";
        need(OP, "src", src.len(), m * dim)?;
        need(OP, "positions", positions.len(), m)?;
        if dim == 0 {
            return Err(shape_err(OP, "dim is 0"));
        }
        if m == 0 {
            return Ok(());
        }
        let dst_rows = dst.len() / dim;
        let (sp, pp, dp) = (self.rptr(src), self.rptr(positions), self.wptr(dst));
        self.launch(
            "embedding",
            OP,
            row_cfg(m, dim),
            &[
                &sp,
                &pp,
                &dp,
                &i32_arg(OP, "dst rows", dst_rows)?,
                &i32_arg(OP, "dim", dim)?,
            ],
        )
    }

    /// Writes n new rows (k_new, v_new: [n, row]) at positions len.. of the caches
    /// ([capacity, row]).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        k_new: &CudaView<'_, bf16>,
        v_new: &CudaView<'_, bf16>,
        k_cache: &mut CudaViewMut<'_, bf16>,
        v_cache: &mut CudaViewMut<'_, bf16>,
        len: usize,
        n: usize,
        row: usize,
    ) -> Result<()> {
        const OP: &str = "kv_append";
        need(OP, "k_new", k_new.len(), n * row)?;
        need(OP, "v_new", v_new.len(), n * row)?;
        need(OP, "k_cache", k_cache.len(), (len + n) * row)?;
        need(OP, "v_cache", v_cache.len(), (len + n) * row)?;
        if n == 0 {
            return Ok(());
        }
        let (kn, vn, kc, vc) = (
            self.rptr(k_new),
            self.rptr(v_new),
            self.wptr(k_cache),
            self.wptr(v_cache),
        );
        if row % 8 == 0 {
            for (name, p) in [("k_new", kn), ("v_new", vn), ("k_cache", kc), ("v_cache", vc)] {
                aligned16(OP, name, p)?;
            }
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 2, 1),
            block_dim: (threads_for(row.div_ceil(8)), 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "kv_cache",
            OP,
            cfg,
            &[&kn, &vn, &kc, &vc, &i32_arg(OP, "len", len)?, &i32_arg(OP, "row", row)?],
        )
    }

    /// cache[dst + i] = cache[path[i]] in each of `buffers` caches laid out
    /// `buffer_stride` elements apart (path ascending, path[i] >= dst + i).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_compact(
        &self,
        cache: &mut CudaViewMut<'_, bf16>,
        path: &CudaView<'_, i32>,
        m: usize,
        dst: usize,
        row: usize,
        buffers: usize,
        buffer_stride: usize,
    ) -> Result<()> {
        const OP: &str = "kv_compact";
        need(OP, "path", path.len(), m)?;
        if buffers == 0 || m == 0 {
            return Ok(());
        }
        need(
            OP,
            "cache",
            cache.len(),
            (buffers - 1) * buffer_stride + (dst + m) * row,
        )?;
        let (cp, pp) = (self.wptr(cache), self.rptr(path));
        let cfg = LaunchConfig {
            grid_dim: (buffers as u32, 1, 1),
            block_dim: (threads_for(row), 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "kv_cache",
            OP,
            cfg,
            &[
                &cp,
                &pp,
                &i32_arg(OP, "m", m)?,
                &i32_arg(OP, "dst", dst)?,
                &i32_arg(OP, "row", row)?,
                &(buffer_stride as i64),
            ],
        )
    }

    pub fn f32_to_bf16(&self, x: &CudaView<'_, f32>, y: &mut CudaViewMut<'_, bf16>, n: usize) -> Result<()> {
        need("f32_to_bf16", "x", x.len(), n)?;
        need("f32_to_bf16", "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, yp) = (self.rptr(x), self.wptr(y));
        self.launch("convert", "f32_to_bf16", elementwise_cfg(n), &[&xp, &yp, &(n as i64)])
    }

    pub fn bf16_to_f32(&self, x: &CudaView<'_, bf16>, y: &mut CudaViewMut<'_, f32>, n: usize) -> Result<()> {
        need("bf16_to_f32", "x", x.len(), n)?;
        need("bf16_to_f32", "y", y.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let (xp, yp) = (self.rptr(x), self.wptr(y));
        self.launch("convert", "bf16_to_f32", elementwise_cfg(n), &[&xp, &yp, &(n as i64)])
    }

    // ---------------------------------------------------------------------------------
    // GEMV (decode) and GEMM (prefill)

    /// y[b, n] = x[b, :] · w[n, :] (+ bias[n]) for `rows` = 1..=8 rows of x ([rows, k]),
    /// w: [n, k] bf16, y: [rows, n] bf16. k % 8 == 0. `scratch` (f32, at least
    /// splits · rows · n) lets a short matrix split K over more blocks; None = no split.
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
    ) -> Result<()> {
        need("gemv_bf16", "y", y.len(), rows * n)?;
        let yp = self.wptr(y);
        self.gemv(false, x, w, bias, yp, scratch, rows, n, k)
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
    ) -> Result<()> {
        need("gemv_bf16", "y", y.len(), rows * n)?;
        let yp = self.wptr(y);
        self.gemv(true, x, w, bias, yp, scratch, rows, n, k)
    }

    /// Splits of K the GEMV would use for this shape with `scratch_len` f32 of scratch.
    pub fn gemv_splits(&self, rows: usize, n: usize, k: usize, scratch_len: usize) -> usize {
        let blocks = n.div_ceil(GEMV_ROWS_PER_BLOCK);
        let target = 2 * self.info.multiprocessors as usize;
        if blocks >= target || rows * n == 0 {
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
        f32_out: bool,
        x: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        bias: Option<&CudaView<'_, bf16>>,
        yp: u64,
        scratch: Option<&mut CudaViewMut<'_, f32>>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "gemv_bf16";
        if !(1..=GEMV_MAX_ROWS).contains(&rows) {
            return Err(shape_err(OP, format!("{rows} rows (supported: 1..={GEMV_MAX_ROWS})")));
        }
        if k % 8 != 0 || k == 0 {
            return Err(shape_err(OP, format!("k = {k} is not a positive multiple of 8")));
        }
        need(OP, "x", x.len(), rows * k)?;
        need(OP, "w", w.len(), n * k)?;
        if let Some(b) = bias {
            need(OP, "bias", b.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let (xp, wp) = (self.rptr(x), self.rptr(w));
        aligned16(OP, "x", xp)?;
        aligned16(OP, "w", wp)?;
        let bp = bias.map_or(0u64, |b| self.rptr(b));
        let (ni, ki) = (i32_arg(OP, "n", n)?, i32_arg(OP, "k", k)?);
        let (splits, sp) = match scratch {
            Some(s) => {
                let splits = self.gemv_splits(rows, n, k, s.len());
                (splits, if splits > 1 { self.wptr(s) } else { 0 })
            }
            None => (1, 0),
        };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(GEMV_ROWS_PER_BLOCK) as u32, splits as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = gemv_name(f32_out, rows);
        self.launch("gemv", name, cfg, &[&xp, &wp, &bp, &yp, &sp, &ni, &ki])?;
        if splits > 1 {
            let reduce = if f32_out { "gemv_reduce_f32" } else { "gemv_reduce_bf16" };
            self.launch(
                "gemv",
                reduce,
                elementwise_cfg(rows * n),
                &[&sp, &bp, &yp, &(rows as i32), &ni, &(splits as i32)],
            )?;
        }
        Ok(())
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
        const OP: &str = "gemm_bf16";
        need(OP, "x", x.len(), m * k)?;
        need(OP, "w", w.len(), n * k)?;
        need(OP, "y", y.len(), m * n)?;
        let blas = self.blas.as_ref().map_err(|e| cuda_err(OP, e))?;
        if m * n == 0 {
            return Ok(());
        }
        self.bind()?;
        // Row-major y = x wᵀ is column-major yᵀ = w xᵀ: A = w (k × n col-major, transposed),
        // B = x (k × m col-major), C = yᵀ (n × m).
        let cfg = GemmConfig {
            transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
            transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            m: i32_arg(OP, "n", n)?,
            n: i32_arg(OP, "m", m)?,
            k: i32_arg(OP, "k", k)?,
            alpha: bf16::ONE,
            lda: k.max(1) as i32,
            ldb: k.max(1) as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: sizes checked above against the config's m, n, k and leading dimensions.
        unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| cuda_err(OP, e))
    }

    /// y = x · wᵀ + bias with cuBLASLt, the bias fused as the GEMM's epilogue. Shapes as
    /// [`Self::gemm_bf16`], bias [n]. Where n or k is off the 8-element grid (a leading
    /// dimension not 16-byte aligned, which cuBLASLt's heuristics need not serve, e.g. the
    /// real vision towers' MLP width 3420) it is cuBLAS and a separate bias add.
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
        if n % 8 != 0 || k % 8 != 0 {
            self.gemm_bf16(x, w, y, m, n, k)?;
            return match bias {
                Some(b) => self.bias_add(y, b, m, n),
                None => Ok(()),
            };
        }
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
        unsafe { lt.matmul(cfg, w, x, y, bias, None) }.map_err(|e| cuda_err(OP, e))
    }

    // ---------------------------------------------------------------------------------
    // Attention (cuda/attention.cu)

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
        self.attention(AttnMode::Prefill, q, k, v, out, shape, kv_len, window, None, scratch)
    }

    /// One new query per sequence (q: [q_heads, d]) against the `len` cached keys (the new
    /// one included), split over the keys (split-K) + attention_combine.
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
        self.attention(AttnMode::Decode, q, k, v, out, shape, len, None, None, Some(scratch))
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
    ) -> Result<()> {
        let op = match mode {
            AttnMode::Prefill => "attention_prefill",
            AttnMode::Decode => "attention_decode",
            AttnMode::Verify => "attention_verify",
            AttnMode::Varlen => "attention_varlen",
        };
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
            if base_blocks < target && sc.rows >= out_rows && sc.head_dim >= s.head_dim {
                let by_keys = kv_len.div_ceil(ATTN_TILE);
                splits = target.div_ceil(base_blocks).min(by_keys).min(sc.splits).max(1);
                if splits > 1 {
                    op_ptr = sc.o_part.device_ptr_mut(&self.stream).0;
                    ml_ptr = sc.ml_part.device_ptr_mut(&self.stream).0;
                }
            }
        }
        let keys_per_split = kv_len.div_ceil(splits).div_ceil(ATTN_TILE) * ATTN_TILE;
        let splits = kv_len.div_ceil(keys_per_split).max(1);
        let params = AttnParams {
            q: self.rptr(q),
            k: self.rptr(k),
            v: self.rptr(v),
            out: self.wptr(out),
            o_part: op_ptr,
            ml_part: ml_ptr,
            mask: mask.map_or(0, |m| m.0),
            cu_seqlens: 0,
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
        self.launch("attention", attn_name(mode, s.head_dim), cfg, &[&params])?;
        if splits > 1 {
            let cfg = LaunchConfig {
                grid_dim: (out_rows as u32, 1, 1),
                block_dim: (threads_for(s.head_dim), 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                "attention",
                "attention_combine",
                cfg,
                &[
                    &op_ptr,
                    &ml_ptr,
                    &params.out,
                    &(out_rows as i32),
                    &params.hq,
                    &(s.head_dim as i32),
                    &(splits as i32),
                    &params.out_stride,
                ],
            )?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------
    // Sampling and verification (cuda/sampling.cu)

    /// First index of each row's maximum; x: [rows, n] f32, out: [rows].
    pub fn argmax(&self, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, i32>, rows: usize, n: usize) -> Result<()> {
        const OP: &str = "argmax";
        need(OP, "x", x.len(), rows * n)?;
        need(OP, "out", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, op) = (self.rptr(x), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(rows, 1024),
            &[&xp, &op, &i32_arg(OP, "n", n)?],
        )
    }

    /// The sampling distribution of each row (massv::sampling::probabilities); logits,
    /// out: [rows, n] f32.
    pub fn probabilities(
        &self,
        logits: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        params: &SamplingParams,
    ) -> Result<()> {
        const OP: &str = "probabilities";
        params.validate()?;
        need(OP, "logits", logits.len(), rows * n)?;
        need(OP, "out", out.len(), rows * n)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let (lp, op) = (self.rptr(logits), self.wptr(out));
        let top_k = params.top_k.min(i32::MAX as usize) as i32;
        self.launch(
            "sampling",
            OP,
            block_per_row(rows, 1024),
            &[
                &lp,
                &op,
                &i32_arg(OP, "n", n)?,
                &params.temperature,
                &top_k,
                &params.top_p,
            ],
        )
    }

    /// Per row of logits ([rows, n]) the k most likely tokens of the plain softmax with a
    /// non-zero probability, best first (ties: lower id), into ids and probs ([rows, k]);
    /// id -1, probability 0 past the last. k ≤ [`MAX_TOP_K`]. Twin: `reference::top_k`.
    #[allow(clippy::too_many_arguments)]
    pub fn top_k(
        &self,
        logits: &CudaView<'_, f32>,
        ids: &mut CudaViewMut<'_, i32>,
        probs: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "top_k";
        if k == 0 || k > MAX_TOP_K {
            return Err(shape_err(OP, format!("k = {k} (1 to {MAX_TOP_K})")));
        }
        need(OP, "logits", logits.len(), rows * n)?;
        need(OP, "ids", ids.len(), rows * k)?;
        need(OP, "probs", probs.len(), rows * k)?;
        if rows == 0 {
            return Ok(());
        }
        let (lp, ip, pp) = (self.rptr(logits), self.wptr(ids), self.wptr(probs));
        self.launch(
            "sampling",
            OP,
            block_per_row(rows, 1024),
            &[&lp, &ip, &pp, &i32_arg(OP, "n", n)?, &(k as i32)],
        )
    }

    /// [`Self::top_k`] of rows that already are distributions (q: [rows, n]), ranked by
    /// their own values (`reference::top_k_probs`).
    pub fn top_k_probs(
        &self,
        q: &CudaView<'_, f32>,
        ids: &mut CudaViewMut<'_, i32>,
        probs: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        const OP: &str = "top_k_probs";
        if k == 0 || k > MAX_TOP_K {
            return Err(shape_err(OP, format!("k = {k} (1 to {MAX_TOP_K})")));
        }
        need(OP, "q", q.len(), rows * n)?;
        need(OP, "ids", ids.len(), rows * k)?;
        need(OP, "probs", probs.len(), rows * k)?;
        if rows == 0 {
            return Ok(());
        }
        let (qp, ip, pp) = (self.rptr(q), self.wptr(ids), self.wptr(probs));
        self.launch(
            "sampling",
            OP,
            block_per_row(rows, 1024),
            &[&qp, &ip, &pp, &i32_arg(OP, "n", n)?, &(k as i32)],
        )
    }

    /// A token tree's children drawn without replacement
    /// (`reference::sample_without_replacement`): node j draws counts[j] tokens from q row
    /// row0 + j (q: [rows, n]) with the next of `uniforms` ([sum counts]); `out` ([sum
    /// counts + 1]) gets the draws node by node (-1 past a node's last) and then the
    /// uniforms used, `out_q` ([sum counts]) each draw's probability in its row; `work`:
    /// [n] scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_without_replacement(
        &self,
        q: &CudaView<'_, f32>,
        counts: &CudaView<'_, i32>,
        uniforms: &CudaView<'_, f64>,
        work: &mut CudaViewMut<'_, f32>,
        out: &mut CudaViewMut<'_, i32>,
        out_q: &mut CudaViewMut<'_, f32>,
        row0: usize,
        m: usize,
        total: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "sample_without_replacement";
        check_sample_n(OP, n)?;
        need(OP, "q", q.len(), (row0 + m) * n)?;
        need(OP, "counts", counts.len(), m)?;
        need(OP, "uniforms", uniforms.len(), total)?;
        need(OP, "work", work.len(), n)?;
        need(OP, "out", out.len(), total + 1)?;
        need(OP, "out_q", out_q.len(), total)?;
        let (qp, cp, up, wp, op, oq) = (
            self.rptr(q),
            self.rptr(counts),
            self.rptr(uniforms),
            self.wptr(work),
            self.wptr(out),
            self.wptr(out_q),
        );
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 1024),
            &[
                &qp,
                &cp,
                &up,
                &wp,
                &op,
                &oq,
                &i32_arg(OP, "m", m)?,
                &i32_arg(OP, "row0", row0)?,
                &(n as i32),
            ],
        )
    }

    /// One draw per row from non-negative weights w ([rows, n]) with uniforms[row].
    pub fn sample(
        &self,
        w: &CudaView<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        out: &mut CudaViewMut<'_, i32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "sample";
        need(OP, "w", w.len(), rows * n)?;
        need(OP, "uniforms", uniforms.len(), rows)?;
        need(OP, "out", out.len(), rows)?;
        check_sample_n(OP, n)?;
        if rows == 0 {
            return Ok(());
        }
        let (wp, up, op) = (self.rptr(w), self.rptr(uniforms), self.wptr(out));
        self.launch("sampling", OP, block_per_row(rows, 1024), &[&wp, &up, &op, &(n as i32)])
    }

    /// (accepted, next) of greedy verification into out[0..2]; drafts: [γ],
    /// target_argmax: [γ + 1].
    pub fn verify_greedy(
        &self,
        drafts: &CudaView<'_, i32>,
        target_argmax: &CudaView<'_, i32>,
        out: &mut CudaViewMut<'_, i32>,
        gamma: usize,
    ) -> Result<()> {
        const OP: &str = "verify_greedy";
        need(OP, "drafts", drafts.len(), gamma)?;
        need(OP, "target_argmax", target_argmax.len(), gamma + 1)?;
        need(OP, "out", out.len(), 2)?;
        let (dp, tp, op) = (self.rptr(drafts), self.rptr(target_argmax), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 32),
            &[&dp, &tp, &op, &i32_arg(OP, "gamma", gamma)?],
        )
    }

    /// (accepted, next) of rejection-sampling verification into out[0..2]: drafts [γ],
    /// q [γ, nq], p [γ + 1, np], uniforms [γ + 1] (the host RNG's next draws; see
    /// `reference::verify_sampled` and `reference::uniforms_consumed`).
    #[allow(clippy::too_many_arguments)]
    pub fn verify_sampled(
        &self,
        drafts: &CudaView<'_, i32>,
        q: &CudaView<'_, f32>,
        p: &CudaView<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        out: &mut CudaViewMut<'_, i32>,
        gamma: usize,
        nq: usize,
        np: usize,
    ) -> Result<()> {
        const OP: &str = "verify_sampled";
        need(OP, "drafts", drafts.len(), gamma)?;
        need(OP, "q", q.len(), gamma * nq)?;
        need(OP, "p", p.len(), (gamma + 1) * np)?;
        need(OP, "uniforms", uniforms.len(), gamma + 1)?;
        need(OP, "out", out.len(), 2)?;
        check_sample_n(OP, np)?;
        let (dp, qp, pp, up, op) = (
            self.rptr(drafts),
            self.rptr(q),
            self.rptr(p),
            self.rptr(uniforms),
            self.wptr(out),
        );
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 1024),
            &[
                &dp,
                &qp,
                &pp,
                &up,
                &op,
                &i32_arg(OP, "gamma", gamma)?,
                &i32_arg(OP, "nq", nq)?,
                &(np as i32),
            ],
        )
    }

    /// Greedy verification of a token tree of n nodes (node 0 the root; children after
    /// their parent, siblings in proposal order): tokens, parents, argmax: [n] (argmax[i]
    /// the target's argmax after the path to node i). out: [n + 1] ← (m, next,
    /// path[0..m]), the accepted path's node indices root-side first.
    /// Twin: `reference::verify_tree_greedy`.
    pub fn verify_tree_greedy(
        &self,
        tokens: &CudaView<'_, i32>,
        parents: &CudaView<'_, i32>,
        argmax: &CudaView<'_, i32>,
        out: &mut CudaViewMut<'_, i32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "verify_tree_greedy";
        check_tree_n(OP, n)?;
        need(OP, "tokens", tokens.len(), n)?;
        need(OP, "parents", parents.len(), n)?;
        need(OP, "argmax", argmax.len(), n)?;
        need(OP, "out", out.len(), n + 1)?;
        let (tp, pp, ap, op) = (self.rptr(tokens), self.rptr(parents), self.rptr(argmax), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 32),
            &[&tp, &pp, &ap, &op, &i32_arg(OP, "n", n)?],
        )
    }

    /// Multi-candidate rejection sampling down a token tree of n nodes into out: [n + 1]
    /// ← (m, next, path[0..m]). tokens, parents: [n]; p: [n, np] the target's distribution
    /// after the path to each node; q: [q_rows, nq] drafter rows and q_row: [n] the row
    /// each node's children were drawn from (-1: none; used with [`Proposal::Sampled`]
    /// only, otherwise children are point-mass proposals); uniforms: [n] (the host RNG's
    /// next draws: one per tested child, then the final draw; see
    /// `reference::tree_uniforms_consumed`); work: [np + nq] scratch ([np] for
    /// [`Proposal::Fixed`]). Twin: `reference::verify_tree_sampled`.
    #[allow(clippy::too_many_arguments)]
    pub fn verify_tree_sampled(
        &self,
        tokens: &CudaView<'_, i32>,
        parents: &CudaView<'_, i32>,
        proposal: Proposal,
        q_row: &CudaView<'_, i32>,
        q: &CudaView<'_, f32>,
        p: &CudaView<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        work: &mut CudaViewMut<'_, f32>,
        out: &mut CudaViewMut<'_, i32>,
        n: usize,
        q_rows: usize,
        nq: usize,
        np: usize,
    ) -> Result<()> {
        const OP: &str = "verify_tree_sampled";
        check_tree_n(OP, n)?;
        check_sample_n(OP, np)?;
        let sampled = proposal == Proposal::Sampled;
        need(OP, "tokens", tokens.len(), n)?;
        need(OP, "parents", parents.len(), n)?;
        need(OP, "p", p.len(), n * np)?;
        need(OP, "uniforms", uniforms.len(), n)?;
        need(OP, "out", out.len(), n + 1)?;
        if sampled {
            need(OP, "q_row", q_row.len(), n)?;
            if q_rows > 0 {
                check_sample_n(OP, nq)?;
            }
            need(OP, "q", q.len(), q_rows * nq)?;
            need(OP, "work", work.len(), np + nq)?;
        } else {
            need(OP, "work", work.len(), np)?;
        }
        let (tp, pa, qr, qp, pp, up, wp, op) = (
            self.rptr(tokens),
            self.rptr(parents),
            self.rptr(q_row),
            self.rptr(q),
            self.rptr(p),
            self.rptr(uniforms),
            self.wptr(work),
            self.wptr(out),
        );
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 1024),
            &[
                &tp,
                &pa,
                &qr,
                &qp,
                &pp,
                &up,
                &wp,
                &op,
                &(n as i32),
                &(sampled as i32),
                &i32_arg(OP, "q_rows", if sampled { q_rows } else { 0 })?,
                &i32_arg(OP, "nq", if sampled { nq } else { 0 })?,
                &(np as i32),
            ],
        )
    }
}

/// A kernel argument: anything the launch builder accepts by reference.
trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: DeviceRepr> Arg for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}

fn cublas_present() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen libcublas by its usual names.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libcublas.so.13 (or .12) not found: put cuBLAS's folder on LD_LIBRARY_PATH".into())
    }
}

fn cublas_lt_present() -> std::result::Result<(), String> {
    // SAFETY: only tries to dlopen libcublasLt by its usual names.
    if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        Ok(())
    } else {
        Err("libcublasLt.so.13 (or .12) not found: put cuBLAS's folder on LD_LIBRARY_PATH".into())
    }
}

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

fn check_sample_n(op: &str, n: usize) -> Result<()> {
    if n == 0 || n > SAMPLE_MAX_N {
        return Err(shape_err(
            op,
            format!("rows of {n} entries (supported: 1..={SAMPLE_MAX_N})"),
        ));
    }
    Ok(())
}

fn check_tree_n(op: &str, n: usize) -> Result<()> {
    if n == 0 || n > i32::MAX as usize - 2 {
        return Err(shape_err(
            op,
            format!("a tree of {n} nodes (the root counts: at least 1)"),
        ));
    }
    Ok(())
}

fn rope_checks(op: &str, len: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
    if head_dim % 2 != 0 || head_dim > 512 || head_dim == 0 {
        return Err(shape_err(op, format!("head_dim {head_dim} (even, at most 512)")));
    }
    need(op, "x", len, tokens * heads * head_dim)
}

/// Threads for a block that strides over `work` items: a multiple of 32, at most 1024.
fn threads_for(work: usize) -> u32 {
    (work.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn row_cfg(rows: usize, dim: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads_for(dim).min(512), 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rope_cfg(tokens: usize, heads: usize, head_dim: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens as u32, 1, 1),
        block_dim: (threads_for(heads * head_dim / 2).min(256), 1, 1),
        shared_mem_bytes: 0,
    }
}

fn block_per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn elementwise_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
