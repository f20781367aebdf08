//! A miniature of scripts/make-demo-models.sh end to end: data, tokenizer, target, text
//! drafter, phase 1, distillation, SDViT, then `massv demo` on the result.

use std::path::Path;

use massv_train::phases::world::{make_demo_models, WorldRun, WorldScale};

#[test]
fn miniature_demo_pipeline_runs_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = WorldRun {
        out: tmp.path().join("assets"),
        work: tmp.path().join("work"),
        chat_template_from: root.join("tests/fixtures/tokenizer/tokenizer_config.json"),
        scale: WorldScale::mini(),
        seed: 0,
    };
    let report = make_demo_models(&run).unwrap();
    assert!((0.0..=1.0).contains(&report.target_accuracy));
    for d in ["target", "drafter-text", "drafter-massv-p1", "drafter-massv"] {
        assert!(run.out.join(d).join("model.safetensors").is_file(), "{d}");
    }
    assert!(run.out.join("drafter-massv/massv.json").is_file());
    assert!(
        !run.out.join("drafter-text/massv.json").exists(),
        "the text drafter has no projector"
    );
    let tree = massv::demo::DEFAULT_TREE.parse().unwrap();
    let demo = massv::demo::run(&run.out, 2, 3, &tree, &tmp.path().join("demo")).unwrap();
    assert_eq!(demo.rows.len(), 5, "target, three drafters, MASSV with trees");
    assert!(
        demo.rows.iter().all(|r| r.lossless_t0),
        "T = 0 speculative outputs equal the target's"
    );
    assert!(tmp.path().join("demo/demo.png").is_file());
}
