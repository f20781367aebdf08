//! Shared helpers of the integration tests: fixture paths and golden tensors.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// The checkout the tests read fixtures from: `MASSV_REPO_ROOT` when set (test binaries
/// built here and run in a copy of the tree elsewhere, as bench/gpu.sh does on a lent
/// GPU), else the one they were built in.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("MASSV_REPO_ROOT") {
        Some(root) => PathBuf::from(root),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The real model metadata in ../shared/real-models (present beside every checkout and CI).
pub fn real_model(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/real-models")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: the tests need ../shared/real-models beside the checkout",
        p.display()
    );
    p
}

/// A temporary copy of a model directory (files only), for tests that corrupt it.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

/// Golden tensors written by tests/reference/*.py.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Golden { bytes }
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("golden file parses");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name} missing"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::F32, "{name}");
        (
            shape,
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }

    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::I64, "{name}");
        (
            shape,
            data.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.i64(name).1.into_iter().map(|v| v as u32).collect()
    }
}

/// Largest |a - b|, panicking on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Exact probability of each 3-token continuation under target-only sampling.
pub fn exact_sequences(
    e: &massv::spec::engine::Engine,
    prompt: &[u32],
    sp: &massv::sampling::SamplingParams,
) -> BTreeMap<Vec<u32>, f64> {
    let mut out = BTreeMap::new();
    let (logits, mut s) = e
        .target
        .prefill(prompt, &[], &[], 4, massv::model::qwen2::Logits::Last)
        .unwrap();
    let p0 = massv::sampling::probabilities(&logits, sp);
    for (a, &pa) in p0.iter().enumerate().filter(|(_, &p)| p > 0.0) {
        let base = s.cache.len();
        let l1 = e
            .target
            .decode(&[a as u32], &mut s, massv::model::qwen2::Logits::Last)
            .unwrap();
        let p1 = massv::sampling::probabilities(&l1, sp);
        for (b, &pb) in p1.iter().enumerate().filter(|(_, &p)| p > 0.0) {
            let l2 = e
                .target
                .decode(&[b as u32], &mut s, massv::model::qwen2::Logits::Last)
                .unwrap();
            for (c, &pc) in massv::sampling::probabilities(&l2, sp)
                .iter()
                .enumerate()
                .filter(|(_, &p)| p > 0.0)
            {
                out.insert(vec![a as u32, b as u32, c as u32], pa as f64 * pb as f64 * pc as f64);
            }
            s.cache.rollback_to(base + 1).unwrap();
        }
        s.cache.rollback_to(base).unwrap();
    }
    out
}

/// Pearson χ² of observed counts against expected probabilities.
pub fn chi2(observed: &BTreeMap<Vec<u32>, usize>, expected: &BTreeMap<Vec<u32>, f64>, n: usize) -> f64 {
    assert!(
        observed.keys().all(|k| expected.contains_key(k)),
        "a sequence the target cannot produce"
    );
    expected
        .iter()
        .map(|(k, &p)| (observed.get(k).copied().unwrap_or(0) as f64 - p * n as f64).powi(2) / (p * n as f64))
        .sum()
}

/// 99.9% quantile of χ² with `df` (1..=15) degrees of freedom.
pub fn chi2_critical(df: usize) -> f64 {
    [
        10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70,
    ][df - 1]
}

/// With MASSV_CUDA_EMU=1, loads the CUDA emulator (cuda/emu: the kernels on the CPU) so
/// that the CUDA this process finds is the emulator's. Every test that looks for a device
/// calls this first, so all tests of a process see the same CUDA.
pub fn load_cuda_emulator_if_asked() {
    if std::env::var("MASSV_CUDA_EMU").as_deref() == Ok("1") {
        if let Err(e) = massv_cuda_emu::load() {
            panic!("MASSV_CUDA_EMU=1 but the CUDA emulator does not load: {e}");
        }
    }
}

