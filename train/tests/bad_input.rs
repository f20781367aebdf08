//! Bad input gives clear errors naming the file (and line): malformed or incomplete JSONL,
//! empty captions, missing images (skipped and counted, or an error with --strict), a
//! drafter whose tokenizer differs from the target's, projectors that do not fit.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, make_drafter, write_jsonl};
use massv::model::projector::ProjectorConfig;
use massv_train::data::{read_captions, read_prompts};
use massv_train::hf;
use massv_train::phases::projector::{pretrain_projector, ProjectorRun};
use massv_train::phases::sdvit::{sdvit, SdvitParts};
use massv_train::phases::DrafterRun;
use massv_train::trainer::TrainOptions;
use serde_json::json;

fn target() -> PathBuf {
    fixture("qwen2_5_vl-tiny-hub")
}

fn captions(dir: &Path) -> PathBuf {
    let p = dir.join("captions.jsonl");
    write_jsonl(
        &p,
        &[json!({"image": fixture("images/ongrid_56x84.png"), "caption": "A picture."})],
    );
    p
}

fn run(draft: &Path, data: &Path, out: &Path) -> DrafterRun {
    let mut r = DrafterRun::new(&target(), draft, data, out);
    r.train = TrainOptions {
        steps: 1,
        batch: 1,
        ..Default::default()
    };
    r
}

#[test]
fn jsonl_errors_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    let img = fixture("images/ongrid_56x84.png");
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "{}\n\n{{\"image\": 1, \"caption\": \"x\"}}\n",
                json!({"image": img, "caption": "ok"})
            ),
            "d.jsonl:3",
        ),
        (
            format!(
                "{}\n{}\n",
                json!({"image": img, "caption": "ok"}),
                json!({"image": img, "caption": "  "})
            ),
            "d.jsonl:2: empty caption",
        ),
        (
            format!("{}\n", json!({"image": img})),
            "d.jsonl:1: missing string field `caption`",
        ),
        ("{not json\n".to_string(), "d.jsonl:1: not valid JSON"),
        ("[1, 2]\n".to_string(), "d.jsonl:1: not a JSON object"),
    ];
    for (text, want) in cases {
        std::fs::write(&p, text).unwrap();
        let err = read_captions(&p, false).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    // Prompt files: a missing response where one is needed, bad response ids.
    std::fs::write(&p, format!("{}\n", json!({"image": img, "prompt": "Hi"}))).unwrap();
    assert!(read_prompts(&p, false, false).is_ok());
    let err = read_prompts(&p, false, true).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:1: missing or empty `response`"), "{err}");
    std::fs::write(&p, format!("{}\n", json!({"prompt": "Hi", "response_ids": [1, -2]}))).unwrap();
    let err = read_prompts(&p, false, true).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:1: `response_ids`"), "{err}");
}

#[test]
fn missing_images_are_skipped_and_counted_or_fatal_with_strict() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    write_jsonl(
        &p,
        &[
            json!({"image": fixture("images/ongrid_56x84.png"), "caption": "one"}),
            json!({"image": "nope/gone.png", "caption": "two"}),
            json!({"image": fixture("images/small_20x30.png"), "caption": "three"}),
        ],
    );
    let loaded = read_captions(&p, false).unwrap();
    assert_eq!((loaded.records.len(), loaded.missing_images), (2, 1));
    assert_eq!(loaded.records[1].line, 3);
    let err = read_captions(&p, true).unwrap_err().to_string();
    assert!(err.contains("d.jsonl:2") && err.contains("nope/gone.png"), "{err}");
}

#[test]
fn a_drafter_with_another_vocabulary_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let draft = tmp.path().join("draft");
    make_drafter(&draft);
    // Rename one added token: same size, different vocabulary.
    let path = draft.join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    let last = added.last_mut().unwrap();
    last["content"] = json!("<|renamed|>");
    std::fs::write(&path, tok.to_string()).unwrap();
    let data = captions(tmp.path());
    let err = pretrain_projector(&ProjectorRun::new(run(&draft, &data, &tmp.path().join("out"))))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("does not share the tokenizer") && err.contains("draft"),
        "{err}"
    );
}

#[test]
fn projectors_that_do_not_fit_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let draft = tmp.path().join("draft");
    make_drafter(&draft);
    let data = captions(tmp.path());
    // A well-formed projector for 16-wide vision features: the target's are 32 wide.
    let cfg = ProjectorConfig {
        vision_hidden_size: 16,
        spatial_merge_size: 2,
        projector_hidden_size: 32,
        draft_hidden_size: 64,
        norm_eps: 1e-6,
    };
    hf::save_projector(&draft, &cfg, &hf::init_projector(&cfg, 0).unwrap()).unwrap();
    let err = pretrain_projector(&ProjectorRun::new(run(&draft, &data, &tmp.path().join("o1"))))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("massv.json") && err.contains("vision features are 32"),
        "{err}"
    );
    let err = sdvit(&run(&draft, &data, &tmp.path().join("o2")), SdvitParts::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("massv.json"), "{err}");

    // massv.json and projector.safetensors that disagree: the tensor is named.
    let cfg2 = ProjectorConfig {
        vision_hidden_size: 32,
        ..cfg
    };
    let json: serde_json::Value = json!({
        "format": "massv-drafter/1", "vision_hidden_size": 32, "spatial_merge_size": 2,
        "projector_hidden_size": 32, "draft_hidden_size": 64, "norm_eps": 1e-6, "activation": "gelu"
    });
    std::fs::write(draft.join("massv.json"), json.to_string()).unwrap();
    let _ = cfg2;
    let err = pretrain_projector(&ProjectorRun::new(run(&draft, &data, &tmp.path().join("o3"))))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("norm.weight") || err.contains("fc1.weight"), "{err}");
}

#[test]
fn sdvit_needs_a_massv_drafter() {
    let tmp = tempfile::tempdir().unwrap();
    let draft = tmp.path().join("draft");
    make_drafter(&draft);
    let data = tmp.path().join("d.jsonl");
    write_jsonl(&data, &[json!({"prompt": "Hi", "response": "Hello"})]);
    let err = sdvit(&run(&draft, &data, &tmp.path().join("out")), SdvitParts::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a MASSV drafter"), "{err}");
}

#[test]
fn a_fresh_projector_trains_with_a_chosen_width() {
    // --projector-hidden picks the width of a new projector; training runs and saves it.
    let tmp = tempfile::tempdir().unwrap();
    let draft = tmp.path().join("draft");
    make_drafter(&draft);
    let data = captions(tmp.path());
    let out = tmp.path().join("out");
    let mut args = ProjectorRun::new(run(&draft, &data, &out));
    args.projector_hidden = Some(40);
    let r = pretrain_projector(&args).unwrap();
    assert_eq!(r.train.state.step, 1);
    let (cfg, _) = hf::load_projector(&out).unwrap().unwrap();
    assert_eq!(cfg.projector_hidden_size, 40);
    // Asking for another width than the existing projector's is refused.
    args.run.draft = out.clone();
    args.run.out = tmp.path().join("out2");
    args.projector_hidden = Some(48);
    let err = pretrain_projector(&args).err().unwrap().to_string();
    assert!(err.contains("--projector-hidden 48"), "{err}");
}
