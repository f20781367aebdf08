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
//!
//! The launchers are grouped by the `cuda/*.cu` files they drive: `layers.rs` (rmsnorm,
//! swiglu, rope, projector, embedding, kv_cache, convert), `matmul.rs` (gemv, cuBLAS /
//! cuBLASLt), `attention.rs` and `sampling.rs`; this file holds the device itself.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Display;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::sys::{
    CUdevice_attribute, CUevent_flags, CUgraphInstantiate_flags, CUlaunchAttribute, CUlaunchAttributeID,
    CUlaunchConfig, CUresult, CUstreamCaptureMode,
};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
pub use half::bf16;

use super::kernels;
use crate::error::{Error, Result};

mod attention;
mod layers;
mod matmul;
mod sampling;

pub use attention::{AttnScratch, AttnShape, DeviceLen, ATTN_HEAD_DIMS};
use matmul::SPLIT_COUNTERS;
pub use matmul::{GemvFuse, GEMV_MAX_ROWS};
pub use sampling::{MAX_TOP_K, SAMPLE_MAX_N};

/// A CUDA failure as a runtime error (`CUDA <what>: <reason>`).
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
    device_count()?;
    guard("probe", || {
        let ctx = CudaContext::new(0).map_err(|e| cuda_err("context", e))?;
        let info = info(&ctx)?;
        keep_alive(ctx);
        Ok(info)
    })
}

/// The number of CUDA devices (at least one), or why none can be used: no kernels built,
/// no driver library, a driver that fails to initialise, no device. Creates no context.
fn device_count() -> Result<usize> {
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
        Ok(count as usize)
    })
}

/// Holds the first device's primary context for the rest of the process: releasing its
/// last reference destroys it, and the device opened after the probe would create it
/// anew (a fraction of a second on a large GPU, once per probe).
fn keep_alive(ctx: Arc<CudaContext>) {
    static KEPT: OnceLock<Arc<CudaContext>> = OnceLock::new();
    let _ = KEPT.set(ctx);
}

/// ", its driver supports CUDA X.Y" and, when that is older than the CUDA that built the
/// kernels, what to do: an old driver refuses newer kernels with an error that does not
/// say so.
fn driver_note() -> String {
    let Some(driver) = driver_version() else {
        return String::new();
    };
    let mut note = format!(", its driver supports CUDA {}.{}", driver.0, driver.1);
    if let Some(built) = kernels::NVCC_RELEASE.filter(|&b| driver < b) {
        note += &format!(
            ": older than the CUDA {}.{} that built the kernels (update the driver, or build with that driver's nvcc)",
            built.0, built.1
        );
    }
    note
}

/// The CUDA version the driver supports, as (major, minor); None if it does not say.
fn driver_version() -> Option<(u32, u32)> {
    let mut v = 0;
    // SAFETY: writes one int.
    if unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) } != CUresult::CUDA_SUCCESS {
        return None;
    }
    Some(((v / 1000) as u32, (v % 1000 / 10) as u32))
}

/// Whether cuBLAS and cuBLASLt can be loaded: serving a model needs them (the prefill's
/// GEMMs, the vision tower, the projector), the kernels alone do not. Checked apart from
/// [`probe`] so a machine whose cuBLAS is not on the library path still runs the kernels.
pub fn blas_present() -> Result<()> {
    cublas_present()
        .and_then(|_| cublas_lt_present())
        .map_err(|e| Error::InvalidArgument(format!("a CUDA device is here but {e}")))
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

/// A capture in progress on this thread ([`CudaDevice::capture`]).
struct Capture {
    /// The device whose launches are recorded (its address).
    dev: usize,
    /// Where they go.
    stream: Arc<CudaStream>,
    /// How many were queued.
    queued: usize,
}

thread_local! {
    static CAPTURING: RefCell<Option<Capture>> = const { RefCell::new(None) };
}

/// Launches recorded once and replayed as one ([`CudaDevice::capture`],
/// [`CudaDevice::launch_graph`]): a small model's decode pass can take as long to launch
/// as to run, and a graph's replay pays the launches once. Arguments, pointers and grids are fixed at capture; the
/// kernels read what changes (a cache length, ids) from device memory.
pub struct DeviceGraph {
    graph: CudaGraph,
}

// SAFETY: a CUDA graph may move between threads; it must not be used from two at once,
// which the owner's `&mut` / lock ensures (DeviceGraph is not Sync).
unsafe impl Send for DeviceGraph {}

/// One CUDA device with the massv kernels loaded.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: std::result::Result<CudaBlas, String>,
    blas_lt: std::result::Result<CudaBlasLT, String>,
    info: DeviceInfo,
    /// Split-K arrival counters of the GEMVs (one per column block) and of attention (one
    /// per row tile and KV head), zero between launches: the last split resets its own.
    /// Kernels on the one stream never overlap, so one set serves every launch.
    split_counters: CudaSlice<u32>,
    /// The LM head GEMV's fused argmax: each row's best key, zero between launches (the
    /// last block resets them; its arrival counter is the last of `split_counters`).
    argmax_keys: CudaSlice<u64>,
    /// Launch kernels with programmatic dependent launch ([`Self::set_pdl`]).
    pdl: AtomicBool,
    /// Scratch of the split probabilities kernels, and whether `probabilities` takes them
    /// ([`Self::set_split_probabilities`]). A call holds the scratch while it queues its
    /// launches, which pass values between them through it: threads sharing the device
    /// (a target's draws and a drafter's) queue theirs one call after another.
    split_scratch: Mutex<sampling::SplitScratch>,
    split_probabilities: AtomicBool,
}