/// The first CUDA device, or None after printing why the caller skips
/// (MASSV_REQUIRE_CUDA=1 turns a missing device into a failure: the GPU runs set it).
pub fn cuda_device() -> Option<massv::backend::cuda::CudaDevice> {
    load_cuda_emulator_if_asked();
    match massv::backend::cuda::CudaDevice::new() {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("MASSV_REQUIRE_CUDA").as_deref() != Ok("1"),
                "MASSV_REQUIRE_CUDA=1 but no CUDA device: {e}"
            );
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Device (bf16) outputs against the CPU's f32 reference: overall rms error ≤ RMS_TOL × the
/// reference's rms, and each row's max error ≤ ROW_TOL × that row's rms. The module doc of
/// tests/cuda_model.rs derives the bound (about 3× what bf16 storage alone costs).
pub const RMS_TOL: f32 = 0.02;
pub const ROW_TOL: f32 = 0.10;

pub fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

/// The bound of [`RMS_TOL`] / [`ROW_TOL`] on rows of `width`; Err names the worst offence.
pub fn check_close(what: &str, got: &[f32], want: &[f32], width: usize) -> Result<(), String> {
    check_close_lo(what, got, want, want, width)
}

/// [`check_close`] for a reference the device cannot reach with its bf16 weights: the HF
/// fixtures are f32 checkpoints, and rounding their weights to bf16 alone moves their
/// logits by 1.5–2 % rms. `lo` is the CPU model on the same weights rounded to bf16. The
/// errors add: each bound (overall rms, each row's max) is check_close's, for the bf16
/// activations, plus twice `lo`'s error, for the rounded weights. (check_close is this
/// with `lo` = `want`.)
pub fn check_close_lo(what: &str, got: &[f32], want: &[f32], lo: &[f32], width: usize) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    if lo.len() != want.len() {
        return Err(format!(
            "{what}: {} rounded-weight values, expected {}",
            lo.len(),
            want.len()
        ));
    }
    let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    let diff_lo: Vec<f32> = lo.iter().zip(want).map(|(a, b)| a - b).collect();
    if diff.iter().any(|d| !d.is_finite()) {
        return Err(format!("{what}: non-finite values"));
    }
    let (e, r, e_lo) = (rms(&diff), rms(want), rms(&diff_lo));
    let bound = RMS_TOL * r + 2.0 * e_lo;
    if e > bound {
        let weights = if e_lo > 0.0 {
            format!(" + 2 × the rounded weights' error {e_lo:e}")
        } else {
            String::new()
        };
        return Err(format!(
            "{what}: rms error {e:e} exceeds {RMS_TOL} × rms {r:e}{weights}"
        ));
    }
    for (i, ((d, dl), w)) in diff
        .chunks(width)
        .zip(diff_lo.chunks(width))
        .zip(want.chunks(width))
        .enumerate()
    {
        let max_abs = |x: &[f32]| x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (m, bound) = (max_abs(d), ROW_TOL * rms(w) + 2.0 * max_abs(dl) + 1e-6);
        if m > bound {
            return Err(format!("{what}: row {i} max error {m:e} exceeds {bound:e}"));
        }
    }
    Ok(())
}

pub fn assert_close_lo(what: &str, got: &[f32], want: &[f32], lo: &[f32], width: usize) {
    if let Err(e) = check_close_lo(what, got, want, lo, width) {
        panic!("{e}");
    }
}

/// A copy of model directory `src` whose f32 weights are rounded to bf16 (kept as f32
/// values): what the device computes with. Golden files (expected*) are left out.
pub fn bf16_rounded_copy(src: &Path) -> tempfile::TempDir {
    use massv::weights::{write_safetensors, OwnedTensor};
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !path.is_file() || name.starts_with("expected") {
            continue;
        }
        if !name.ends_with(".safetensors") {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (names, rounded): (Vec<String>, Vec<OwnedTensor>) = st
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                assert_eq!(t.dtype(), Dtype::F32, "{name}: {n}");
                let v = t
                    .data()
                    .chunks_exact(4)
                    .map(|b| half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_f32())
                    .collect();
                let shape = t.shape().to_vec();
                (n, OwnedTensor::f32(shape, v))
            })
            .unzip();
        let refs: Vec<(&str, OwnedTensor)> = names.iter().map(String::as_str).zip(rounded).collect();
        write_safetensors(&dir.path().join(&name), &refs).unwrap();
    }
    dir
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], width: usize) {
    assert_close_lo(what, got, want, want, width);
}

