//! Finite-difference gradient checks of every backward: each op alone, the whole Qwen2 LM
//! (1-D RoPE and M-RoPE, tied and untied head, GQA, sliding window, replaced embedding
//! rows, loss mask) and the projector (with its un-permutation), and both chained.
//!
//! The forward runs in f32, so derivatives are checked along random unit directions with
//! central differences (step 1e-2): the analytic ⟨∇L, u⟩ must match to a few 1e-3
//! relative, while a wrong backward is off by O(1).

use std::sync::Arc;

use massv::config::TextConfig;
use massv::model::qwen2::Positions;
use massv_train::lm::{self, LmInput, LmSpec};
use massv_train::objective::{example_loss, Example, ImageFeatures, ModelSpec, PositionIds};
use massv_train::ops::{self, AttnShape};
use massv_train::params::Params;
use massv_train::trainer::Rng;
use massv_train::vision::{self, MergerNames, MergerSpec};

fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32 * s).collect()
}

fn unit(rng: &mut Rng, n: usize) -> Vec<f32> {
    let u = randn(rng, n, 1.0);
    let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    u.iter().map(|x| x / norm).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Checks d f(x)/du ≈ ⟨g, u⟩ for `trials` random unit directions u.
fn check_dir(what: &str, x: &[f32], g: &[f32], f: &mut dyn FnMut(&[f32]) -> f64, seed: u64) {
    let mut rng = Rng::new(seed);
    let h = 1e-2f32;
    for trial in 0..3 {
        let u = unit(&mut rng, x.len());
        let plus: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a + h * b).collect();
        let minus: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a - h * b).collect();
        let num = (f(&plus) - f(&minus)) / (2.0 * h as f64);
        let ana = dot(g, &u);
        let gnorm = dot(g, g).sqrt();
        let tol = 5e-3 * gnorm.max(ana.abs()) + 2e-4;
        assert!(
            (num - ana).abs() <= tol,
            "{what} (direction {trial}): numeric {num:.6} vs analytic {ana:.6} (|g| {gnorm:.4})"
        );
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    let mut rng = Rng::new(1);
    let (n, k, m) = (5, 7, 4);
    let (x, w, b, r) = (
        randn(&mut rng, n * k, 1.0),
        randn(&mut rng, m * k, 0.5),
        randn(&mut rng, m, 0.5),
        randn(&mut rng, n * m, 1.0),
    );
    let (mut dx, mut dw, mut db) = (vec![0.0; n * k], vec![0.0; m * k], vec![0.0; m]);
    ops::linear_backward(&r, &x, &w, k, Some(&mut dx), Some(&mut dw), Some(&mut db));
    let loss = |x: &[f32], w: &[f32], b: &[f32]| dot(&ops::linear(x, w, Some(b), k), &r);
    check_dir("linear dx", &x, &dx, &mut |v| loss(v, &w, &b), 10);
    check_dir("linear dw", &w, &dw, &mut |v| loss(&x, v, &b), 11);
    check_dir("linear db", &b, &db, &mut |v| loss(&x, &w, v), 12);
    // Exactness against plain loops too (the strided GEMMs).
    for i in 0..n {
        for j in 0..k {
            let want: f32 = (0..m).map(|o| r[i * m + o] * w[o * k + j]).sum();
            assert!((dx[i * k + j] - want).abs() < 1e-5);
        }
    }
    for o in 0..m {
        for j in 0..k {
            let want: f32 = (0..n).map(|i| r[i * m + o] * x[i * k + j]).sum();
            assert!((dw[o * k + j] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(2);
    let (rows, dim, eps) = (3, 8, 1e-6);
    let (x, w, r) = (
        randn(&mut rng, rows * dim, 1.0),
        randn(&mut rng, dim, 1.0),
        randn(&mut rng, rows * dim, 1.0),
    );
    let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; dim]);
    ops::rmsnorm_backward(&r, &x, &w, dim, eps, Some(&mut dx), Some(&mut dw));
    let loss = |x: &[f32], w: &[f32]| dot(&ops::rmsnorm(x, w, dim, eps), &r);
    check_dir("rmsnorm dx", &x, &dx, &mut |v| loss(v, &w), 20);
    check_dir("rmsnorm dw", &w, &dw, &mut |v| loss(&x, v), 21);
}

#[test]
fn swiglu_and_gelu_backward_match_finite_differences() {
    let mut rng = Rng::new(3);
    let (rows, inter) = (3, 6);
    let gu = randn(&mut rng, rows * 2 * inter, 1.5);
    let r = randn(&mut rng, rows * inter, 1.0);
    let mut dgu = vec![0.0; gu.len()];
    ops::swiglu_backward(&r, &gu, inter, &mut dgu);
    check_dir("swiglu", &gu, &dgu, &mut |v| dot(&ops::swiglu(v, inter), &r), 30);

    let x = randn(&mut rng, 50, 2.0);
    let r = randn(&mut rng, 50, 1.0);
    let mut dx = vec![0.0; 50];
    ops::gelu_backward(&r, &x, &mut dx);
    check_dir(
        "gelu",
        &x,
        &dx,
        &mut |v| {
            let mut y = v.to_vec();
            ops::gelu(&mut y);
            dot(&y, &r)
        },
        31,
    );
}

#[test]
fn rope_and_mrope_backward_match_finite_differences() {
    let mut rng = Rng::new(4);
    let (n, heads, hd, theta) = (5, 2, 8, 10000.0);
    let x = randn(&mut rng, n * heads * hd, 1.0);
    let r = randn(&mut rng, x.len(), 1.0);
    let pos: Vec<i32> = vec![0, 3, 4, 9, 10];
    let mut dx = r.clone();
    ops::rope_backward(&mut dx, &pos, heads, hd, theta);
    let rot = |v: &[f32]| {
        let mut y = v.to_vec();
        ops::rope(&mut y, &pos, heads, hd, theta);
        dot(&y, &r)
    };
    check_dir("rope", &x, &dx, &mut { rot }, 40);

    let pos3: Vec<i32> = vec![0, 1, 1, 1, 4, 0, 1, 1, 2, 4, 0, 1, 2, 1, 4];
    let sec = [1, 1, 2];
    let mut dx = r.clone();
    ops::mrope_backward(&mut dx, &pos3, sec, heads, hd, theta);
    let mrot = |v: &[f32]| {
        let mut y = v.to_vec();
        ops::mrope(&mut y, &pos3, sec, heads, hd, theta);
        dot(&y, &r)
    };
    check_dir("mrope", &x, &dx, &mut { mrot }, 41);
}

#[test]
fn attention_backward_matches_finite_differences() {
    for window in [None, Some(3)] {
        let mut rng = Rng::new(5);
        let s = AttnShape {
            tokens: 6,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 4,
            window,
        };
        let q = randn(&mut rng, 6 * 4 * 4, 1.0);
        let k = randn(&mut rng, 6 * 2 * 4, 1.0);
        let v = randn(&mut rng, 6 * 2 * 4, 1.0);
        let r = randn(&mut rng, q.len(), 1.0);
        let (out, lse) = ops::attention_forward(&q, &k, &v, s);
        // The forward equals the runtime's reference attention.
        let mut want = vec![0.0; q.len()];
        massv::reference::attention(&q, &k, &v, &mut want, 0, 4, 2, 4, window);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        ops::attention_backward(&r, &q, &k, &v, &lse, s, &mut dq, &mut dk, &mut dv);
        let f = |q: &[f32], k: &[f32], v: &[f32]| dot(&ops::attention_forward(q, k, v, s).0, &r);
        check_dir("attention dq", &q, &dq, &mut |x| f(x, &k, &v), 50);
        check_dir("attention dk", &k, &dk, &mut |x| f(&q, x, &v), 51);
        check_dir("attention dv", &v, &dv, &mut |x| f(&q, &k, x), 52);
    }
}

#[test]
fn cross_entropy_and_embedding_backward() {
    let mut rng = Rng::new(6);
    let (rows, v) = (4, 9);
    let logits = randn(&mut rng, rows * v, 2.0);
    let targets = [0u32, 8, 3, 3];
    let mut dl = vec![0.0; logits.len()];
    let loss = ops::cross_entropy(&logits, &targets, 1.0, &mut dl);
    let mut want = 0.0;
    for (row, &t) in logits.chunks(v).zip(&targets) {
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        want += lse - row[t as usize] as f64;
    }
    assert!((loss - want).abs() < 1e-9 * want.abs().max(1.0));
    check_dir(
        "cross_entropy",
        &logits,
        &dl,
        &mut |x| ops::cross_entropy(x, &targets, 1.0, &mut vec![0.0; x.len()]),
        60,
    );

    let dh = randn(&mut rng, 3 * 2, 1.0);
    let mut table = vec![0.0; 4 * 2];
    ops::embedding_backward(&dh, &[Some(1), None, Some(1)], 2, &mut table);
    assert_eq!(&table[2..4], &[dh[0] + dh[4], dh[1] + dh[5]]);
    assert!(table[..2].iter().chain(&table[4..]).all(|&x| x == 0.0));
}

fn tiny_cfg(tied: bool, mrope: bool, window: Option<usize>) -> TextConfig {
    TextConfig {
        vocab_size: 20,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: tied,
        max_position_embeddings: 64,
        sliding_window: window,
        max_window_layers: 1,
        bos_token_id: None,
        eos_token_ids: vec![],
        mrope_section: mrope.then_some([1, 0, 1]),
    }
}

fn random_params(cfg: &TextConfig, seed: u64) -> Params {
    let mut p = massv_train::hf::init_qwen2(cfg, seed, 0.3).unwrap();
    // Norm weights and biases away from their init so their gradients are exercised.
    let mut rng = Rng::new(seed + 1);
    for (name, t) in p.iter_mut() {
        if name.ends_with("norm.weight") || name.ends_with(".bias") {
            for x in t.iter_mut() {
                *x += rng.normal() as f32 * 0.3;
            }
        }
    }
    p
}

/// Every tensor of the LM, and the replaced embedding rows, against finite differences.
fn check_lm(cfg: &TextConfig, multi: bool) {
    let spec = LmSpec { cfg, prefix: "model." };
    let params = random_params(cfg, 7);
    let mut rng = Rng::new(8);
    let ids: Vec<u32> = vec![1, 5, 7, 7, 3, 19, 2, 11, 4, 0];
    let n = ids.len();
    let slots = [2usize, 3, 4];
    let rows = randn(&mut rng, slots.len() * cfg.hidden_size, 1.0);
    let mask: Vec<bool> = (0..n).map(|i| i >= 4 && i != 7).collect();
    let seq: Vec<i32> = (0..n as i32).collect();
    let pos3: Vec<i32> = [
        vec![0, 1, 2, 2, 2, 4, 5, 6, 7, 8],
        vec![0, 1, 2, 2, 3, 4, 5, 6, 7, 8],
        vec![0, 1, 2, 3, 2, 4, 5, 6, 7, 8],
    ]
    .concat();
    let positions = if multi {
        Positions::Multi(&pos3)
    } else {
        Positions::Seq(&seq)
    };
    let inp = LmInput {
        ids: &ids,
        positions,
        embed_slots: &slots,
        embed_rows: &rows,
        loss_mask: &mask,
        lossy_oov: false,
    };
    let mut grads = params.zeros_like(|_| true);
    let out = lm::loss(&params, Some(&mut grads), &spec, &inp).unwrap();
    assert_eq!(out.tokens, 5);
    // Forward-only loss equals the logits-based one, and the logits equal the runtime's model.
    let all = lm::logits(&params, &spec, &inp).unwrap();
    let v = cfg.vocab_size;
    let mut want = 0.0;
    for i in 1..n {
        if mask[i] {
            want += ops::cross_entropy(&all[(i - 1) * v..i * v], &[ids[i]], 1.0, &mut vec![0.0; v]);
        }
    }
    assert!((want - out.loss_sum).abs() < 1e-4, "{want} vs {}", out.loss_sum);

    let loss_with = |p: &Params, r: &[f32]| {
        let inp = LmInput { embed_rows: r, ..inp };
        lm::loss(p, None, &spec, &inp).unwrap().loss_sum
    };
    check_dir(
        "LM embed rows",
        &rows,
        &out.d_embed_rows,
        &mut |r| loss_with(&params, r),
        70,
    );
    for (i, name) in params.names().iter().enumerate() {
        let x = params.get(name).unwrap().to_vec();
        let g = grads.get(name).unwrap().to_vec();
        check_dir(
            &format!("LM {name}"),
            &x,
            &g,
            &mut |v| {
                let mut p = params.clone();
                p.get_mut(name).unwrap().copy_from_slice(v);
                loss_with(&p, &rows)
            },
            100 + i as u64,
        );
    }
}

#[test]
fn lm_backward_untied_1d() {
    check_lm(&tiny_cfg(false, false, None), false);
}

#[test]
fn lm_backward_tied_mrope_sliding_window() {
    check_lm(&tiny_cfg(true, true, Some(3)), true);
}

#[test]
fn lm_forward_equals_the_runtime_model() {
    // The training forward computes what massv's Qwen2 computes, on a fixture checkpoint.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2-tiny-gqa4-tied");
    let (cfg, params) = massv_train::hf::load_qwen2_params(&dir).unwrap();
    let model = massv::model::qwen2::Qwen2::load(&dir).unwrap();
    let ids: Vec<u32> = vec![3, 100, 7, 250, 9, 42, 17];
    let mut cache = model.new_cache(ids.len());
    let want = model
        .forward_tokens(&ids, &mut cache, massv::model::qwen2::Logits::All)
        .unwrap();
    let seq: Vec<i32> = (0..ids.len() as i32).collect();
    let mask = vec![true; ids.len()];
    let got = lm::logits(
        &params,
        &LmSpec {
            cfg: &cfg,
            prefix: "model.",
        },
        &LmInput {
            ids: &ids,
            positions: Positions::Seq(&seq),
            embed_slots: &[],
            embed_rows: &[],
            loss_mask: &mask,
            lossy_oov: false,
        },
    )
    .unwrap();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

fn projector_fixture(seed: u64) -> (Params, MergerSpec, ImageFeatures) {
    let mut rng = Rng::new(seed);
    let (dv, m, hidden, out) = (6, 2, 10, 16);
    let spec = MergerSpec {
        names: MergerNames::projector(),
        vision_hidden: dv,
        merge: m,
        eps: 1e-6,
    };
    let mut p = Params::new();
    let n = &spec.names;
    p.insert(
        n.norm.clone(),
        vec![dv],
        randn(&mut rng, dv, 0.5).iter().map(|x| x + 1.0).collect(),
    )
    .unwrap();
    p.insert(
        n.fc1_w.clone(),
        vec![hidden, dv * 4],
        randn(&mut rng, hidden * dv * 4, 0.3),
    )
    .unwrap();
    p.insert(n.fc1_b.clone(), vec![hidden], randn(&mut rng, hidden, 0.3))
        .unwrap();
    p.insert(n.fc2_w.clone(), vec![out, hidden], randn(&mut rng, out * hidden, 0.3))
        .unwrap();
    p.insert(n.fc2_b.clone(), vec![out], randn(&mut rng, out, 0.3)).unwrap();
    let units = 5;
    let feats = ImageFeatures {
        pre_merger: randn(&mut rng, units * 4 * dv, 1.0),
        window_index: vec![2, 0, 4, 1, 3],
        grid_thw: [1, 2, 10],
    };
    (p, spec, feats)
}

#[test]
fn projector_backward_matches_finite_differences() {
    let (params, spec, f) = projector_fixture(9);
    let mut rng = Rng::new(10);
    let (out, cache) = vision::forward(&params, &spec, &f.pre_merger, &f.window_index).unwrap();
    // The forward equals the runtime's projector (same op chain, same un-permutation).
    let dir = tempfile::tempdir().unwrap();
    let cfg = massv::model::projector::ProjectorConfig {
        vision_hidden_size: 6,
        spatial_merge_size: 2,
        projector_hidden_size: 10,
        draft_hidden_size: 16,
        norm_eps: 1e-6,
    };
    massv_train::hf::save_projector(dir.path(), &cfg, &params).unwrap();
    let runtime = massv::model::projector::Projector::load(dir.path()).unwrap().unwrap();
    assert_eq!(runtime.forward(&f.pre_merger, &f.window_index).unwrap(), out);

    let r = randn(&mut rng, out.len(), 1.0);
    let mut grads = params.zeros_like(|_| true);
    let mut dinput = vec![0.0; f.pre_merger.len()];
    vision::backward(&params, &mut grads, &spec, &cache, &r, Some(&mut dinput)).unwrap();
    let loss = |p: &Params, x: &[f32]| dot(&vision::forward(p, &spec, x, &f.window_index).unwrap().0, &r);
    check_dir("projector input", &f.pre_merger, &dinput, &mut |x| loss(&params, x), 80);
    for (i, name) in params.names().iter().enumerate() {
        let x = params.get(name).unwrap().to_vec();
        check_dir(
            &format!("projector {name}"),
            &x,
            grads.get(name).unwrap(),
            &mut |v| {
                let mut p = params.clone();
                p.get_mut(name).unwrap().copy_from_slice(v);
                loss(&p, &f.pre_merger)
            },
            90 + i as u64,
        );
    }
}

#[test]
fn gradients_flow_from_the_lm_into_the_projector() {
    let (pp, spec, f) = projector_fixture(11);
    let cfg = tiny_cfg(false, false, None);
    let mut params = random_params(&cfg, 12);
    params.update_from(pp).unwrap();
    let img = 17u32;
    let mut ids = vec![1, 2, 3];
    ids.extend([img; 5]);
    ids.extend([4, 5, 6, 7]);
    let mask: Vec<bool> = (0..ids.len()).map(|i| i >= 9).collect();
    let ex = Example {
        ids,
        loss_mask: mask,
        images: vec![Arc::new(f)],
        positions: PositionIds::Sequential,
    };
    let model = ModelSpec {
        lm: cfg,
        lm_prefix: "model.".into(),
        merger: Some(spec.clone()),
        image_token: img,
        lossy_oov: true,
    };
    // Only the projector trains: the LM's weight gradients are not even computed.
    let mut grads = params.zeros_like(|n| n.starts_with("projector."));
    example_loss(&params, Some(&mut grads), &model, &ex).unwrap();
    assert_eq!(grads.len(), 5);
    for (i, name) in spec.names.all().iter().enumerate() {
        let x = params.get(name).unwrap().to_vec();
        check_dir(
            &format!("LM→projector {name}"),
            &x,
            grads.get(name).unwrap(),
            &mut |v| {
                let mut p = params.clone();
                p.get_mut(name).unwrap().copy_from_slice(v);
                example_loss(&p, None, &model, &ex).unwrap().loss_sum
            },
            200 + i as u64,
        );
    }
}
