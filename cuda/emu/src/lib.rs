//! The CUDA emulator: massv's kernels (the very cuda/*.cu sources, compiled for the CPU)
//! behind a libcuda / libcublas / libcublasLt of their own, so the CUDA backend, its
//! launchers and the models above it run end to end on a machine without a GPU.
//!
//! [`load`] opens the three libraries by path before cudarc looks for the real ones; they
//! carry the real sonames, so cudarc's `dlopen("libcuda.so")` then finds the emulator.
//! Load it only in a process meant to use it (a test binary): a real GPU is not reachable
//! from that process afterwards. The device reports itself as "massv CPU emulator (not a
//! GPU)": nothing measured on it is a GPU number.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

/// Where build.rs put libcuda.so, libcublas.so and libcublasLt.so.
pub fn lib_dir() -> PathBuf {
    Path::new(env!("OUT_DIR")).join("lib")
}

static LOADED: OnceLock<Result<Library, String>> = OnceLock::new();

fn driver() -> Result<&'static Library, String> {
    LOADED
        .get_or_init(|| {
            if let Some(why) = option_env!("MASSV_CUDA_EMU_UNBUILT") {
                return Err(format!("the CUDA emulator was not built: {why}"));
            }
            let dir = lib_dir();
            let mut driver = None;
            for name in ["libcuda.so", "libcublas.so", "libcublasLt.so"] {
                let path = dir.join(name);
                // SAFETY: our own libraries; their initialisers only register kernels.
                let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
                    .map_err(|e| format!("loading the CUDA emulator's {}: {e}", path.display()))?;
                if name == "libcuda.so" {
                    driver = Some(lib);
                } else {
                    // Kept loaded for the life of the process.
                    std::mem::forget(lib);
                }
            }
            driver.ok_or_else(|| "the CUDA emulator's libcuda.so was not loaded".to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Loads the emulator (once per process). After it, cudarc's CUDA is the emulator's.
pub fn load() -> Result<(), String> {
    driver().map(|_| ())
}

/// What the emulated device did for the calling thread since its last [`reset_stats`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub launches: u64,
    pub allocations: u64,
    pub htod_copies: u64,
    pub htod_bytes: u64,
    pub htod_largest: u64,
    pub dtoh_copies: u64,
    pub dtoh_bytes: u64,
    pub dtoh_largest: u64,
    pub dtod_bytes: u64,
    /// Memory calls and launches refused because no context was current on the thread.
    pub no_context: u64,
    /// cuGraphLaunch calls that ran their graph (its kernels count in `launches`).
    pub graph_launches: u64,
    /// Kernels launched with programmatic stream serialisation (programmatic dependent
    /// launch; they count in `launches` too), replayed from graphs or not.
    pub pdl_launches: u64,
}

/// Whether [`load`] succeeded in this process (the CUDA the backend sees is the emulator).
pub fn loaded() -> bool {
    LOADED.get().is_some_and(Result::is_ok)
}

/// A function of the emulator's libraries. They were opened RTLD_GLOBAL, so their symbols
/// are in the process's scope; the pointer stays valid while they stay loaded (always).
fn sym<T: Copy>(name: &[u8]) -> Result<T, String> {
    LOADED
        .get()
        .ok_or("the CUDA emulator is not loaded")?
        .as_ref()
        .map_err(Clone::clone)?;
    // SAFETY: the symbol's type is the one the emulator's C++ defines.
    unsafe { Library::this().get::<T>(name) }
        .map(|f| *f)
        .map_err(|e| format!("CUDA emulator symbol: {e}"))
}

pub fn stats() -> Result<Stats, String> {
    let f = sym::<unsafe extern "C" fn(*mut Stats)>(b"massv_emu_stats\0")?;
    let mut s = Stats::default();
    // SAFETY: writes one Stats, the C struct this mirrors field for field.
    unsafe { f(&mut s) };
    Ok(s)
}

pub fn reset_stats() -> Result<(), String> {
    let f = sym::<unsafe extern "C" fn()>(b"massv_emu_reset_stats\0")?;
    // SAFETY: no arguments.
    unsafe { f() };
    Ok(())
}

/// Makes the emulated cuBLASLt's heuristic find no algorithm for any GEMM (false) or one
/// (true, the default), in every thread of the process.
pub fn set_lt_algorithms(available: bool) -> Result<(), String> {
    load()?;
    let f = sym::<unsafe extern "C" fn(i32)>(b"massv_emu_set_lt_algorithms\0")?;
    // SAFETY: an int flag.
    unsafe { f(available as i32) };
    Ok(())
}

/// Runs each block's threads last to first and a grid's blocks scattered (true), or both
/// first to last (false, the default unless MASSV_EMU_ORDER=reverse). A kernel missing a
/// barrier fails under one order, and so does a grid counting on its blocks' order or
/// sharing an arrival counter between work items.
pub fn set_reverse_order(reverse: bool) -> Result<(), String> {
    let f = sym::<unsafe extern "C" fn(i32)>(b"massv_emu_set_reverse_order\0")?;
    // SAFETY: an int flag.
    unsafe { f(reverse as i32) };
    Ok(())
}