/// Writes a MASSV projector (massv.json + projector.safetensors, f32) mapping vision
/// features of width `dv`, merged m×m, through `dh` to `d`, with weights uniform in
/// ±1/√fan_in (norm weights around 1) drawn from `seed`.
pub fn write_random_projector(dir: &Path, dv: usize, m: usize, dh: usize, d: usize, seed: u64) {
    use massv::weights::{write_safetensors, OwnedTensor};
    let mut rng = massv::sampling::Rng::new(seed);
    let mut t = |shape: Vec<usize>, center: f32, scale: f32| {
        let v = (0..shape.iter().product::<usize>())
            .map(|_| center + scale * (2.0 * rng.uniform() as f32 - 1.0))
            .collect();
        OwnedTensor::f32(shape, v)
    };
    let (k1, k2) = ((dv * m * m) as f32, dh as f32);
    let tensors = [
        ("norm.weight", t(vec![dv], 1.0, 0.2)),
        ("fc1.weight", t(vec![dh, dv * m * m], 0.0, 1.0 / k1.sqrt())),
        ("fc1.bias", t(vec![dh], 0.0, 1.0 / k1.sqrt())),
        ("fc2.weight", t(vec![d, dh], 0.0, 1.0 / k2.sqrt())),
        ("fc2.bias", t(vec![d], 0.0, 1.0 / k2.sqrt())),
    ];
    write_safetensors(&dir.join("projector.safetensors"), &tensors).unwrap();
    let cfg = serde_json::json!({
        "format": "massv-drafter/1",
        "vision_hidden_size": dv,
        "spatial_merge_size": m,
        "projector_hidden_size": dh,
        "draft_hidden_size": d,
        "norm_eps": 1e-6,
        "activation": "gelu",
    });
    std::fs::write(dir.join("massv.json"), cfg.to_string()).unwrap();
}

/// Timed runs per benchmark step (each on its own, after the warm-up runs).
pub const BENCH_RUNS: usize = 30;
pub const BENCH_WARMUP: usize = 3;

/// MASSV_BENCH_SMOKE=1: a benchmark runs on models scaled down, to run its code end to
/// end on the CPU emulator before a GPU's minutes go into it; its figures mean nothing,
/// it times each step [`bench_runs`] times only and writes no JSON.
pub fn bench_smoke() -> bool {
    std::env::var("MASSV_BENCH_SMOKE").is_ok_and(|v| v == "1")
}

/// (warm-up, timed) runs per benchmark step: [`BENCH_WARMUP`], [`BENCH_RUNS`]; 1, 2 for
/// a smoke run.
pub fn bench_runs() -> (usize, usize) {
    if bench_smoke() {
        (1, 2)
    } else {
        (BENCH_WARMUP, BENCH_RUNS)
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

/// Median ms of `f` over the timed runs of [`bench_runs`] after its warm-up runs, each
/// run timed on its own with CUDA events on the stream (`CudaDevice::time_ms`) after the
/// device is synchronised; and the median wall-clock ms of the same runs (host work
/// included).
pub fn median_ms(dev: &massv::backend::cuda::CudaDevice, mut f: impl FnMut() -> massv::Result<()>) -> (f64, f64) {
    let (warmup, runs) = bench_runs();
    for _ in 0..warmup {
        f().unwrap();
    }
    let (mut events, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        dev.synchronize().unwrap();
        let t0 = std::time::Instant::now();
        events.push(dev.time_ms(&mut f).unwrap() as f64);
        wall.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    (median(events), median(wall))
}

/// Head dim of [`unserved_model_dir`]'s model: one the attention kernels are not built for.
pub const UNSERVED_HEAD_DIM: usize = 24;

/// A text target the CUDA kernels do not serve (head dim [`UNSERVED_HEAD_DIM`]: hidden
/// 96 in 4 heads), written by `massv synth` with the tokenizer and generation files of the
/// fixture `qwen2-tiny-gqa4-tied` (same vocabulary, 448): what `--device auto` must run
/// on the CPU and `--device cuda` must refuse, with or without a GPU.
pub fn unserved_model_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("config.json");
    let config = serde_json::json!({
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": 4 * UNSERVED_HEAD_DIM,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "vocab_size": 448,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": true,
        "rope_theta": 10000.0,
    });
    std::fs::write(&cfg, config.to_string()).unwrap();
    let dir = tmp.path().join("unserved-d24");
    let opts = massv::synth::SynthOptions {
        dtype: massv::synth::SynthDtype::Bf16,
        seed: 5,
        layers: None,
        max_shard_bytes: 1 << 30,
    };
    massv::synth::synth(&cfg, &dir, &opts).unwrap();
    let like = fixture("qwen2-tiny-gqa4-tied");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(like.join(f), dir.join(f)).unwrap();
    }
    (tmp, dir)
}
