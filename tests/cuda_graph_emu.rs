//! CUDA stream capture and graphs through raw cudarc, as the runtime captures a drafter's
//! decode passes: kernels launched on a private stream while it captures, the graph then
//! launched on another stream. The semantic tests run on a GPU and on the emulator alike;
//! the ones on the emulator's counters and its strictness (the driver's error codes, the
//! capture invalidated) print `skipped: ...` on a GPU.
//!
//! Without a usable GPU every test prints `skipped: no CUDA device (<reason>)` and passes;
//! with MASSV_REQUIRE_CUDA=1 a missing device fails instead. MASSV_CUDA_EMU=1 runs them on
//! the emulator.

mod common;

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::{
    CUgraphInstantiate_flags as Flags, CUresult, CUstreamCaptureMode as Mode, CUstreamCaptureStatus as Status,
};
use cudarc::driver::{
    result, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig,
    PushKernelArg,
};
use massv::backend::cuda::{bf16, CudaDevice};

struct Setup {
    _serial: MutexGuard<'static, ()>,
    _dev: CudaDevice,
    ctx: Arc<CudaContext>,
    to_bf16: CudaFunction,
    to_f32: CudaFunction,
}

/// One test at a time: synchronising the context (a test here does) fails, and breaks,
/// every capture under way in the process, whichever thread made it.
static SERIAL: Mutex<()> = Mutex::new(());

/// The device's context (event tracking off, as the runtime has it) and cuda/convert.cu's
/// two kernels, loaded the raw way.
fn setup() -> Option<Setup> {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = common::cuda_device()?;
    let ctx = dev.context().clone();
    let (_, image) = massv::backend::kernels::MODULES
        .iter()
        .find(|(name, _)| *name == "convert")
        .expect("cuda/convert.cu is compiled in");
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
        .unwrap();
    let to_bf16 = module.load_function("f32_to_bf16").unwrap();
    let to_f32 = module.load_function("bf16_to_f32").unwrap();
    Some(Setup {
        _serial: serial,
        _dev: dev,
        ctx,
        to_bf16,
        to_f32,
    })
}

macro_rules! setup_or_skip {
    () => {
        match setup() {
            Some(s) => s,
            None => return,
        }
    };
}

fn emulator_or_skip(what: &str) -> bool {
    if massv_cuda_emu::loaded() {
        return true;
    }
    println!("skipped: {what} is the emulator's (MASSV_CUDA_EMU=1)");
    false
}

