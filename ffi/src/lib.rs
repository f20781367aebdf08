//! C ABI of massv (libmassv.so / libmassv.a). The contract — ownership, return codes,
//! threading — is documented in `include/massv.h`; this file implements it.
//!
//! Every exported function runs its body inside [`guard`] (or [`quiet`] for the few that
//! return no status): a Rust panic never unwinds into C, it becomes
//! `MASSV_ERR_INTERNAL` with the panic message in `massv_last_error()`.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use massv::backend::DeviceRequest;
use massv::image::ImageInput;
use massv::metrics::Metrics;
use massv::model::Target;
use massv::sampling::SamplingParams;
use massv::spec::draft::DraftMode;
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv::Error;

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// Status codes and the thread-local error message
// ---------------------------------------------------------------------------------------------

/// `massv_status` in the header (a C enum, i.e. an `int`).
pub type massv_status = c_int;

pub const MASSV_OK: massv_status = 0;
pub const MASSV_ERR_INVALID_ARGUMENT: massv_status = -1;
pub const MASSV_ERR_LOAD: massv_status = -2;
pub const MASSV_ERR_DEVICE: massv_status = -3;
pub const MASSV_ERR_IMAGE: massv_status = -4;
pub const MASSV_ERR_GENERATION: massv_status = -5;
pub const MASSV_ERR_BUFFER_TOO_SMALL: massv_status = -6;
pub const MASSV_ERR_BUSY: massv_status = -7;
pub const MASSV_ERR_INTERNAL: massv_status = -8;

pub const MASSV_DRAFT_MODE_AUTO: c_int = 0;
pub const MASSV_DRAFT_MODE_MASSV: c_int = 1;
pub const MASSV_DRAFT_MODE_TEXT: c_int = 2;

pub const MASSV_FINISH_NONE: c_int = 0;
pub const MASSV_FINISH_STOP_TOKEN: c_int = 1;
pub const MASSV_FINISH_MAX_TOKENS: c_int = 2;
pub const MASSV_FINISH_CALLBACK: c_int = 3;

/// A failed call: its status and the message `massv_last_error()` returns.
#[derive(Debug)]
struct Failure {
    code: massv_status,
    msg: String,
}

fn fail<T>(code: massv_status, msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure { code, msg: msg.into() })
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, Failure> {
    fail(MASSV_ERR_INVALID_ARGUMENT, msg)
}

/// A massv error as a failure with `code`, its causes on the same line.
fn massv_failure(code: massv_status, e: &Error) -> Failure {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
        src = cause.source();
    }
    Failure {
        code,
        msg: msg.replace('\n', " "),
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // A C string cannot hold NUL; such bytes (e.g. from a path) are shown escaped.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; the status still says it.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs the body of a status-returning entry point: panics become `MASSV_ERR_INTERNAL`,
/// the last error is cleared on success and set on failure.
fn guard(body: impl FnOnce() -> Result<(), Failure>) -> massv_status {
    let result = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|payload| {
        fail(
            MASSV_ERR_INTERNAL,
            format!("internal error (Rust panic): {}", panic_message(payload.as_ref())),
        )
    });
    match result {
        Ok(()) => {
            set_last_error("");
            MASSV_OK
        }
        Err(f) => {
            set_last_error(&f.msg);
            f.code
        }
    }
}

/// For entry points that return no status (free functions): a panic is swallowed.
fn quiet(body: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(body));
}

// ---------------------------------------------------------------------------------------------
// Argument helpers
// ---------------------------------------------------------------------------------------------

/// A NUL-terminated UTF-8 argument; `what` names it in the error.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
unsafe fn utf8_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return invalid(format!("{what} is NULL"));
    }
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => invalid(format!("{what} is not valid UTF-8 (at byte {})", e.valid_up_to())),
    }
}