impl Drop for CudaDevice {
    /// Waits for the stream before the modules unload under kernels still queued (a pass
    /// that failed midway leaves some).
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

impl CudaDevice {
    /// The first GPU. A clear error (never a panic) without kernels, driver or device.
    pub fn new() -> Result<Self> {
        Self::with_ordinal(0)
    }

    /// The GPU of this ordinal (as CUDA_VISIBLE_DEVICES numbers them). No context is
    /// made on any other GPU.
    pub fn with_ordinal(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::InvalidArgument(format!(
                "CUDA device {ordinal} requested but the driver reports {count} (ordinals 0..{})",
                count - 1
            )));
        }
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
                            "{e} (kernels built for {}{}; this GPU is sm_{}{}{})",
                            kernels::ARCHS,
                            kernels::NVCC_RELEASE.map_or(String::new(), |(a, b)| format!(" by CUDA {a}.{b}")),
                            info.compute_capability.0,
                            info.compute_capability.1,
                            driver_note(),
                        ),
                    )
                })?;
            modules.insert(name, module);
        }
        let blas =
            cublas_present().and_then(|_| CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS handle: {e}")));
        let blas_lt = cublas_lt_present()
            .and_then(|_| CudaBlasLT::new(stream.clone()).map_err(|e| format!("cuBLASLt handle: {e}")));
        let split_counters = stream
            .alloc_zeros::<u32>(SPLIT_COUNTERS + 1)
            .map_err(|e| cuda_err("split-K counters", e))?;
        let argmax_keys = stream
            .alloc_zeros::<u64>(GEMV_MAX_ROWS)
            .map_err(|e| cuda_err("argmax keys", e))?;
        let split_scratch = Mutex::new(sampling::SplitScratch::new(&stream)?);
        Ok(CudaDevice {
            ctx,
            stream,
            modules,
            funcs: Mutex::new(HashMap::new()),
            blas,
            blas_lt,
            pdl: AtomicBool::new(pdl_serves(&info) && std::env::var("MASSV_CUDA_PDL").as_deref() == Ok("1")),
            info,
            split_counters,
            argmax_keys,
            split_scratch,
            split_probabilities: AtomicBool::new(true),
        })
    }

    /// Turns programmatic dependent launch on or off; returns whether it is on (never
    /// before sm_90, where the driver has no such launch). On, each kernel is launched
    /// with programmatic stream serialisation: it may start while the kernel before it
    /// still runs, its launch and the weights it prefetches overlapping that kernel's
    /// tail, and waits for it (`pdl_wait` in cuda/common.cuh, which every kernel calls
    /// first) before touching anything else. The results are the same bits either way.
    /// Off by default until a GPU's benchmark shows the gain (MASSV_CUDA_PDL=1 starts it
    /// on); graphs captured while on keep programmatic edges.
    pub fn set_pdl(&self, on: bool) -> bool {
        let on = on && pdl_serves(&self.info);
        self.pdl.store(on, Ordering::Relaxed);
        on
    }

    /// Whether kernels launch with programmatic dependent launch ([`Self::set_pdl`]).
    pub fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
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

    /// Makes this device's context current before an owner's buffers free: cudarc frees
    /// without binding it, and the dropping thread may never have used CUDA (a C host
    /// freeing an engine from a worker thread); a free failing there would leak the
    /// memory. Errors are left to the frees themselves, which cudarc records.
    pub fn current_for_drop(&self) {
        let _ = self.bind();
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.uncaptured("synchronize")?;
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))
    }

    // ---------------------------------------------------------------------------------
    // CUDA graphs

    /// Records the kernels `f` launches on this device (from this thread) into a graph
    /// instead of running them. Inside `f` only launches and device-to-device copies may
    /// happen: host copies, allocations, cuBLAS and synchronisation are errors (a graph
    /// cannot hold them), and nothing `f` launches runs until [`Self::launch_graph`].
    /// If `f` fails, so does the capture, and nothing was queued.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<DeviceGraph> {
        const OP: &str = "graph capture";
        if CAPTURING.with_borrow(Option::is_some) {
            return Err(cuda_err(OP, "this thread is already capturing a graph"));
        }
        // A stream of its own: another thread's launches on `stream` meanwhile run
        // rather than land in the graph, and two threads can capture at once.
        let stream = self.ctx.new_stream().map_err(|e| cuda_err(OP, e))?;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| cuda_err(OP, e))?;
        CAPTURING.set(Some(Capture {
            dev: self as *const Self as usize,
            stream: stream.clone(),
            queued: 0,
        }));
        let recorded = guard(OP, f);
        let queued = CAPTURING.take().map_or(0, |c| c.queued);
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        match ended {
            Ok(Some(graph)) if queued > 0 => Ok(DeviceGraph { graph }),
            Ok(_) => Err(cuda_err(OP, "nothing was launched")),
            Err(e) => Err(cuda_err(OP, e)),
        }
    }

    /// Queues a captured graph on the stream, after the work queued before it.
    pub fn launch_graph(&self, g: &DeviceGraph) -> Result<()> {
        self.uncaptured("launch_graph")?;
        self.bind()?;
        // SAFETY: the graph is alive (borrowed) and was captured from this device's
        // context; its buffers are the owner's, kept alive with it.
        unsafe { cudarc::driver::result::graph::launch(g.graph.cu_graph_exec(), self.stream.cu_stream()) }
            .map_err(|e| cuda_err("launching a graph", e))
    }

    /// Whether this thread records this device's launches into a graph.
    fn capturing(&self) -> bool {
        let me = self as *const Self as usize;
        CAPTURING.with_borrow(|c| c.as_ref().is_some_and(|c| c.dev == me))
    }

    /// An error for `op` (a host copy, an allocation, cuBLAS, a wait) while capturing.
    fn uncaptured(&self, op: &str) -> Result<()> {
        if self.capturing() {
            return Err(cuda_err(op, "not allowed while a CUDA graph is being captured"));
        }
        Ok(())
    }

    /// The stream work goes to: the capture's while capturing (counted there).
    fn queue(&self) -> Arc<CudaStream> {
        let me = self as *const Self as usize;
        CAPTURING
            .with_borrow_mut(|c| {
                c.as_mut().filter(|c| c.dev == me).map(|c| {
                    c.queued += 1;
                    c.stream.clone()
                })
            })
            .unwrap_or_else(|| self.stream.clone())
    }

    // ---------------------------------------------------------------------------------
    // Memory

    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.uncaptured("allocation")?;
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| cuda_err(&format!("allocating {len} elements"), e))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.uncaptured("host-to-device copy")?;
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
        self.uncaptured("host-to-device copy")?;
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
        self.uncaptured("device-to-host copy")?;
        self.stream
            .clone_dtoh(src)
            .map_err(|e| cuda_err("device-to-host copy", e))
    }

    /// Device-to-device copy of `src` into the start of `dst`.
    pub fn copy<T: DeviceRepr>(&self, src: &CudaView<'_, T>, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        need("copy", "dst", dst.len(), src.len())?;
        let mut dst = dst.slice_mut(..src.len());
        self.queue()
            .memcpy_dtod(src, &mut dst)
            .map_err(|e| cuda_err("device-to-device copy", e))
    }

    /// Device-to-device copy bandwidth in bytes read + written per second: the best of 5
    /// copies of 512 MiB (less where the device has no room for two such buffers), the
    /// floor a memory-bound kernel is measured against.
    pub fn copy_bandwidth(&self) -> Result<f64> {
        let mut bytes = 512usize << 20;
        let (a, mut b) = loop {
            match (self.alloc_zeros::<u8>(bytes), self.alloc_zeros::<u8>(bytes)) {
                (Ok(a), Ok(b)) => break (a, b),
                (Err(e), _) | (_, Err(e)) if bytes <= 32 << 20 => return Err(e),
                _ => bytes /= 4,
            }
        };
        self.copy(&a.as_view(), &mut b.as_view_mut())?;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let ms = self.time_ms(|| self.copy(&a.as_view(), &mut b.as_view_mut()))?;
            best = best.min(f64::from(ms));
        }
        Ok(2.0 * bytes as f64 / (best * 1e-3))
    }

    /// How many split-K arrival counters (and fused argmax keys) are not zero now.
    /// Between launches every one is (each launch's last split resets its own), so
    /// anything else means a merge that did not run or ran early: a diagnostic for the
    /// split-K tests.
    pub fn split_counters_set(&self) -> Result<usize> {
        let counters = self.download(&self.split_counters.as_view())?;
        let keys = self.download(&self.argmax_keys.as_view())?;
        Ok(counters.iter().filter(|&&c| c != 0).count() + keys.iter().filter(|&&k| k != 0).count())
    }

    /// Milliseconds `f` takes on the stream (events around it; `f` only queues work).
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f32> {
        self.uncaptured("timing")?;
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
        let queue = self.queue();
        if self.pdl() {
            return self
                .launch_programmatic(&f, &queue, cfg, args)
                .map_err(|e| cuda_err(&format!("launching {name} (programmatic dependent launch)"), e));
        }
        let mut b = queue.launch_builder(&f);
        for a in args {
            a.push(&mut b);
        }
        // SAFETY: each launcher checked the buffer sizes against the kernel's contract
        // and passes the arguments in the kernel's order and C types.
        unsafe { b.launch(cfg) }.map_err(|e| cuda_err(&format!("launching {name}"), e))?;
        Ok(())
    }

    /// cuLaunchKernelEx with programmatic stream serialisation (cudarc's builder has no
    /// launch attributes). The arguments are plain values (pointers as u64): there are
    /// no per-buffer events to record.
    fn launch_programmatic(
        &self,
        f: &CudaFunction,
        queue: &CudaStream,
        cfg: LaunchConfig,
        args: &[&dyn Arg],
    ) -> std::result::Result<(), String> {
        const MAX_ARGS: usize = 32;
        if args.len() > MAX_ARGS {
            return Err(format!("{} arguments, at most {MAX_ARGS}", args.len()));
        }
        let mut params = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_ARGS];
        for (p, a) in params.iter_mut().zip(args) {
            *p = a.param();
        }
        // SAFETY: an all-zero launch attribute is a valid (empty) value of the union.
        let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: queue.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        self.ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: as in `launch`; `params` points at the caller's argument values, alive
        // for the call (the driver copies them), one per kernel parameter.
        unsafe {
            cudarc::driver::sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
        }
        .result()
        .map_err(|e| e.to_string())
    }

    fn rptr<T>(&self, x: &CudaView<'_, T>) -> u64 {
        x.device_ptr(&self.stream).0
    }

    fn wptr<T>(&self, x: &mut CudaViewMut<'_, T>) -> u64 {
        x.device_ptr_mut(&self.stream).0
    }
}

/// A kernel argument: anything the launch builder accepts by reference.
trait Arg {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
    /// The value's address, as cuLaunchKernel's kernelParams hold it.
    fn param(&self) -> *mut std::ffi::c_void;
}

impl<T: DeviceRepr> Arg for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
    fn param(&self) -> *mut std::ffi::c_void {
        self as *const T as *mut std::ffi::c_void
    }
}

/// Programmatic dependent launch needs Hopper (sm_90) or later, and a driver with
/// cuLaunchKernelEx (CUDA 11.8; cudarc would panic on a call to a missing symbol).
fn pdl_serves(info: &DeviceInfo) -> bool {
    info.compute_capability.0 >= 9 && driver_version().is_some_and(|v| v >= (11, 8))
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
