//! The entry points called from Rust as C would call them: panics, raw RGB8 input,
//! streaming, thread use and the version. The same contract is checked from C by
//! tests/c/api_test.c (run by tests/c_abi.rs).

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(massv_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn load(target: &str, drafter: Option<&str>) -> *mut massv_engine {
    let t = cstr(&fixture(target));
    let d = drafter.map(|d| cstr(&fixture(d)));
    let mut e = null_mut();
    let st = unsafe {
        massv_engine_load(
            t.as_ptr(),
            d.as_ref().map_or(null(), |d| d.as_ptr()),
            c"cpu".as_ptr(),
            &mut e,
        )
    };
    assert_eq!(st, MASSV_OK, "{}", last_error());
    e
}

fn request(prompt: &str, max_new_tokens: usize) -> *mut massv_request {
    let p = CString::new(prompt).unwrap();
    let mut r = null_mut();
    assert_eq!(unsafe { massv_request_create(p.as_ptr(), &mut r) }, MASSV_OK);
    let params = massv_generate_params {
        max_new_tokens,
        gamma: 3,
        ..massv_generate_default_params()
    };
    assert_eq!(unsafe { massv_request_set_params(r, &params) }, MASSV_OK);
    r
}

fn tokens(r: *const massv_request) -> Vec<u32> {
    let mut n = 0;
    assert_eq!(
        unsafe { massv_request_tokens(r, null_mut(), 0, &mut n) },
        MASSV_ERR_BUFFER_TOO_SMALL
    );
    let mut v = vec![0u32; n];
    assert_eq!(unsafe { massv_request_tokens(r, v.as_mut_ptr(), n, &mut n) }, MASSV_OK);
    v
}

fn text(r: *const massv_request) -> String {
    let mut n = 0;
    assert_eq!(
        unsafe { massv_request_text(r, null_mut(), 0, &mut n) },
        MASSV_ERR_BUFFER_TOO_SMALL
    );
    let mut buf = vec![0u8; n + 1];
    assert_eq!(
        unsafe { massv_request_text(r, buf.as_mut_ptr().cast(), n + 1, &mut n) },
        MASSV_OK
    );
    assert_eq!(buf[n], 0);
    buf.truncate(n);
    String::from_utf8(buf).unwrap()
}

#[test]
fn panics_become_internal_errors_and_leave_handles_usable() {
    assert_eq!(guard(|| panic!("static message")), MASSV_ERR_INTERNAL);
    assert!(last_error().contains("static message"), "{}", last_error());
    assert_eq!(guard(|| panic!("formatted {}", 42)), MASSV_ERR_INTERNAL);
    assert!(last_error().contains("formatted 42"), "{}", last_error());
    assert_eq!(guard(|| std::panic::panic_any(7u8)), MASSV_ERR_INTERNAL);
    assert!(last_error().contains("internal error"), "{}", last_error());

    // A panic while a request is locked poisons its mutex; the request stays usable.
    let mut r = request("hi", 4);
    let st = guard(|| {
        let _locked = unsafe { lock(r) }?;
        panic!("while locked")
    });
    assert_eq!(st, MASSV_ERR_INTERNAL);
    assert!(unsafe { &*r }.inner.is_poisoned());
    assert_eq!(unsafe { massv_request_set_prompt(r, c"again".as_ptr()) }, MASSV_OK);
    assert_eq!(last_error(), "");
    unsafe { massv_request_free(&mut r) };
    assert!(r.is_null());

    // Nothing of the panic escapes a function that returns no status.
    quiet(|| panic!("in a free function"));
}

#[test]
fn rgb8_pixels_with_padded_rows_give_the_file_answer() {
    let mut engine = load("qwen2_5_vl-tiny-hub", None);
    let path = fixture("images/nonsquare_150x100.png");
    let mut by_file = request("Describe the image.", 12);
    let p = cstr(&path);
    assert_eq!(unsafe { massv_request_set_image_file(by_file, p.as_ptr()) }, MASSV_OK);
    assert_eq!(unsafe { massv_generate(engine, by_file, None, null_mut()) }, MASSV_OK);

    let img = massv::image::ImageInput::from_path(&path).unwrap();
    let (w, h) = (img.width(), img.height());
    let stride = w * 3 + 7;
    let mut padded = vec![0xAB_u8; stride * h];
    for y in 0..h {
        padded[y * stride..y * stride + w * 3].copy_from_slice(&img.rgb()[y * w * 3..(y + 1) * w * 3]);
    }
    // The last row needs only width*3 bytes: the buffer may end right after it.
    padded.truncate((h - 1) * stride + w * 3);
    let mut by_pixels = request("Describe the image.", 12);
    assert_eq!(
        unsafe { massv_request_set_image_rgb8(by_pixels, padded.as_ptr(), w, h, stride) },
        MASSV_OK,
        "{}",
        last_error()
    );
    drop(padded);
    assert_eq!(unsafe { massv_generate(engine, by_pixels, None, null_mut()) }, MASSV_OK);
    assert_eq!(tokens(by_pixels), tokens(by_file));
    assert_eq!(text(by_pixels), text(by_file));

    // Tightly packed (stride 0) is the same image.
    assert_eq!(
        unsafe { massv_request_set_image_rgb8(by_pixels, img.rgb().as_ptr(), w, h, 0) },
        MASSV_OK
    );
    assert_eq!(unsafe { massv_generate(engine, by_pixels, None, null_mut()) }, MASSV_OK);
    assert_eq!(tokens(by_pixels), tokens(by_file));

    unsafe {
        massv_request_free(&mut by_file);
        massv_request_free(&mut by_pixels);
        massv_engine_free(&mut engine);
    }
}

struct Stream {
    ids: Vec<u32>,
    text: Vec<u8>,
    stop_after: usize,
}

unsafe extern "C" fn collect(token: u32, piece: *const c_char, len: usize, user: *mut c_void) -> c_int {
    let s = unsafe { &mut *user.cast::<Stream>() };
    let bytes = unsafe { std::slice::from_raw_parts(piece.cast::<u8>(), len + 1) };
    assert_eq!(bytes[len], 0, "piece is NUL-terminated");
    s.ids.push(token);
    s.text.extend_from_slice(&bytes[..len]);
    (s.ids.len() >= s.stop_after) as c_int
}

#[test]
fn streaming_with_a_drafter_and_stopping() {
    let mut engine = load("qwen2-tiny-gqa4-tied", Some("qwen2-tiny-mha-untied"));
    assert_eq!(unsafe { massv_engine_has_drafter(engine) }, 1);
    let mut r = request("Tell me a story about a cat.", 16);
    let mut s = Stream {
        ids: Vec::new(),
        text: Vec::new(),
        stop_after: usize::MAX,
    };
    let st = unsafe { massv_generate(engine, r, Some(collect), (&mut s as *mut Stream).cast()) };
    assert_eq!(st, MASSV_OK, "{}", last_error());
    assert_eq!(s.ids, tokens(r));
    assert_eq!(String::from_utf8(s.text).unwrap(), text(r));
    let mut m = massv_metrics::default();
    let mut rates = [f64::NAN; 8];
    assert_eq!(
        unsafe { massv_request_metrics(r, &mut m, rates.as_mut_ptr(), 2) },
        MASSV_OK
    );
    assert_eq!(m.gamma, 3);
    assert!(m.n_accept_rate_by_pos >= 1 && m.n_accept_rate_by_pos <= 3);
    assert!(rates[..m.n_accept_rate_by_pos.min(2)]
        .iter()
        .all(|r| (0.0..=1.0).contains(r)));
    assert!(
        rates[2..].iter().all(|r| r.is_nan()),
        "no more than cap entries written"
    );
    assert!(m.mal >= 1.0 && m.mal <= 4.0);

    // Stopping at the first token: one token, no drafting at all.
    let mut s = Stream {
        ids: Vec::new(),
        text: Vec::new(),
        stop_after: 1,
    };
    let st = unsafe { massv_generate(engine, r, Some(collect), (&mut s as *mut Stream).cast()) };
    assert_eq!(st, MASSV_OK);
    assert_eq!(tokens(r).len(), 1);
    assert_eq!(unsafe { massv_request_metrics(r, &mut m, null_mut(), 0) }, MASSV_OK);
    assert_eq!((m.finish_reason, m.target_passes), (MASSV_FINISH_CALLBACK, 0));

    // A failed generation leaves no stale result behind.
    let p = massv_generate_params {
        gamma: 0,
        ..massv_generate_default_params()
    };
    assert_eq!(unsafe { massv_request_set_params(r, &p) }, MASSV_OK);
    assert_eq!(
        unsafe { massv_generate(engine, r, None, null_mut()) },
        MASSV_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("gamma"), "{}", last_error());
    assert_eq!(
        unsafe { massv_request_tokens(r, null_mut(), 0, null_mut()) },
        MASSV_ERR_INVALID_ARGUMENT
    );

    unsafe {
        massv_request_free(&mut r);
        massv_engine_free(&mut engine);
        massv_engine_free(&mut engine);
    }
}

#[test]
fn one_engine_many_threads() {
    struct Shared(*mut massv_engine);
    // SAFETY: massv_engine is Sync (asserted at compile time in lib.rs).
    unsafe impl Sync for Shared {}
    impl Shared {
        fn get(&self) -> *mut massv_engine {
            self.0
        }
    }
    let engine = Shared(load("qwen2_5_vl-tiny-hub", None));
    let image = cstr(&fixture("images/nonsquare_150x100.png"));
    let run = |prompt: &str| {
        let mut r = request(prompt, 10);
        assert_eq!(unsafe { massv_request_set_image_file(r, image.as_ptr()) }, MASSV_OK);
        assert_eq!(unsafe { massv_generate(engine.get(), r, None, null_mut()) }, MASSV_OK);
        let t = tokens(r);
        unsafe { massv_request_free(&mut r) };
        t
    };
    let prompts = ["Describe the image.", "What colour is it?", "Count the shapes."];
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| run(p)).collect();
    let got: Vec<Vec<u32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6).map(|i| scope.spawn(move || run(prompts[i % 3]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, &want[i % 3], "thread {i}");
    }
    let mut e = engine.get();
    unsafe { massv_engine_free(&mut e) };
}