/// A NUL-terminated path: any bytes on Unix, UTF-8 elsewhere.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
unsafe fn path_arg(p: *const c_char, what: &str) -> Result<PathBuf, Failure> {
    if p.is_null() {
        return invalid(format!("{what} is NULL"));
    }
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        return invalid(format!("{what} is an empty string"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    {
        Ok(PathBuf::from(unsafe { utf8_arg(p, what) }?))
    }
}

/// Copies `src` into a caller buffer of `cap` elements, snprintf-style: as much as fits,
/// `MASSV_ERR_BUFFER_TOO_SMALL` unless all of it did.
fn copy_out<T: Copy>(src: &[T], dst: *mut T, cap: usize, what: &str) -> Result<(), Failure> {
    if dst.is_null() && cap > 0 {
        return invalid(format!("{what} buffer is NULL but its capacity is {cap}"));
    }
    let n = src.len().min(cap);
    if n > 0 {
        // SAFETY: the caller promises `dst` holds `cap` ≥ n elements.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
    }
    if cap < src.len() {
        return fail(
            MASSV_ERR_BUFFER_TOO_SMALL,
            format!("{what} buffer holds {cap} elements, {} are needed", src.len()),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Version and errors
// ---------------------------------------------------------------------------------------------

static VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(v) => v,
    Err(_) => panic!("version contains NUL"),
};

#[no_mangle]
pub extern "C" fn massv_version() -> *const c_char {
    VERSION.as_ptr()
}

#[no_mangle]
pub extern "C" fn massv_last_error() -> *const c_char {
    static EMPTY: &CStr = c"";
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(EMPTY.as_ptr())
}

#[no_mangle]
pub extern "C" fn massv_status_name(status: massv_status) -> *const c_char {
    let name: &'static CStr = match status {
        MASSV_OK => c"MASSV_OK",
        MASSV_ERR_INVALID_ARGUMENT => c"MASSV_ERR_INVALID_ARGUMENT",
        MASSV_ERR_LOAD => c"MASSV_ERR_LOAD",
        MASSV_ERR_DEVICE => c"MASSV_ERR_DEVICE",
        MASSV_ERR_IMAGE => c"MASSV_ERR_IMAGE",
        MASSV_ERR_GENERATION => c"MASSV_ERR_GENERATION",
        MASSV_ERR_BUFFER_TOO_SMALL => c"MASSV_ERR_BUFFER_TOO_SMALL",
        MASSV_ERR_BUSY => c"MASSV_ERR_BUSY",
        MASSV_ERR_INTERNAL => c"MASSV_ERR_INTERNAL",
        _ => c"MASSV_ERR_UNKNOWN",
    };
    name.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// Engine
// ---------------------------------------------------------------------------------------------

/// Loaded target (and drafter). Generation takes `&Engine` and keeps its caches per call,
/// so one engine serves any number of threads at once.
pub struct massv_engine {
    engine: Engine,
    /// Generations running on this engine; `massv_engine_free` refuses while non-zero.
    active: AtomicUsize,
}

/// Counts one running generation on an engine for as long as it lives (unwinding included).
struct Active<'a>(&'a AtomicUsize);

impl<'a> Active<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Active(count)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// The header promises that one engine may be used from several threads at once.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<massv_engine>();
    shareable::<massv_request>();
};

fn parse_device(s: &str) -> Result<DeviceRequest, Failure> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceRequest::Auto),
        "cpu" => Ok(DeviceRequest::Cpu),
        "cuda" => Ok(DeviceRequest::Cuda),
        _ => invalid(format!("device must be \"auto\", \"cpu\" or \"cuda\", got {s:?}")),
    }
}

