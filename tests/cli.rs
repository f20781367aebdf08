//! The `massv` binary as users run it: contracts of `generate` and `logits`, `--device`,
//! and one-line errors with a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::{fixture, max_abs_diff, unserved_model_dir, Golden, UNSERVED_HEAD_DIM};

fn massv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_massv"))
        .args(args)
        .output()
        .expect("run massv")
}

/// The note `--device auto` prints when a GPU is present but does not serve the target
/// (a head dim the attention kernels are not built for, say) and the CPU runs it instead:
/// not an error line.
const CPU_NOTE: &str = "massv: using the CPU: ";

/// Asserts a failed run: non-zero exit, exactly one `error: …` line (besides a CPU_NOTE),
/// no panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with(CPU_NOTE)).collect();
    assert_eq!(lines.len(), 1, "want one line, got: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{stderr}");
}

#[test]
fn generate_json_equals_transformers_greedy() {
    let dir = fixture("qwen2-tiny-gqa4-tied");
    let out = massv(&[
        "generate",
        "--target",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello there, how are you?",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let want = Golden::open(&dir.join("expected.safetensors")).ids("decode.tokens");
    assert_eq!(tokens, want);
    assert!(v["text"].is_string());
    assert!(v["metrics"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["placement"]["target"]["device"], "cpu", "{}", v["placement"]);
    assert!(v["placement"]["drafter"].is_null(), "no drafter: {}", v["placement"]);
}

#[test]
fn generate_plain_prints_text() {
    let dir = fixture("qwen2-tiny-mha-untied");
    let out = massv(&[
        "generate",
        "--target",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty());
}

#[test]
fn logits_writes_input_ids_and_logits() {
    let dir = fixture("qwen2-tiny-gqa2-sharded");
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("out.safetensors");
    let out = massv(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello there, how are you?",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = Golden::open(&out_file);
    let want = Golden::open(&dir.join("expected.safetensors"));
    assert_eq!(got.ids("input_ids"), want.ids("prefill.input_ids"));
    let (shape, logits) = got.f32("logits");
    let (want_shape, want_logits) = want.f32("prefill.logits");
    assert_eq!(shape, want_shape);
    assert!(max_abs_diff(&logits, &want_logits) <= 1e-4);
}

#[test]
fn missing_model_dir_is_one_error_line() {
    let out = massv(&["generate", "--target", "/nonexistent/model", "--prompt", "hi"]);
    assert_one_line_error(&out, "/nonexistent/model");
}

#[test]
fn corrupt_weights_are_one_error_line_and_no_output_file() {
    let src = fixture("qwen2-tiny-gqa4-tied");
    let dir = common::copy_dir(&src);
    let p = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out_file = dir.path().join("out.safetensors");
    let out = massv(&[
        "logits",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "hi",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "model.safetensors");
    assert!(!out_file.exists(), "nothing half-written");
}

#[test]
fn bad_arguments_are_one_error_line() {
    let out = massv(&["generate", "--prompt", "hi"]);
    assert_one_line_error(&out, "--target");
    let dir = fixture("qwen2-tiny-gqa4-tied");
    let out = massv(&[
        "generate",
        "--target",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--device",
        "tpu",
    ]);
    assert_one_line_error(&out, "tpu");
}

#[test]
fn over_long_request_is_an_error() {
    let dir = fixture("qwen2-tiny-gqa4-tied");
    let out = massv(&[
        "generate",
        "--target",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "100000",
    ]);
    assert_one_line_error(&out, "exceeds the context");
}

#[test]
fn vl_logits_with_an_image_equal_the_library() {
    use massv::model::qwen2::Logits;
    use massv::model::qwen2_5_vl::Qwen25Vl;
    let dir = fixture("qwen2_5_vl-tiny-hub");
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("vl.safetensors");
    let image = fixture("images/ongrid_56x84.png");
    let out = massv(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is in the picture?",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = Golden::open(&out_file);
    let ids = got.ids("input_ids");
    let model = Qwen25Vl::load(&dir).unwrap();
    let pads = ids.iter().filter(|&&t| t == model.cfg.image_token_id).count();
    assert_eq!(pads, 6, "a 56×84 image is 4×6 patches = 6 merged tokens");
    // The on-grid image needs no resize, so transformers' pixel values apply as they are.
    let g = Golden::open(&dir.join("expected_ongrid_56x84.safetensors"));
    let embeds = model.encode_image(&g.f32("pixel_values").1, [1, 4, 6]).unwrap().embeds;
    let p = model.prepare(ids.clone(), &[[1, 4, 6]], embeds).unwrap();
    let mut cache = model.new_cache(ids.len());
    let want = model.prefill(&p, &mut cache, Logits::All).unwrap();
    assert!(max_abs_diff(&got.f32("logits").1, &want) <= 1e-5);
}

#[test]
fn vl_generate_with_an_image() {
    let dir = fixture("qwen2_5_vl-tiny-hub");
    let image = fixture("images/nonsquare_150x100.png");
    let out = massv(&[
        "generate",
        "--target",
        dir.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is in the picture?",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!v["tokens"].as_array().unwrap().is_empty());
}

#[test]
fn image_errors_are_one_line() {
    let vl = fixture("qwen2_5_vl-tiny-hub");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"definitely not a png").unwrap();
    let out = massv(&[
        "generate",
        "--target",
        vl.to_str().unwrap(),
        "--image",
        bad.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, "bad.png");
    let out = massv(&[
        "generate",
        "--target",
        vl.to_str().unwrap(),
        "--image",
        "/no/such.png",
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, "/no/such.png");
    // An image for a text-only model.
    let text = fixture("qwen2-tiny-gqa4-tied");
    let png = fixture("images/ongrid_56x84.png");
    let out = massv(&[
        "generate",
        "--target",
        text.to_str().unwrap(),
        "--image",
        png.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, "text-only model");
}

#[test]
fn generate_parameter_errors_are_one_line() {
    let t = fixture("qwen2-tiny-gqa4-tied");
    let d = fixture("qwen2-tiny-mha-untied");
    let (t, d) = (t.to_str().unwrap(), d.to_str().unwrap());
    let base = ["generate", "--target", t, "--draft", d, "--prompt", "hi"];
    let run = |extra: &[&str]| massv(&[&base[..], extra].concat());
    assert_one_line_error(&run(&["--draft-mode", "bogus"]), "bogus");
    assert_one_line_error(&run(&["--draft-mode", "massv"]), "no massv.json");
    assert_one_line_error(&run(&["--gamma", "0"]), "gamma");
    assert_one_line_error(&run(&["--temperature", "-0.5"]), "temperature");
    assert_one_line_error(&run(&["--temperature", "1", "--top-p", "1.5"]), "top-p");
    assert_one_line_error(&run(&["--temperature", "1", "--top-p", "0"]), "top-p");
    let out = run(&["--json", "--gamma", "3", "--max-new-tokens", "6"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &v["metrics"];
    for key in ["mal", "accept_rate_by_pos", "tokens_per_s"] {
        assert!(!m[key].is_null(), "metrics.{key}");
    }
    for key in [
        "vision",
        "prefill_target",
        "prefill_draft",
        "draft",
        "verify",
        "accept",
        "total",
    ] {
        assert!(m["timings_ms"][key].is_number(), "timings_ms.{key}");
    }
    // Where each model ran (auto: the CPU here, a GPU where one serves them).
    let p = &v["placement"];
    let device = p["target"]["device"].as_str().unwrap_or_default();
    assert!(["cpu", "cuda"].contains(&device), "{p}");
    assert_eq!(
        p["drafter"]["device"], p["target"]["device"],
        "the drafter runs beside the target: {p}"
    );
    if device == "cuda" {
        assert!(
            p["target"]["gpu"].is_string() && p["drafter"]["graphs"].is_boolean(),
            "{p}"
        );
    }
}

#[test]
fn drafter_with_another_tokenizer_is_refused() {
    let src = fixture("qwen2-tiny-mha-untied");
    let tmp = common::copy_dir(&src);
    // Swap two special tokens' ids: same size, different mapping.
    let p = tmp.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text
        .replace("\"<|im_start|>\"", "\"<|TMP|>\"")
        .replace("\"<|im_end|>\"", "\"<|im_start|>\"")
        .replace("\"<|TMP|>\"", "\"<|im_end|>\"");
    std::fs::write(&p, text).unwrap();
    let t = fixture("qwen2-tiny-gqa4-tied");
    let out = massv(&[
        "generate",
        "--target",
        t.to_str().unwrap(),
        "--draft",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_one_line_error(&out, "does not share the target's tokenizer");
}

#[test]
fn bench_prints_a_table_and_writes_json() {
    let t = fixture("qwen2-tiny-gqa4-tied");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let out = massv(&[
        "bench",
        "--target",
        t.to_str().unwrap(),
        "--text-draft",
        t.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "8",
        "--gamma",
        "3",
        "--floor-model",
        t.to_str().unwrap(),
        "--floor-steps",
        "2",
        "--device",
        "cpu",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("target-only") && stdout.contains("text-drafter") && stdout.contains("floor"),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["mal"], 1.0);
    // The target drafting for itself accepts every draft: 7 tokens after the first in 2 passes.
    assert!(rows[1]["mal"].as_f64().unwrap() > 3.0, "{}", rows[1]);
    assert!(v["device"].as_str().unwrap().starts_with("cpu"));
    assert!(v["floor"]["ratio_to_floor"].as_f64().unwrap() > 0.0);
    assert!(
        v["floor"]["device"].as_str().unwrap().starts_with("cpu"),
        "{}",
        v["floor"]
    );
}

/// `--device auto` on the CPU (no GPU here; with one, a model whose head dim the kernels
/// are not built for): the same answer as `--device cpu`, with at most the CPU note on
/// stderr, and none at all without a GPU.
#[test]
fn device_auto_answers_as_the_cpu_does() {
    let (_tmp, unserved) = unserved_model_dir();
    let gpu = massv::backend::cuda::probe().is_ok();
    let dir = if gpu { unserved } else { fixture("qwen2-tiny-gqa4-tied") };
    let run = |device: &str| {
        let out = massv(&[
            "generate",
            "--target",
            dir.to_str().unwrap(),
            "--draft",
            fixture("qwen2-tiny-mha-untied").to_str().unwrap(),
            "--prompt",
            "Hello there, how are you?",
            "--max-new-tokens",
            "10",
            "--device",
            device,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let ((auto, note), (cpu, quiet)) = (run("auto"), run("cpu"));
    assert_eq!(auto["tokens"], cpu["tokens"]);
    assert_eq!(auto["text"], cpu["text"]);
    assert!(quiet.is_empty(), "{quiet}");
    assert!(note.lines().all(|l| l.starts_with(CPU_NOTE)), "{note}");
    if gpu {
        assert!(note.contains(&format!("head_dim {UNSERVED_HEAD_DIM}")), "{note}");
    } else {
        assert!(note.is_empty(), "no GPU, no note: {note}");
    }
}

/// `--device cuda` on a machine or a model it cannot serve: one `error:` line naming
/// CUDA, a non-zero exit, nothing written, for every subcommand that takes it.
#[test]
fn device_cuda_that_cannot_run_is_one_error_line() {
    // With a GPU the fixtures run on it: the text model is then one it does not serve, and
    // the Qwen2.5-VL case is the fixture's vision tower with the same model (it fails on
    // the LM first).
    let (_tmp_model, unserved) = unserved_model_dir();
    let gpu = massv::backend::cuda::probe().is_ok();
    let text = if gpu { unserved } else { fixture("qwen2-tiny-gqa4-tied") };
    let vl = if gpu {
        text.clone()
    } else {
        fixture("qwen2_5_vl-tiny-hub")
    };
    let image = fixture("images/nonsquare_150x100.png");
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("logits.safetensors");
    let json = tmp.path().join("bench.json");
    let t = text.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--target", t, "--prompt", "hi"],
        vec![
            "generate",
            "--target",
            vl.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        vec![
            "logits",
            "--model",
            t,
            "--prompt",
            "hi",
            "--out",
            out_file.to_str().unwrap(),
        ],
        vec![
            "bench",
            "--target",
            t,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--json",
            json.to_str().unwrap(),
        ],
    ];
    for mut args in cases {
        args.extend(["--device", "cuda"]);
        let out = massv(&args);
        assert_one_line_error(&out, "CUDA");
        // Which reason depends on the machine: no kernels, no driver or GPU, or the head dim.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let head_dim = format!("head_dim {UNSERVED_HEAD_DIM}");
        assert!(
            [
                "CUDA kernels",
                "driver",
                "CUDA device",
                "CUDA context",
                head_dim.as_str()
            ]
            .iter()
            .any(|r| stderr.contains(r)),
            "{args:?}: {stderr}"
        );
    }
    assert!(!out_file.exists() && !json.exists(), "nothing written");
    // demo takes --device too (it fails first on the missing demo models here).
    let out = massv(&[
        "demo",
        "--assets",
        tmp.path().join("none").to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert_one_line_error(&out, "no demo models");
}