#[test]
fn text_buffer_cuts_at_a_character_boundary() {
    let req = Request {
        prompt: String::new(),
        image: None,
        params: GenerateParams::default(),
        result: Some(Finished {
            text: "a€b".into(), // € is 3 bytes: a(1) €(3) b(1)
            tokens: vec![1, 2, 3],
            metrics: Metrics::default(),
            finish_reason: MASSV_FINISH_MAX_TOKENS,
        }),
    };
    let mut buf = [0xFFu8; 8];
    let mut len = 0;
    for (size, want) in [
        (0, None),
        (1, Some("")),
        (2, Some("a")),
        (4, Some("a")),
        (5, Some("a€")),
        (6, Some("a€b")),
    ] {
        let st = write_text(&req, buf.as_mut_ptr().cast(), size, &mut len);
        assert_eq!(len, 5);
        assert_eq!(st.is_ok(), size == 6, "size {size}");
        if let Some(w) = want {
            let got = unsafe { CStr::from_ptr(buf.as_ptr().cast()) };
            assert_eq!(got.to_str().unwrap(), w, "size {size}");
        }
    }
    assert_eq!(
        write_text(&req, null_mut(), 3, null_mut()).unwrap_err().code,
        MASSV_ERR_INVALID_ARGUMENT
    );
}