/// # Safety
/// See `massv_engine_load` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_engine_load(
    target_dir: *const c_char,
    drafter_dir: *const c_char,
    device: *const c_char,
    out_engine: *mut *mut massv_engine,
) -> massv_status {
    guard(|| {
        if out_engine.is_null() {
            return invalid("out_engine is NULL");
        }
        // SAFETY: checked non-NULL; the caller provides a writable pointer slot.
        unsafe { *out_engine = std::ptr::null_mut() };
        let target = unsafe { path_arg(target_dir, "target_dir") }?;
        let drafter = if drafter_dir.is_null() {
            None
        } else {
            Some(unsafe { path_arg(drafter_dir, "drafter_dir") }?)
        };
        let device = if device.is_null() {
            DeviceRequest::Auto
        } else {
            parse_device(unsafe { utf8_arg(device, "device") }?)?
        };
        // The device first (MASSV_ERR_DEVICE: none, or one that does not serve the target),
        // then the models (MASSV_ERR_LOAD), as `massv generate --device` does.
        let resolved = Target::choose_device(&target, device).map_err(|e| massv_failure(MASSV_ERR_DEVICE, &e))?;
        let engine = Engine::load_resolved(&target, drafter.as_deref(), device, resolved)
            .map_err(|e| massv_failure(MASSV_ERR_LOAD, &e))?;
        let handle = Box::into_raw(Box::new(massv_engine {
            engine,
            active: AtomicUsize::new(0),
        }));
        unsafe { *out_engine = handle };
        Ok(())
    })
}

/// # Safety
/// See `massv_engine_free` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_engine_free(engine: *mut *mut massv_engine) {
    quiet(|| {
        if engine.is_null() {
            return;
        }
        // SAFETY: the caller passes the address of a handle from massv_engine_load (or NULL).
        let handle = unsafe { *engine };
        if handle.is_null() {
            return;
        }
        // Freed from a token callback (or while another thread generates): refuse rather
        // than pull the engine from under the running generation.
        if unsafe { &*handle }.active.load(Ordering::SeqCst) > 0 {
            return;
        }
        unsafe { *engine = std::ptr::null_mut() };
        drop(unsafe { Box::from_raw(handle) });
    })
}

