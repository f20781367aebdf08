//! End to end on the tiny fixtures: phase 1 (projector pretraining from a random projector)
//! lowers the caption loss; self-distilled data is resumable; phase 2 (SDViT) raises the mean
//! accepted length of speculative decoding against the same target (Engine, T = 0) and lowers
//! the TVD between target and drafter.

mod common;

use std::path::{Path, PathBuf};

use common::{drafter_fixture, fixture, write_jsonl};
use massv::image::ImageInput;
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv_train::phases::distill::{distill_data, DistillRun};
use massv_train::phases::projector::{pretrain_projector, ProjectorRun};
use massv_train::phases::sdvit::{sdvit, SdvitParts};
use massv_train::phases::tvd::{tvd_report, TvdRun};
use massv_train::phases::DrafterRun;
use massv_train::trainer::TrainOptions;
use serde_json::json;

const IMAGES: [&str; 6] = [
    "ongrid_56x84.png",
    "nonsquare_150x100.png",
    "big_300x200.png",
    "small_20x30.png",
    "photo_90x70.jpg",
    "photo_64x64.webp",
];

fn target() -> PathBuf {
    fixture("qwen2_5_vl-tiny-hub")
}

fn image(name: &str) -> PathBuf {
    fixture("images").join(name)
}

#[test]
fn phase1_projector_pretraining_lowers_the_caption_loss() {
    let tmp = tempfile::tempdir().unwrap();
    // One image beside the JSONL (relative path), the others absolute.
    std::fs::copy(image(IMAGES[0]), tmp.path().join("local.png")).unwrap();
    let captions = [
        "A small picture with a gradient.",
        "A wide image with colours.",
        "A big picture of shapes.",
        "A tiny image.",
        "A photo with noise.",
        "A square photo.",
    ];
    let mut lines = vec![json!({"image": "local.png", "caption": captions[0]})];
    for (img, cap) in IMAGES.iter().zip(captions).skip(1) {
        lines.push(json!({"image": image(img), "caption": cap}));
    }
    lines.push(json!({"image": "missing.png", "caption": "skipped"}));
    let data = tmp.path().join("captions.jsonl");
    write_jsonl(&data, &lines);
    let out = tmp.path().join("massv");
    let mut run = DrafterRun::new(&target(), &drafter_fixture("drafter-tiny-text"), &data, &out);
    run.train = TrainOptions {
        steps: 40,
        batch: 3,
        lr: 3e-3,
        warmup_steps: 4,
        seed: 1,
        ..Default::default()
    };
    run.feature_cache = Some(tmp.path().join("features"));
    let r = pretrain_projector(&ProjectorRun::new(run.clone())).unwrap();
    eprintln!("caption loss {:.4} -> {:.4}", r.mean_loss_before, r.mean_loss_after);
    assert_eq!(r.examples, 6);
    assert_eq!(r.missing_images, 1);
    assert!(
        r.mean_loss_after < r.mean_loss_before - 0.5,
        "caption loss {} -> {}",
        r.mean_loss_before,
        r.mean_loss_after
    );
    // The feature cache was filled once per image.
    assert_eq!(std::fs::read_dir(tmp.path().join("features")).unwrap().count(), 6);
    // The output is a MASSV drafter the runtime serves: LM unchanged, projector new.
    for f in [
        "massv.json",
        "projector.safetensors",
        "model.safetensors",
        "config.json",
        "train_log.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(drafter_fixture("drafter-tiny-text").join("model.safetensors")).unwrap()
    );
    let engine = Engine::load(&target(), Some(&out)).unwrap();
    let img = ImageInput::from_path(&image(IMAGES[1])).unwrap();
    let o = engine
        .generate("Describe the image.", Some(&img), &greedy(), Hooks::default())
        .unwrap();
    assert!(!o.tokens.is_empty());

    // --strict turns the missing image into an error naming the line.
    run.strict = true;
    let err = pretrain_projector(&ProjectorRun::new(run)).err().unwrap().to_string();
    assert!(err.contains("captions.jsonl:7") && err.contains("missing.png"), "{err}");
}

fn greedy() -> GenerateParams {
    GenerateParams {
        gamma: 5,
        max_new_tokens: 24,
        ..Default::default()
    }
}

/// (image, prompt) pairs the target answers and the drafters are measured on.
fn prompts() -> Vec<(Option<&'static str>, &'static str)> {
    let mut p = Vec::new();
    for img in IMAGES {
        p.push((Some(img), "Describe the image."));
        p.push((Some(img), "What is in the picture?"));
    }
    p.push((None, "Hello, what can you see?"));
    p
}