#[test]
fn token_trees_through_the_c_api() {
    let e = load("qwen2-tiny-gqa4-tied", Some("qwen2-tiny-mha-untied"));
    let chain = request("Tell me a story about a cat.", 12);
    assert_eq!(
        unsafe { massv_generate(e, chain, None, null_mut()) },
        MASSV_OK,
        "{}",
        last_error()
    );
    let tree = request("Tell me a story about a cat.", 12);
    assert_eq!(
        unsafe { massv_request_set_tree(tree, c"not a tree".as_ptr()) },
        MASSV_ERR_INVALID_ARGUMENT
    );
    assert!(last_error().contains("--tree"), "{}", last_error());
    assert_eq!(
        unsafe { massv_request_set_tree(tree, c"dynamic:8,4".as_ptr()) },
        MASSV_OK
    );
    // New parameters keep the tree.
    let params = massv_generate_params {
        max_new_tokens: 12,
        ..massv_generate_default_params()
    };
    assert_eq!(unsafe { massv_request_set_params(tree, &params) }, MASSV_OK);
    assert_eq!(
        unsafe { massv_generate(e, tree, None, null_mut()) },
        MASSV_OK,
        "{}",
        last_error()
    );
    assert_eq!(tokens(tree), tokens(chain), "lossless at T = 0");
    let mut m = std::mem::MaybeUninit::<massv_metrics>::uninit();
    assert_eq!(
        unsafe { massv_request_metrics(tree, m.as_mut_ptr(), null_mut(), 0) },
        MASSV_OK
    );
    let m = unsafe { m.assume_init() };
    assert!(m.tree_nodes > 0.0 && m.tree_nodes <= 8.0, "{}", m.tree_nodes);
    assert_eq!(m.gamma, 4, "the tree's depth");
    // NULL goes back to chains.
    assert_eq!(unsafe { massv_request_set_tree(tree, null()) }, MASSV_OK);
    assert_eq!(unsafe { massv_generate(e, tree, None, null_mut()) }, MASSV_OK);
    let mut m = std::mem::MaybeUninit::<massv_metrics>::uninit();
    assert_eq!(
        unsafe { massv_request_metrics(tree, m.as_mut_ptr(), null_mut(), 0) },
        MASSV_OK
    );
    assert_eq!(unsafe { m.assume_init() }.tree_nodes, 0.0);
    unsafe {
        let (mut a, mut b, mut e) = (chain, tree, e);
        massv_request_free(&mut a);
        massv_request_free(&mut b);
        massv_engine_free(&mut e);
    }
}