/// # Safety
/// `engine` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn massv_engine_has_drafter(engine: *const massv_engine) -> c_int {
    // SAFETY: NULL or live, per the contract.
    match unsafe { engine.as_ref() } {
        Some(e) => e.engine.drafter.is_some() as c_int,
        None => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Generation parameters
// ---------------------------------------------------------------------------------------------

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct massv_generate_params {
    pub gamma: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    pub draft_mode: c_int,
}

#[no_mangle]
pub extern "C" fn massv_generate_default_params() -> massv_generate_params {
    let d = GenerateParams::default();
    massv_generate_params {
        gamma: d.gamma,
        temperature: d.sampling.temperature,
        top_k: d.sampling.top_k,
        top_p: d.sampling.top_p,
        seed: d.seed,
        max_new_tokens: d.max_new_tokens,
        draft_mode: match d.draft_mode {
            None => MASSV_DRAFT_MODE_AUTO,
            Some(DraftMode::Massv) => MASSV_DRAFT_MODE_MASSV,
            Some(DraftMode::Text) => MASSV_DRAFT_MODE_TEXT,
        },
    }
}

/// Checks what the engine cannot (enum values, overflow); the engine checks the rest.
fn to_generate_params(p: &massv_generate_params) -> Result<GenerateParams, Failure> {
    let draft_mode = match p.draft_mode {
        MASSV_DRAFT_MODE_AUTO => None,
        MASSV_DRAFT_MODE_MASSV => Some(DraftMode::Massv),
        MASSV_DRAFT_MODE_TEXT => Some(DraftMode::Text),
        m => return invalid(format!("draft_mode must be a massv_draft_mode (0, 1 or 2), got {m}")),
    };
    // The engine sizes its caches as prompt + max_new_tokens + gamma + 1.
    const LIMIT: usize = 1 << 30;
    if p.max_new_tokens > LIMIT || p.gamma > LIMIT {
        return invalid(format!(
            "max_new_tokens ({}) and gamma ({}) must be at most {LIMIT}",
            p.max_new_tokens, p.gamma
        ));
    }
    Ok(GenerateParams {
        gamma: p.gamma,
        tree: None,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
        },
        seed: p.seed,
        max_new_tokens: p.max_new_tokens,
        draft_mode,
    })
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// One prompt + optional image + parameters, and the result of its last generation. The
/// mutex is only ever `try_lock`ed: a request used by two threads at once, or from inside
/// its own token callback, answers `MASSV_ERR_BUSY` instead of racing or deadlocking.
pub struct massv_request {
    inner: Mutex<Request>,
}

struct Request {
    prompt: String,
    image: Option<ImageInput>,
    params: GenerateParams,
    result: Option<Finished>,
}

struct Finished {
    text: String,
    tokens: Vec<u32>,
    metrics: Metrics,
    finish_reason: c_int,
}

/// Locks a request handle.
///
/// # Safety
/// `req` is NULL or a live handle.
unsafe fn lock<'a>(req: *const massv_request) -> Result<MutexGuard<'a, Request>, Failure> {
    // SAFETY: NULL or live, per the contract of every function taking a request.
    let Some(req) = (unsafe { req.as_ref() }) else {
        return invalid("request is NULL");
    };
    match req.inner.try_lock() {
        Ok(g) => Ok(g),
        // A panic while locked left it poisoned; the data is plain values, still usable.
        Err(TryLockError::Poisoned(p)) => Ok(PoisonError::into_inner(p)),
        Err(TryLockError::WouldBlock) => fail(
            MASSV_ERR_BUSY,
            "request is in use (by another thread, or this is its own token callback)",
        ),
    }
}

/// # Safety
/// See `massv_request_create` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_create(
    prompt: *const c_char,
    out_request: *mut *mut massv_request,
) -> massv_status {
    guard(|| {
        if out_request.is_null() {
            return invalid("out_request is NULL");
        }
        // SAFETY: checked non-NULL; the caller provides a writable pointer slot.
        unsafe { *out_request = std::ptr::null_mut() };
        let prompt = unsafe { utf8_arg(prompt, "prompt") }?.to_string();
        let req = massv_request {
            inner: Mutex::new(Request {
                prompt,
                image: None,
                params: GenerateParams::default(),
                result: None,
            }),
        };
        unsafe { *out_request = Box::into_raw(Box::new(req)) };
        Ok(())
    })
}

/// # Safety
/// See `massv_request_free` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_free(request: *mut *mut massv_request) {
    quiet(|| {
        if request.is_null() {
            return;
        }
        // SAFETY: the caller passes the address of a handle from massv_request_create (or NULL).
        let handle = unsafe { *request };
        if handle.is_null() {
            return;
        }
        // Locked by a running call (e.g. freed from its own token callback): refuse.
        if let Err(TryLockError::WouldBlock) = unsafe { &*handle }.inner.try_lock() {
            return;
        }
        unsafe { *request = std::ptr::null_mut() };
        drop(unsafe { Box::from_raw(handle) });
    })
}

/// # Safety
/// See `massv_request_set_prompt` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_set_prompt(request: *mut massv_request, prompt: *const c_char) -> massv_status {
    guard(|| {
        let mut req = unsafe { lock(request) }?;
        req.prompt = unsafe { utf8_arg(prompt, "prompt") }?.to_string();
        Ok(())
    })
}

/// # Safety
/// See `massv_request_set_params` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_set_params(
    request: *mut massv_request,
    params: *const massv_generate_params,
) -> massv_status {
    guard(|| {
        let mut req = unsafe { lock(request) }?;
        // SAFETY: NULL or a valid struct, per the contract.
        let Some(p) = (unsafe { params.as_ref() }) else {
            return invalid("params is NULL");
        };
        let p = to_generate_params(p)?;
        p.sampling
            .validate()
            .map_err(|e| massv_failure(MASSV_ERR_INVALID_ARGUMENT, &e))?;
        if p.max_new_tokens == 0 {
            return invalid("max_new_tokens must be at least 1");
        }
        // The tree shape is set by massv_request_set_tree and survives new parameters.
        let tree = req.params.tree.take();
        req.params = GenerateParams { tree, ..p };
        Ok(())
    })
}