fn mean_mal(drafter: &Path) -> f64 {
    let engine = Engine::load(&target(), Some(drafter)).unwrap();
    let ps = prompts();
    let mut total = 0.0;
    for (img, text) in &ps {
        let img = img.map(|i| ImageInput::from_path(&image(i)).unwrap());
        total += engine
            .generate(text, img.as_ref(), &greedy(), Hooks::default())
            .unwrap()
            .metrics
            .mal;
    }
    total / ps.len() as f64
}

/// A copy of a drafter directory with Gaussian noise (`rel` × each tensor's std) on its
/// LM: the fixture drafters were distilled to agree with the target, and phase 2 needs
/// room to improve to show that it does.
fn noisy_copy(src: &Path, dst: &Path, rel: f64, seed: u64) -> PathBuf {
    let (cfg, mut params) = massv_train::hf::load_qwen2_params(src).unwrap();
    let mut rng = massv_train::trainer::Rng::new(seed);
    for (_, v) in params.iter_mut() {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        for x in v.iter_mut() {
            *x += (rel * std * rng.normal()) as f32;
        }
    }
    massv_train::hf::copy_dir_files(src, dst, &|n| n == "model.safetensors").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    massv_train::hf::save_qwen2(dst, &cfg, Some(&config), &params).unwrap();
    dst.to_path_buf()
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

#[test]
fn distilled_data_then_sdvit_raises_mal_and_lowers_tvd() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("prompts.jsonl");
    let lines: Vec<_> = prompts()
        .into_iter()
        .map(|(img, text)| json!({"image": img.map(image), "prompt": text}))
        .collect();
    write_jsonl(&data, &lines);
    let n = lines.len();

    // Self-distilled data, interrupted, then a crash mid-line, then resumed.
    let out = tmp.path().join("distilled.jsonl");
    let mut d = DistillRun::new(&target(), &data, &out);
    d.max_new_tokens = 24;
    d.stop_after = Some(4);
    assert_eq!(distill_data(&d).unwrap().written, 4);
    assert_eq!(count_lines(&out), 4);
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    std::io::Write::write_all(&mut f, br#"{"image": "half a li"#).unwrap();
    drop(f);
    d.stop_after = None;
    let r = distill_data(&d).unwrap();
    assert_eq!((r.written, r.already_done), (n - 4, 4));
    assert!(r.truncated_bytes > 0);
    assert_eq!(count_lines(&out), n);
    assert_eq!(distill_data(&d).unwrap().written, 0, "a finished file is left alone");
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&out).unwrap().lines().next().unwrap()).unwrap();
    for key in ["image", "prompt", "response", "response_ids"] {
        assert!(first.get(key).is_some(), "{key} in {first}");
    }

    let massv = noisy_copy(
        &drafter_fixture("drafter-tiny-massv"),
        &tmp.path().join("noisy"),
        0.35,
        1,
    );
    let tvd_before = tvd_report(&TvdRun::new(&target(), &massv, &out, &tmp.path().join("tvd_before"))).unwrap();
    let mal_before = mean_mal(&massv);

    let trained = tmp.path().join("sdvit");
    let mut run = DrafterRun::new(&target(), &massv, &out, &trained);
    run.train = TrainOptions {
        steps: 60,
        batch: 4,
        lr: 2e-3,
        warmup_steps: 5,
        seed: 3,
        ..Default::default()
    };
    let rep = sdvit(&run, SdvitParts::default()).unwrap();
    assert!(rep.mean_loss_after < rep.mean_loss_before, "{rep:?}");
    for f in [
        "config.json",
        "model.safetensors",
        "massv.json",
        "projector.safetensors",
        "tokenizer.json",
    ] {
        assert!(trained.join(f).is_file(), "{f}");
    }
    massv::model::qwen2::Qwen2::load(&trained).unwrap();
    let mal_after = mean_mal(&trained);
    assert!(mal_after > mal_before + 0.2, "MAL {mal_before:.3} -> {mal_after:.3}");

    let tvd_after = tvd_report(&TvdRun::new(&target(), &trained, &out, &tmp.path().join("tvd_after"))).unwrap();
    assert!(
        tvd_after.mean < tvd_before.mean,
        "TVD {} -> {}",
        tvd_before.mean,
        tvd_after.mean
    );
    assert!(tmp.path().join("tvd_after.png").is_file());
    eprintln!(
        "MAL {mal_before:.3} -> {mal_after:.3}; TVD {:.4} -> {:.4}; loss {:.4} -> {:.4}",
        tvd_before.mean, tvd_after.mean, rep.mean_loss_before, rep.mean_loss_after
    );
}