fn cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (n.max(1) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn err(code: CUresult) -> DriverError {
    DriverError(code)
}

/// Captures y[..n] = bf16(x[..n]), z[..n] = f32(y[..n]) on `stream`.
fn capture_convert(
    s: &Setup,
    stream: &Arc<CudaStream>,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<bf16>,
    z: &mut CudaSlice<f32>,
    n: &i64,
) -> CudaGraph {
    stream.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    // SAFETY: the kernels' signatures (const float*, bf16*, long long) and back; n ≤ len.
    unsafe {
        stream
            .launch_builder(&s.to_bf16)
            .arg(x)
            .arg(&mut *y)
            .arg(n)
            .launch(cfg(x.len()))
            .unwrap();
        stream
            .launch_builder(&s.to_f32)
            .arg(&*y)
            .arg(&mut *z)
            .arg(n)
            .launch(cfg(x.len()))
            .unwrap();
    }
    assert_eq!(
        stream.capture_status().unwrap(),
        Status::CU_STREAM_CAPTURE_STATUS_ACTIVE
    );
    let graph = stream.end_capture(Flags(0)).unwrap().expect("a graph");
    assert_eq!(stream.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_NONE);
    graph
}

fn launch_on(graph: &CudaGraph, stream: &CudaStream) {
    // SAFETY: a live graph and stream of the same context.
    unsafe { result::graph::launch(graph.cu_graph_exec(), stream.cu_stream()) }.unwrap();
}

#[test]
fn graph_reads_memory_at_launch_with_arguments_of_capture() {
    let s = setup_or_skip!();
    let main = s.ctx.new_stream().unwrap();
    let private = s.ctx.new_stream().unwrap();
    let x = main.clone_htod(&[100.0f32; 8]).unwrap();
    let mut y = main.alloc_zeros::<bf16>(8).unwrap();
    let mut z = main.alloc_zeros::<f32>(8).unwrap();
    main.synchronize().unwrap();

    let mut n = 3i64;
    let graph = capture_convert(&s, &private, &x, &mut y, &mut z, &n);
    // The launches copied their arguments (the driver copies kernelParams): this changes
    // nothing, and n's address is read by no one.
    n = 8;
    std::hint::black_box(&n);
    // Nothing ran during the capture.
    assert_eq!(main.clone_dtoh(&z).unwrap(), [0.0; 8]);
    assert_eq!(main.clone_dtoh(&y).unwrap(), [bf16::ZERO; 8]);

    let mut x = x;
    for round in 1..=2 {
        let input: Vec<f32> = (0..8).map(|i| (10 * round + i) as f32).collect();
        main.memcpy_htod(&input, &mut x).unwrap();
        launch_on(&graph, &main);
        // The captured n = 3, the input of this launch.
        let mut want = input[..3].to_vec();
        want.resize(8, 0.0);
        assert_eq!(main.clone_dtoh(&z).unwrap(), want, "launch {round}");
        let y: Vec<f32> = main.clone_dtoh(&y).unwrap().iter().map(|v| v.to_f32()).collect();
        assert_eq!(y, want, "launch {round}");
    }
}

#[test]
fn other_streams_run_during_a_capture() {
    let s = setup_or_skip!();
    let main = s.ctx.new_stream().unwrap();
    let private = s.ctx.new_stream().unwrap();
    let x = main.clone_htod(&[1.5f32, 2.5]).unwrap();
    let mut y = main.alloc_zeros::<bf16>(2).unwrap();
    main.synchronize().unwrap();
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let n = 2i64;
    // SAFETY: as in capture_convert.
    unsafe {
        main.launch_builder(&s.to_bf16)
            .arg(&x)
            .arg(&mut y)
            .arg(&n)
            .launch(cfg(2))
    }
    .unwrap();
    main.synchronize().unwrap();
    let graph = private.end_capture(Flags(0)).unwrap().expect("an empty graph");
    let y: Vec<f32> = main.clone_dtoh(&y).unwrap().iter().map(|v| v.to_f32()).collect();
    assert_eq!(y, [1.5, 2.5]);
    launch_on(&graph, &main); // empty: runs nothing
    main.synchronize().unwrap();
}

#[test]
fn host_copy_on_the_capturing_stream_invalidates_the_capture() {
    let s = setup_or_skip!();
    let private = s.ctx.new_stream().unwrap();
    let mut x = private.alloc_zeros::<f32>(4).unwrap();
    private.synchronize().unwrap();
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    let copy = private.memcpy_htod(&[1.0f32; 4], &mut x);
    // The pageable copy's synchronisation on drop failed too; cudarc keeps that error for
    // the next call.
    let _ = s.ctx.check_err();
    let end = private.end_capture(Flags(0));
    if massv_cuda_emu::loaded() {
        assert_eq!(copy, Err(err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)));
        assert_eq!(end.err(), Some(err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)));
    } else {
        assert!(copy.is_err(), "host-to-device copy captured");
        assert!(end.is_err(), "a graph from an invalidated capture");
    }
    // The capture is over and the stream works again.
    assert_eq!(private.capture_status().unwrap(), Status::CU_STREAM_CAPTURE_STATUS_NONE);
    private.memcpy_htod(&[2.0f32; 4], &mut x).unwrap();
    assert_eq!(private.clone_dtoh(&x).unwrap(), [2.0; 4]);
}

#[test]
fn stats_count_each_replayed_kernel_and_graph_launch() {
    let s = setup_or_skip!();
    if !emulator_or_skip("counting launches") {
        return;
    }
    let main = s.ctx.new_stream().unwrap();
    let private = s.ctx.new_stream().unwrap();
    let x = main.clone_htod(&[1.0f32; 8]).unwrap();
    let mut y = main.alloc_zeros::<bf16>(8).unwrap();
    let mut z = main.alloc_zeros::<f32>(8).unwrap();
    let mut w = main.alloc_zeros::<f32>(8).unwrap();
    massv_cuda_emu::reset_stats().unwrap();
    capture_convert(&s, &private, &x, &mut y, &mut z, &8);
    assert_eq!(
        massv_cuda_emu::stats().unwrap(),
        massv_cuda_emu::Stats::default(),
        "work ran during capture"
    );

    // A device-to-device copy and a memset are recorded too, and replayed after the kernels.
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    // SAFETY: as in capture_convert.
    unsafe {
        private
            .launch_builder(&s.to_bf16)
            .arg(&x)
            .arg(&mut y)
            .arg(&8i64)
            .launch(cfg(8))
    }
    .unwrap();
    private.memcpy_dtod(&z, &mut w).unwrap();
    private.memset_zeros(&mut z).unwrap();
    let graph = private.end_capture(Flags(0)).unwrap().unwrap();
    assert_eq!(
        massv_cuda_emu::stats().unwrap(),
        massv_cuda_emu::Stats::default(),
        "work ran during capture"
    );

    for _ in 0..3 {
        launch_on(&graph, &main);
    }
    let st = massv_cuda_emu::stats().unwrap();
    assert_eq!((st.launches, st.graph_launches, st.dtod_bytes), (3, 3, 3 * 32));
    assert_eq!((st.allocations, st.htod_copies, st.dtoh_copies), (0, 0, 0));
}