/// # Safety
/// See `massv_request_set_tree` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_set_tree(request: *mut massv_request, spec: *const c_char) -> massv_status {
    guard(|| {
        let mut req = unsafe { lock(request) }?;
        let tree = if spec.is_null() {
            None
        } else {
            let s = unsafe { utf8_arg(spec, "spec") }?;
            Some(
                s.parse::<massv::spec::tree::TreeSpec>()
                    .map_err(|e| massv_failure(MASSV_ERR_INVALID_ARGUMENT, &e))?,
            )
        };
        req.params.tree = tree;
        Ok(())
    })
}

fn set_image(request: *mut massv_request, decode: impl FnOnce() -> Result<ImageInput, Failure>) -> Result<(), Failure> {
    let mut req = unsafe { lock(request) }?;
    req.image = Some(decode()?);
    Ok(())
}

fn image_failure(e: Error) -> Failure {
    massv_failure(MASSV_ERR_IMAGE, &e)
}

/// # Safety
/// See `massv_request_set_image_file` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_set_image_file(
    request: *mut massv_request,
    path: *const c_char,
) -> massv_status {
    guard(|| {
        set_image(request, || {
            let path = unsafe { path_arg(path, "path") }?;
            ImageInput::from_path(&path).map_err(image_failure)
        })
    })
}

/// # Safety
/// See `massv_request_set_image_encoded` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_set_image_encoded(
    request: *mut massv_request,
    data: *const c_void,
    size: usize,
) -> massv_status {
    guard(|| {
        set_image(request, || {
            if data.is_null() {
                return invalid("image data is NULL");
            }
            if size == 0 {
                return invalid("image data is empty (size 0)");
            }
            // SAFETY: the caller promises `size` readable bytes at `data`.
            let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), size) };
            ImageInput::from_encoded(bytes).map_err(image_failure)
        })
    })
}

/// # Safety
/// See `massv_request_set_image_rgb8` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_set_image_rgb8(
    request: *mut massv_request,
    pixels: *const u8,
    width: usize,
    height: usize,
    stride: usize,
) -> massv_status {
    guard(|| {
        set_image(request, || {
            if pixels.is_null() {
                return invalid("pixels is NULL");
            }
            if width == 0 || height == 0 {
                return invalid(format!("image is empty ({width}x{height} pixels)"));
            }
            let Some(row) = width.checked_mul(3) else {
                return invalid(format!("width {width} is too large"));
            };
            let stride = if stride == 0 { row } else { stride };
            if stride < row {
                return invalid(format!("stride {stride} is less than width*3 = {row}"));
            }
            // Bytes read: every full row but the last, which needs only width*3.
            let Some(span) = (height - 1).checked_mul(stride).and_then(|n| n.checked_add(row)) else {
                return invalid(format!("a {width}x{height} image with stride {stride} is too large"));
            };
            if span > isize::MAX as usize {
                return invalid(format!("a {width}x{height} image with stride {stride} is too large"));
            }
            // SAFETY: the caller promises (height-1)*stride + width*3 readable bytes.
            let src = unsafe { std::slice::from_raw_parts(pixels, span) };
            let mut rgb = Vec::with_capacity(row * height);
            for y in 0..height {
                rgb.extend_from_slice(&src[y * stride..y * stride + row]);
            }
            ImageInput::from_rgb8(width, height, rgb).map_err(image_failure)
        })
    })
}

