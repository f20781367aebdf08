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

// -------------------------------------------------------------------------------------
// Benchmark (ignored; run by bench/gpu.sh on a lent GPU)
//
// The image side of a request at the real shapes: the Qwen2.5-VL-7B vision tower and
// merger (all 32 blocks, a `massv synth` bf16 checkpoint of the real config whose LM is
// shrunk to one small layer, as only the tower is timed) on a 448×448 image (a 32×32
// patch grid: 1024 patches, 256 merged tokens), then the MASSV projector into the 0.5B
// drafter's width (Dv 1280, m 2, Dh 5120 = the merger's own hidden width, D 896) on the
// tower's features. Both are compute-bound: each row gives its achieved TFLOP/s.

/// The real target config (../shared/real-models), embedded at build time: the test binary
/// carries it to the GPU machine, where ../shared does not travel.
const TARGET_CONFIG: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/real-models/Qwen2.5-VL-7B-Instruct/config.json"
));

/// FLOPs of the vision tower and merger on `n` patches: 2 per weight and patch in the
/// patch embedding, the blocks' projections and the merger's MLP (per merged token);
/// 4·n·keys·C in each block's attention (QKᵀ and PV), keys = the patches of a window,
/// or all n in the full-attention blocks.
fn vision_flops(v: &massv::config::VisionConfig, n: usize) -> f64 {
    let (c, i, m2) = (v.hidden_size, v.intermediate_size, v.spatial_merge_size.pow(2));
    let window = (v.window_size / v.patch_size).pow(2).min(n);
    let (nf, cf) = (n as f64, c as f64);
    let blocks: f64 = (0..v.depth)
        .map(|b| {
            let keys = if v.fullatt_block_indexes.contains(&b) {
                n
            } else {
                window
            } as f64;
            2.0 * nf * (4 * c * c + 3 * c * i) as f64 + 4.0 * nf * keys * cf
        })
        .sum();
    let merger = 2.0 * (n / m2) as f64 * ((m2 * c) * (m2 * c) + m2 * c * v.out_hidden_size) as f64;
    2.0 * nf * (v.patch_dim() * c) as f64 + blocks + merger
}

#[test]
#[ignore = "benchmark: run by bench/gpu.sh on a lent GPU"]
fn bench_vision() {
    use common::median_ms;
    use massv::config::load_qwen2_5_vl;
    use massv::model::cuda_vision::CudaVision;
    use massv::model::qwen2_5_vl::Layout;
    use massv::synth::{synth, SynthDtype, SynthOptions, MAX_SHARD_BYTES};
    use massv::weights::Weights;
    use serde_json::json;

    let Some(dev) = device() else { return };
    if let Err(e) = dev.cublas_status() {
        panic!("bench_vision needs cuBLAS: {e}");
    }
    let mut config: serde_json::Value = serde_json::from_str(TARGET_CONFIG).unwrap();
    for (k, v) in [
        ("num_hidden_layers", json!(1)),
        ("intermediate_size", json!(512)),
        ("vocab_size", json!(1024)),
        ("tie_word_embeddings", json!(true)),
    ] {
        config[k] = v;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg_path = tmp.path().join("config.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    let dir = tmp.path().join("vl-7b-vision");
    let t0 = std::time::Instant::now();
    let opts = SynthOptions {
        dtype: SynthDtype::Bf16,
        seed: 17,
        layers: None,
        max_shard_bytes: MAX_SHARD_BYTES,
    };
    synth(&cfg_path, &dir, &opts).unwrap();
    let vcfg = load_qwen2_5_vl(&dir.join("config.json")).unwrap().vision;
    let w = Weights::open(&dir).unwrap();
    let tower = CudaVision::from_weights(dev.clone(), &vcfg, &w, Layout::detect(&w).visual()).unwrap();
    drop(w);
    println!(
        "synth + upload of the 7B vision tower ({} blocks): {:.1} s",
        vcfg.depth,
        t0.elapsed().as_secs_f64()
    );

    let grid = [1, 32, 32];
    let n = grid.iter().product::<usize>();
    let mut rng = Rng::new(3);
    let pixels: Vec<f32> = (0..n * vcfg.patch_dim())
        .map(|_| 4.0 * rng.uniform() as f32 - 2.0)
        .collect();
    let mut features = None;
    let vision = median_ms(&dev, || {
        features = Some(tower.forward(&pixels, grid)?);
        Ok(())
    });
    let features = features.unwrap();

    let (dv, m, dh, d) = (vcfg.hidden_size, vcfg.spatial_merge_size, 4 * vcfg.hidden_size, 896);
    write_random_projector(tmp.path(), dv, m, dh, d, 5);
    let projector = Projector::load_on(tmp.path(), Some(&dev)).unwrap().unwrap();
    let (pm, wi) = (&features.pre_merger, &features.window_index);
    let project = median_ms(&dev, || projector.forward(pm, wi).map(drop));
    let units = wi.len();

    let info = dev.info().clone();
    println!(
        "\ndevice: {}; median of {} runs (CUDA events; wall clock beside)",
        info.name,
        common::BENCH_RUNS
    );
    println!("{:<56} {:>9} {:>9} {:>9}", "step", "ms", "wall ms", "TFLOP/s");
    let mut rows = Vec::new();
    let steps = [
        (
            format!("7B vision tower + merger, 448×448 ({n} patches, {} blocks)", vcfg.depth),
            vision,
            vision_flops(&vcfg, n),
        ),
        (
            format!("MASSV projector {dv}×{m}² → {dh} → {d}, {units} tokens"),
            project,
            2.0 * units as f64 * ((m * m * dv) * dh + dh * d) as f64,
        ),
    ];
    for (name, (ms, wall), flops) in steps {
        let tflops = flops / (ms * 1e-3) / 1e12;
        println!("{name:<56} {ms:>9.3} {wall:>9.3} {tflops:>9.1}");
        rows.push(json!({"name": name, "ms": ms, "wall_ms": wall, "flops": flops, "tflops": tflops}));
    }
    let image_side = vision.0 + project.0;
    println!("{:<56} {image_side:>9.3}", "image side of TTFT (tower + projector)");
    if let Ok(path) = std::env::var("MASSV_BENCH_JSON") {
        let doc = json!({
            "device": info.name,
            "date": std::env::var("MASSV_BENCH_DATE").unwrap_or_default(),
            "commit": std::env::var("MASSV_COMMIT").unwrap_or_default(),
            "runs": common::BENCH_RUNS,
            "image": {"size": "448x448", "grid_thw": grid, "patches": n, "merged_tokens": units},
            "vision": "Qwen2.5-VL-7B-Instruct vision tower + merger (synth, bf16, all blocks)",
            "projector": {"vision_hidden": dv, "merge": m, "hidden": dh, "draft_hidden": d},
            "measured": rows,
            "image_side_ms": image_side,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
        println!("wrote {path}");
    }
}
