//! The `massv-train` binary: every command on the tiny fixtures, resume, and errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fixture, make_drafter, write_jsonl};
use serde_json::json;

fn massv_train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_massv-train"))
        .args(args)
        .output()
        .expect("massv-train runs")
}

fn ok(out: &Output) -> String {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    stdout + &stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_command_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let target = fixture("qwen2_5_vl-tiny-hub");
    let img = |n: &str| fixture("images").join(n);
    let draft = t.join("draft");
    make_drafter(&draft);

    let prompts = t.join("prompts.jsonl");
    write_jsonl(
        &prompts,
        &[
            json!({"image": img("ongrid_56x84.png"), "prompt": "Describe the image."}),
            json!({"image": img("photo_64x64.webp"), "prompt": "What is in the picture?"}),
            json!({"prompt": "Hello, what can you see?"}),
        ],
    );
    let distilled = t.join("distilled.jsonl");
    let args = [
        "distill-data",
        "--target",
        s(&target),
        "--data",
        s(&prompts),
        "--out",
        s(&distilled),
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--samples-per-prompt",
        "2",
        "--seed",
        "5",
    ];
    let log = ok(&massv_train(&args));
    assert!(log.contains("wrote 6 new responses"), "{log}");
    let first = std::fs::read_to_string(&distilled).unwrap();
    assert_eq!(first.lines().count(), 6);
    // Resumable: a second run adds nothing, and seeded sampling is reproducible.
    let log = ok(&massv_train(&args));
    assert!(
        log.contains("wrote 0 new responses") && log.contains("(6 already there"),
        "{log}"
    );
    std::fs::remove_file(&distilled).unwrap();
    ok(&massv_train(&args));
    assert_eq!(std::fs::read_to_string(&distilled).unwrap(), first);

    let captions = t.join("captions.jsonl");
    write_jsonl(
        &captions,
        &[
            json!({"image": img("ongrid_56x84.png"), "caption": "A gradient."}),
            json!({"image": img("photo_64x64.webp"), "caption": "A photo."}),
        ],
    );
    let p1 = t.join("phase1");
    let train_args = |cmd: &str, draft: &Path, data: &Path, out: &Path, steps: &str| -> Vec<String> {
        [
            cmd,
            "--target",
            s(&target),
            "--draft",
            s(draft),
            "--data",
            s(data),
            "--out",
            s(out),
            "--steps",
            steps,
            "--batch",
            "2",
            "--warmup",
            "1",
            "--checkpoint-every",
            "2",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let run = |a: Vec<String>| massv_train(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let log = ok(&run(train_args("projector", &draft, &captions, &p1, "3")));
    assert!(log.contains("mean loss per response token"), "{log}");
    for f in [
        "massv.json",
        "projector.safetensors",
        "model.safetensors",
        "tokenizer.json",
        "train_log.json",
    ] {
        assert!(p1.join(f).is_file(), "{f}");
    }
    let curve: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p1.join("train_log.json")).unwrap()).unwrap();
    assert_eq!(curve["steps"].as_array().unwrap().len(), 3);
    assert!(curve["steps"][0]["loss"].as_f64().unwrap() > 0.0);

    let p2 = t.join("phase2");
    ok(&run(train_args("sdvit", &p1, &distilled, &p2, "2")));
    // More steps on the same output continue from its checkpoint.
    let mut more = train_args("sdvit", &p1, &distilled, &p2, "4");
    more.push("--resume".into());
    assert!(ok(&run(more)).contains("resumed from step 2"));
    massv::spec::draft::Drafter::load(&p2).unwrap();

    let prefix = t.join("report/tvd");
    let log = ok(&massv_train(&[
        "tvd",
        "--target",
        s(&target),
        "--draft",
        s(&p2),
        "--data",
        s(&distilled),
        "--out",
        s(&prefix),
    ]));
    assert!(log.contains("TVD (massv mode)"), "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.join("report/tvd.json")).unwrap()).unwrap();
    let values = report["values"].as_array().unwrap();
    assert!(!values.is_empty());
    assert!(values.iter().all(|v| (0.0..=1.0).contains(&v.as_f64().unwrap())));
    let counted: u64 = report["bins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted as usize, values.len());
    let png = std::fs::read(t.join("report/tvd.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn errors_exit_non_zero_with_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let draft = t.join("draft");
    make_drafter(&draft);
    let data = t.join("bad.jsonl");
    write_jsonl(
        &data,
        &[json!({"image": fixture("images/ongrid_56x84.png"), "caption": ""})],
    );
    let target = fixture("qwen2_5_vl-tiny-hub");
    let out = massv_train(&[
        "projector",
        "--target",
        s(&target),
        "--draft",
        s(&draft),
        "--data",
        s(&data),
        "--out",
        s(&t.join("o")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error:") && err.contains("bad.jsonl:1: empty caption"),
        "{err}"
    );

    // A text-only drafter cannot be measured in massv mode.
    let out = massv_train(&[
        "tvd",
        "--target",
        s(&target),
        "--draft",
        s(&draft),
        "--data",
        s(&data),
        "--mode",
        "massv",
        "--out",
        s(&t.join("x")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a MASSV drafter"));
}