/// # Safety
/// See `massv_request_clear_image` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_clear_image(request: *mut massv_request) -> massv_status {
    guard(|| {
        unsafe { lock(request) }?.image = None;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

pub type massv_token_callback =
    Option<unsafe extern "C" fn(token: u32, piece: *const c_char, piece_len: usize, user_data: *mut c_void) -> c_int>;

fn generation_failure(e: Error) -> Failure {
    let code = match e {
        Error::InvalidArgument(_) | Error::ContextOverflow { .. } => MASSV_ERR_INVALID_ARGUMENT,
        Error::Image { .. } => MASSV_ERR_IMAGE,
        Error::Cuda { .. } | Error::NoCudaKernels => MASSV_ERR_DEVICE,
        _ => MASSV_ERR_GENERATION,
    };
    massv_failure(code, &e)
}

/// Generates for `request` and returns it, still locked, with its result.
fn run<'a>(
    engine: *const massv_engine,
    request: *mut massv_request,
    callback: massv_token_callback,
    user_data: *mut c_void,
) -> Result<MutexGuard<'a, Request>, Failure> {
    // SAFETY: NULL or live, per the contract.
    let Some(engine) = (unsafe { engine.as_ref() }) else {
        return invalid("engine is NULL");
    };
    let _active = Active::enter(&engine.active);
    let engine = &engine.engine;
    let mut req = unsafe { lock(request) }?;
    req.result = None;
    let mut stopped = false;
    // The piece as a C string; reused across tokens.
    let mut piece_buf: Vec<u8> = Vec::new();
    let mut on_token = |token: u32, piece: &str| -> bool {
        let Some(cb) = callback else { return true };
        piece_buf.clear();
        piece_buf.extend_from_slice(piece.as_bytes());
        piece_buf.push(0);
        // SAFETY: the caller's callback, with a NUL-terminated buffer that outlives the call.
        let stop = unsafe { cb(token, piece_buf.as_ptr().cast(), piece.len(), user_data) };
        stopped = stop != 0;
        !stopped
    };
    let hooks = Hooks {
        trace: None,
        // Without a callback the engine need not decode pieces at all.
        on_token: match callback {
            Some(_) => Some(&mut on_token),
            None => None,
        },
    };
    let out = engine
        .generate(&req.prompt, req.image.as_ref(), &req.params, hooks)
        .map_err(generation_failure)?;
    let finish_reason = if stopped {
        MASSV_FINISH_CALLBACK
    } else if out.tokens.last().is_some_and(|t| engine.stop.contains(t)) {
        MASSV_FINISH_STOP_TOKEN
    } else {
        MASSV_FINISH_MAX_TOKENS
    };
    req.result = Some(Finished {
        text: out.text,
        tokens: out.tokens,
        metrics: out.metrics,
        finish_reason,
    });
    Ok(req)
}

/// # Safety
/// See `massv_generate` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_generate(
    engine: *const massv_engine,
    request: *mut massv_request,
    callback: massv_token_callback,
    user_data: *mut c_void,
) -> massv_status {
    guard(|| run(engine, request, callback, user_data).map(drop))
}