/// What capture forbids fails with the driver's code and invalidates the capture.
#[test]
fn forbidden_calls_invalidate_the_capture() {
    let s = setup_or_skip!();
    if !emulator_or_skip("checking the driver's capture error codes") {
        return;
    }
    use CUresult::*;
    let main = s.ctx.new_stream().unwrap();
    let private = s.ctx.new_stream().unwrap();
    let x = main.clone_htod(&[1.0f32; 4]).unwrap();
    let xp = x.device_ptr(&main).0;
    main.synchronize().unwrap();
    let before = main.record_event(None).unwrap();
    type Call<'a> = Box<dyn Fn() -> Result<(), DriverError> + 'a>;
    let calls: Vec<(&str, CUresult, Call)> = vec![
        (
            "device-to-host copy",
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            Box::new(|| {
                let mut host = [0.0f32; 4];
                // SAFETY: 16 bytes from a 16-byte buffer.
                unsafe { result::memcpy_dtoh_async(&mut host[..], xp, private.cu_stream()) }
            }),
        ),
        (
            "stream synchronise",
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            Box::new(|| private.synchronize()),
        ),
        (
            "context synchronise",
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            Box::new(|| s.ctx.synchronize()),
        ),
        // SAFETY (both): a plain allocation, freed when it succeeds.
        (
            "cuMemAlloc",
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            Box::new(|| unsafe { result::free_sync(result::malloc_sync(16)?) }),
        ),
        (
            "synchronous copy",
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            Box::new(|| unsafe { result::memcpy_htod_sync(xp, &[0.0f32; 4][..]) }),
        ),
        (
            "waiting on an event of before the capture",
            CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
            Box::new(|| private.wait(&before)),
        ),
        (
            "launch of a 2048-thread block",
            CUDA_ERROR_INVALID_VALUE,
            Box::new(|| {
                // SAFETY: converts no element (n = 0), and is refused anyway.
                unsafe {
                    private
                        .launch_builder(&s.to_bf16)
                        .arg(&x)
                        .arg(&x)
                        .arg(&0i64)
                        .launch(cfg(2048))
                }
                .map(|_| ())
            }),
        ),
    ];
    for (what, code, call) in &calls {
        private
            .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        assert_eq!(call(), Err(err(*code)), "{what}");
        let _ = s.ctx.check_err();
        assert_eq!(
            private.capture_status().unwrap(),
            Status::CU_STREAM_CAPTURE_STATUS_INVALIDATED,
            "{what}"
        );
        // Later work on the stream is refused too, then the capture ends without a graph.
        // SAFETY: 4 floats into a 4-float buffer.
        let again = unsafe { result::memcpy_dtod_async(xp, xp, 16, private.cu_stream()) };
        assert_eq!(again, Err(err(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)), "{what}");
        assert_eq!(
            private.end_capture(Flags(0)).err(),
            Some(err(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)),
            "{what}"
        );
    }
}

