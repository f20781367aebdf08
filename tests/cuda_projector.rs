//! The MASSV projector on the CUDA device (`massv::model::cuda_projector`, behind
//! `Projector::load_on`) against the CPU projector (f32, the reference; tests/spec_massv.rs
//! holds it to torch), under the device bound of tests/common (`RMS_TOL` / `ROW_TOL`, per
//! row of the drafter's width): the fixture drafter's projector on the golden vision
//! features, then random projectors of the real shapes (Dv 1280, m 2, Dh 5120, D 896: the
//! 256 merged tokens of a 448×448 image) and of widths off the 8-element grid (cuBLAS and
//! a bias add instead of cuBLASLt), their input rows in a shuffled window order.
//!
//! Without a usable GPU each test prints `skipped: no CUDA device (<reason>)` and passes
//! (MASSV_REQUIRE_CUDA=1 makes that a failure).

mod common;

use std::sync::Arc;

use common::{assert_close, fixture, write_random_projector, Golden};
use massv::backend::cuda::CudaDevice;
use massv::backend::Device;
use massv::model::projector::Projector;
use massv::sampling::Rng;

fn device() -> Option<Arc<CudaDevice>> {
    common::cuda_device().map(Arc::new)
}

#[test]
fn fixture_projector_on_the_device_matches_the_cpu() {
    let Some(dev) = device() else { return };
    let dir = fixture("drafter-tiny-massv");
    let cpu = Projector::load(&dir).unwrap().expect("a MASSV drafter");
    let gpu = Projector::load_on(&dir, Some(&dev)).unwrap().expect("a MASSV drafter");
    assert_eq!((cpu.device(), gpu.device()), (Device::Cpu, Device::Cuda));
    let g = Golden::open(&fixture(
        "drafter-tiny-massv/expected_projector_nonsquare_150x100.safetensors",
    ));
    let wi: Vec<usize> = g.i64("window_index").1.iter().map(|&v| v as usize).collect();
    let x = g.f32("vision_pre_merger").1;
    let d = cpu.cfg.draft_hidden_size;
    let want = cpu.forward(&x, &wi).unwrap();
    let got = gpu.forward(&x, &wi).unwrap();
    assert_close("fixture projector vs CPU", &got, &want, d);
    assert_close("fixture projector vs torch", &got, &g.f32("projector_out").1, d);
    let err = gpu.forward(&x[..x.len() - 1], &wi).unwrap_err().to_string();
    assert!(err.contains("projector input"), "{err}");
}

/// A permutation of 0..n that is neither the identity nor a reversal, as the merger's
/// window order is for images wider than one window.
fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
    v
}

#[test]
fn random_projectors_on_the_device_match_the_cpu() {
    let Some(dev) = device() else { return };
    let mut rng = Rng::new(11);
    // (Dv, m, Dh, D, merged tokens per image): the real shapes on a 448×448 image and then
    // a smaller one (the scratch reused), and widths off the 8-element grid.
    let cases: [(usize, usize, usize, usize, &[usize]); 2] = [(1280, 2, 5120, 896, &[256, 64]), (20, 2, 100, 60, &[6])];
    for (seed, &(dv, m, dh, d, images)) in cases.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        write_random_projector(tmp.path(), dv, m, dh, d, 5 + seed as u64);
        let cpu = Projector::load(tmp.path()).unwrap().unwrap();
        let gpu = Projector::load_on(tmp.path(), Some(&dev)).unwrap().unwrap();
        for &units in images {
            // Features of varying scale per patch, as a vision tower's are.
            let patches = units * m * m;
            let x: Vec<f32> = (0..patches * dv)
                .map(|j| (1.0 + (j / dv % 7) as f32) * (2.0 * rng.uniform() as f32 - 1.0))
                .collect();
            let wi = shuffled(units, &mut rng);
            let what = format!("projector {dv}×{m}² → {dh} → {d}, {units} tokens");
            let want = cpu.forward(&x, &wi).unwrap();
            let got = gpu.forward(&x, &wi).unwrap();
            assert_close(&what, &got, &want, d);
            assert_eq!(gpu.forward(&x, &wi).unwrap(), got, "{what}: a second run");
        }
    }
}