/// # Safety
/// See `massv_generate_text` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_generate_text(
    engine: *const massv_engine,
    request: *mut massv_request,
    buf: *mut c_char,
    buf_size: usize,
    text_len: *mut usize,
) -> massv_status {
    guard(|| {
        if buf.is_null() && buf_size > 0 {
            return invalid(format!("buf is NULL but buf_size is {buf_size}"));
        }
        let req = run(engine, request, None, std::ptr::null_mut())?;
        write_text(&req, buf, buf_size, text_len)
    })
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

fn finished(req: &Request) -> Result<&Finished, Failure> {
    match &req.result {
        Some(f) => Ok(f),
        None => invalid("request has no result: massv_generate has not succeeded on it"),
    }
}

fn write_text(req: &Request, buf: *mut c_char, buf_size: usize, text_len: *mut usize) -> Result<(), Failure> {
    let text = &finished(req)?.text;
    if buf.is_null() && buf_size > 0 {
        return invalid(format!("buf is NULL but buf_size is {buf_size}"));
    }
    if !text_len.is_null() {
        // SAFETY: non-NULL, per the contract a writable size_t.
        unsafe { *text_len = text.len() };
    }
    // The longest prefix that fits beside the NUL, cut at a character boundary.
    let mut n = text.len().min(buf_size.saturating_sub(1));
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    if buf_size > 0 {
        // SAFETY: the caller promises `buf_size` ≥ n + 1 writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    // Everything fits only with room for the NUL, as with snprintf (even for "").
    if buf_size <= text.len() {
        return fail(
            MASSV_ERR_BUFFER_TOO_SMALL,
            format!("text buffer holds {buf_size} bytes, {} are needed", text.len() + 1),
        );
    }
    Ok(())
}

/// # Safety
/// See `massv_request_text` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_text(
    request: *const massv_request,
    buf: *mut c_char,
    buf_size: usize,
    text_len: *mut usize,
) -> massv_status {
    guard(|| write_text(&*unsafe { lock(request) }?, buf, buf_size, text_len))
}

/// # Safety
/// See `massv_request_tokens` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_tokens(
    request: *const massv_request,
    buf: *mut u32,
    cap: usize,
    n_tokens: *mut usize,
) -> massv_status {
    guard(|| {
        let req = unsafe { lock(request) }?;
        let tokens = &finished(&req)?.tokens;
        if !n_tokens.is_null() {
            // SAFETY: non-NULL, per the contract a writable size_t.
            unsafe { *n_tokens = tokens.len() };
        }
        copy_out(tokens, buf, cap, "token")
    })
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct massv_timings {
    pub vision: f64,
    pub prefill_target: f64,
    pub prefill_draft: f64,
    pub draft: f64,
    pub verify: f64,
    pub accept: f64,
    pub total: f64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct massv_metrics {
    pub mal: f64,
    pub tokens_per_s: f64,
    pub timings_ms: massv_timings,
    pub target_passes: usize,
    pub generated_tokens: usize,
    pub gamma: usize,
    pub n_accept_rate_by_pos: usize,
    pub finish_reason: c_int,
    pub tree_nodes: f64,
}

/// # Safety
/// See `massv_request_metrics` in massv.h.
#[no_mangle]
pub unsafe extern "C" fn massv_request_metrics(
    request: *const massv_request,
    out: *mut massv_metrics,
    accept_rate_by_pos: *mut f64,
    cap: usize,
) -> massv_status {
    guard(|| {
        if out.is_null() {
            return invalid("out is NULL");
        }
        if accept_rate_by_pos.is_null() && cap > 0 {
            return invalid(format!("accept_rate_by_pos is NULL but cap is {cap}"));
        }
        let req = unsafe { lock(request) }?;
        let f = finished(&req)?;
        let m = &f.metrics;
        let t = &m.timings_ms;
        let metrics = massv_metrics {
            mal: m.mal,
            tokens_per_s: m.tokens_per_s,
            timings_ms: massv_timings {
                vision: t.vision,
                prefill_target: t.prefill_target,
                prefill_draft: t.prefill_draft,
                draft: t.draft,
                verify: t.verify,
                accept: t.accept,
                total: t.total,
            },
            target_passes: m.target_passes,
            generated_tokens: m.generated_tokens,
            gamma: m.gamma,
            n_accept_rate_by_pos: m.accept_rate_by_pos.len(),
            finish_reason: f.finish_reason,
            tree_nodes: m.tree_nodes,
        };
        // SAFETY: non-NULL, per the contract a writable massv_metrics.
        unsafe { out.write(metrics) };
        let n = m.accept_rate_by_pos.len().min(cap);
        if n > 0 {
            // SAFETY: the caller promises `cap` ≥ n writable doubles.
            unsafe { std::ptr::copy_nonoverlapping(m.accept_rate_by_pos.as_ptr(), accept_rate_by_pos, n) };
        }
        Ok(())
    })
}