#[test]
fn version_is_the_runtime_crate_version() {
    let v = unsafe { CStr::from_ptr(massv_version()) }.to_str().unwrap();
    let root = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml")).unwrap();
    let runtime = root
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("version in the root Cargo.toml");
    assert_eq!(v, runtime, "massv-ffi must be released in lockstep with massv");
}

#[test]
fn device_strings() {
    let t = cstr(&fixture("qwen2-tiny-gqa4-tied"));
    // The fixture's shapes are served: "cuda" loads wherever a GPU is.
    let cuda = if massv::backend::cuda::probe().is_ok() {
        MASSV_OK
    } else {
        MASSV_ERR_DEVICE
    };
    for (device, want) in [
        (Some(c"auto"), MASSV_OK),
        (Some(c"CPU"), MASSV_OK),
        (None, MASSV_OK),
        (Some(c"cuda"), cuda),
        (Some(c"gpu"), MASSV_ERR_INVALID_ARGUMENT),
        (Some(c""), MASSV_ERR_INVALID_ARGUMENT),
    ] {
        let mut e = null_mut();
        let st = unsafe { massv_engine_load(t.as_ptr(), null(), device.map_or(null(), CStr::as_ptr), &mut e) };
        assert_eq!(st, want, "{device:?}: {}", last_error());
        assert_eq!(e.is_null(), want != MASSV_OK);
        unsafe { massv_engine_free(&mut e) };
    }
}