#[test]
fn capture_state_and_threads_follow_the_driver() {
    let s = setup_or_skip!();
    if !emulator_or_skip("checking the driver's capture error codes") {
        return;
    }
    use CUresult::*;
    let main = s.ctx.new_stream().unwrap();
    let private = s.ctx.new_stream().unwrap();
    assert_eq!(private.end_capture(Flags(0)).err(), Some(err(CUDA_ERROR_ILLEGAL_STATE)));
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    assert_eq!(
        private.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        Err(err(CUDA_ERROR_ILLEGAL_STATE))
    );
    // THREAD_LOCAL: another thread may allocate, and may not end the capture.
    std::thread::scope(|t| {
        t.spawn(|| {
            s.ctx.bind_to_thread().unwrap();
            // SAFETY: a plain allocation, freed.
            unsafe { result::free_sync(result::malloc_sync(16).unwrap()) }.unwrap();
            assert_eq!(
                private.end_capture(Flags(0)).err(),
                Some(err(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD))
            );
        });
    });
    assert_eq!(
        private.capture_status().unwrap(),
        Status::CU_STREAM_CAPTURE_STATUS_ACTIVE
    );
    // A device allocation on another stream is stream-ordered: allowed.
    let mut buf = main.alloc_zeros::<f32>(4).unwrap();
    // On the capturing stream it would be a graph memory node: not emulated.
    // SAFETY: refused.
    assert_eq!(
        unsafe { private.alloc::<f32>(4) }.err(),
        Some(err(CUDA_ERROR_NOT_SUPPORTED))
    );
    let _ = private.end_capture(Flags(0));

    // RELAXED: the capturing thread may allocate.
    private.begin_capture(Mode::CU_STREAM_CAPTURE_MODE_RELAXED).unwrap();
    // SAFETY: a plain allocation, freed.
    unsafe { result::free_sync(result::malloc_sync(16).unwrap()) }.unwrap();
    private.memset_zeros(&mut buf).unwrap();
    let graph = private.end_capture(Flags(0)).unwrap().unwrap();
    main.memcpy_htod(&[3.0f32; 4], &mut buf).unwrap();
    launch_on(&graph, &main);
    assert_eq!(main.clone_dtoh(&buf).unwrap(), [0.0; 4]);

    // The driver's refusal of these flags together.
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    assert_eq!(
        private
            .end_capture(
                Flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH
                    | Flags::CUDA_GRAPH_INSTANTIATE_FLAG_DEVICE_LAUNCH
            )
            .err(),
        Some(err(CUDA_ERROR_INVALID_VALUE))
    );
}

/// A node failing at replay fails the launch as a kernel launch fails.
#[test]
fn a_failing_node_fails_the_graph_launch() {
    let s = setup_or_skip!();
    if !emulator_or_skip("replaying into freed memory") {
        return;
    }
    let main = s.ctx.new_stream().unwrap();
    let private = s.ctx.new_stream().unwrap();
    let a = main.alloc_zeros::<f32>(4).unwrap();
    let mut b = main.alloc_zeros::<f32>(4).unwrap();
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    private.memcpy_dtod(&a, &mut b).unwrap();
    let graph = private.end_capture(Flags(0)).unwrap().unwrap();
    launch_on(&graph, &main);
    drop(b);
    // SAFETY: the graph is live; its copy's destination is not, which the emulator reports.
    let r = unsafe { result::graph::launch(graph.cu_graph_exec(), main.cu_stream()) };
    assert_eq!(r, Err(err(CUresult::CUDA_ERROR_LAUNCH_FAILED)));
}

/// The emulated cuBLAS runs at once, so on a capturing stream it refuses (a GPU would
/// record its kernels) rather than run outside the graph.
#[test]
fn cublas_on_a_capturing_stream_is_refused() {
    let s = setup_or_skip!();
    if !emulator_or_skip("cuBLAS's refusal to be captured") {
        return;
    }
    let private = s.ctx.new_stream().unwrap();
    let blas = cudarc::cublas::CudaBlas::new(private.clone()).unwrap();
    let a = private.alloc_zeros::<bf16>(4).unwrap();
    let mut c = private.alloc_zeros::<bf16>(4).unwrap();
    let cfg = cudarc::cublas::GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: 2,
        n: 2,
        k: 2,
        alpha: bf16::ONE,
        lda: 2,
        ldb: 2,
        beta: bf16::ZERO,
        ldc: 2,
    };
    use cudarc::cublas::Gemm;
    // SAFETY: 2 × 2 matrices in 4-element buffers.
    unsafe { blas.gemm(cfg, &a, &a, &mut c) }.unwrap();
    private
        .begin_capture(Mode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    // SAFETY: as above.
    assert!(unsafe { blas.gemm(cfg, &a, &a, &mut c) }.is_err());
    assert_eq!(
        private.end_capture(Flags(0)).err(),
        Some(err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED))
    );
}
