//! Token trees: lossless at T = 0 for every shape, never worse than the chain they
//! contain, the target's distribution at T > 0 (and a broken residual caught), and
//! caches that equal a fresh prefill after compaction to the accepted path.

mod common;

use std::collections::BTreeMap;

use common::{chi2, chi2_critical, exact_sequences, fixture, max_abs_diff};
use massv::image::{preprocess, ImageInput, PreprocessorConfig};
use massv::model::qwen2::{Logits, TreeMask};
use massv::model::Cache;
use massv::reference;
use massv::sampling::{Rng, SamplingParams};
use massv::spec::draft::{DraftMode, DraftState, Drafter, VisionTokens};
use massv::spec::engine::{Engine, GenerateParams, Hooks};
use massv::spec::tree::{
    draw_without_replacement, verify_tree_greedy, verify_tree_sampled, Proposal, QRow, TokenTree, TreeSpec,
};
use massv::spec::verify::{residual, verify_greedy};
use massv::spec::TreeRows;

const TARGET: &str = "qwen2-tiny-gqa4-tied";
const VL_TARGET: &str = "qwen2_5_vl-tiny-hub";
const PROMPTS: [&str; 3] = ["Hello there, how are you?", "hi", "Tell me a story about a cat."];
const SHAPES: [&str; 6] = [
    "static:0;1;0.0;0.1;0.0.0",
    "static:2x2x1x1",
    "static:1x1x1x1x1",
    "static:3x1x1x1x1x1x1",
    "dynamic:16,5",
    "dynamic:6,4,2",
];

fn engine(target: &str, drafter: Option<&str>) -> Engine {
    Engine::load(&fixture(target), drafter.map(fixture).as_deref()).unwrap()
}

fn tree_params(spec: &str, max_new: usize) -> GenerateParams {
    GenerateParams {
        tree: Some(spec.parse().unwrap()),
        max_new_tokens: max_new,
        ..Default::default()
    }
}

#[test]
fn trees_are_lossless_at_t0_on_text_targets() {
    let baseline = engine(TARGET, None);
    for drafter in [TARGET, "qwen2-tiny-mha-untied", "qwen2-tiny-gqa2-sharded"] {
        let spec = engine(TARGET, Some(drafter));
        for prompt in PROMPTS {
            let want = baseline
                .generate(
                    prompt,
                    None,
                    &GenerateParams {
                        max_new_tokens: 20,
                        ..Default::default()
                    },
                    Hooks::default(),
                )
                .unwrap();
            for shape in SHAPES {
                let got = spec
                    .generate(prompt, None, &tree_params(shape, 20), Hooks::default())
                    .unwrap();
                assert_eq!(got.tokens, want.tokens, "{drafter} {shape} {prompt:?}");
                let m = &got.metrics;
                let depth: TreeSpec = shape.parse().unwrap();
                assert!(
                    m.mal >= 1.0 && m.mal <= (depth.depth() + 1) as f64,
                    "{shape}: mal {}",
                    m.mal
                );
                assert!(m.tree_nodes > 0.0 && m.tree_nodes <= depth.max_nodes() as f64);
                assert_eq!(m.accepted_hist.iter().sum::<usize>(), m.target_passes);
                if drafter == TARGET && shape.starts_with("static") {
                    // Self-drafting: the rank-0 branch (full depth in every static shape
                    // here) is the target's own choice, always accepted.
                    let full = (want.tokens.len() - 1).div_ceil(depth.depth() + 1);
                    assert_eq!(m.target_passes, full, "{shape} self-drafting");
                }
            }
        }
    }
}

#[test]
fn trees_are_lossless_at_t0_with_images_and_massv() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("spec_expected.json")).unwrap()).unwrap();
    let pre = PreprocessorConfig::from_dir(&fixture(VL_TARGET)).unwrap();
    let mut checked = 0;
    for drafter in ["drafter-tiny-massv", "drafter-tiny-text"] {
        let e = engine(VL_TARGET, Some(drafter));
        for c in cases.iter().filter(|c| c["mode"] == "target") {
            let images: Vec<_> = c["image"]
                .as_str()
                .map(|p| preprocess(&ImageInput::from_path(&fixture(p)).unwrap(), &pre).unwrap())
                .into_iter()
                .collect();
            let ids = e.tokenizer.encode(c["prompt"].as_str().unwrap()).unwrap();
            let want: Vec<u32> = serde_json::from_value(c["tokens"].clone()).unwrap();
            let max_new = c["max_new_tokens"].as_u64().unwrap() as usize;
            for shape in ["static:2x2x1x1", "dynamic:12,6"] {
                let out = e
                    .generate_ids(&ids, &images, &tree_params(shape, max_new), Hooks::default())
                    .unwrap();
                assert_eq!(out.tokens, want, "{drafter} {shape} {}", c["case"]);
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "{checked}");
}

/// Drives the components by hand: at every step a copy of both caches runs the γ = 5
/// chain pass the engine would run, and the tree that contains that chain as its rank-0
/// branch must accept at least as many tokens from the same state.
#[test]
fn a_tree_containing_the_chain_never_accepts_fewer() {
    let sp = SamplingParams::default();
    let img = ImageInput::from_path(&fixture("images/nonsquare_150x100.png")).unwrap();
    for (target, drafter_dir, shape, image) in [
        (VL_TARGET, "drafter-tiny-massv", "static:3x2x2x1x1", true),
        (VL_TARGET, "drafter-tiny-text", "static:4x2x1x1x1", true),
        (TARGET, "qwen2-tiny-mha-untied", "static:3x2x1x1x1", false),
        (TARGET, TARGET, "static:2x1x1x1x1", false),
    ] {
        let e = engine(target, None);
        let drafter = Drafter::load(&fixture(drafter_dir)).unwrap();
        let mode = drafter.default_mode();
        let spec: TreeSpec = shape.parse().unwrap();
        let images = match image {
            true => vec![preprocess(&img, &PreprocessorConfig::from_dir(&fixture(target)).unwrap()).unwrap()],
            false => Vec::new(),
        };
        let vision = e.target.encode_images(&images).unwrap();
        let vt = VisionTokens::of(&e.target, &e.tokenizer);
        let (mut gained, mut steps) = (0, 0);
        for prompt in PROMPTS {
            let ids = e
                .tokenizer
                .encode(&e.tokenizer.user_prompt(prompt, image).unwrap())
                .unwrap();
            let (logits, mut session) = e.target.prefill(&ids, &images, &vision, 64, Logits::Last).unwrap();
            let first = massv::generate::argmax(&logits) as u32;
            let embeds = drafter
                .prompt_embeddings(mode, &session.prompt, &ids, &vision, &vt)
                .unwrap();
            let mut state = DraftState::prefill(&drafter, embeds, first, 64).unwrap();
            let mut last = first;
            for _ in 0..6 {
                // The chain, on copies.
                let (mut cs, mut cstate) = (session.try_clone().unwrap(), state.try_clone().unwrap());
                let (drafts, _) = cstate.draft(&drafter, 5, &sp, &mut Rng::new(0)).unwrap();
                let block: Vec<u32> = std::iter::once(last).chain(drafts.iter().copied()).collect();
                let cl = e.target.decode(&block, &mut cs, Logits::All).unwrap();
                let v = cl.len() / block.len();
                let am: Vec<u32> = cl.chunks_exact(v).map(|r| massv::generate::argmax(r) as u32).collect();
                let chain = verify_greedy(&drafts, &am);

                // The tree, for real.
                let tree = state
                    .draft_tree(&drafter, &spec, 5, &sp, &mut Rng::new(0), None)
                    .unwrap();
                let rank0: Vec<u32> = std::iter::successors(Some(0usize), |&n| tree.children(n).next())
                    .skip(1)
                    .map(|n| tree.tokens[n])
                    .collect();
                assert_eq!(rank0, drafts, "the tree's rank-0 branch is the chain");
                let base = session.cache.len();
                let tl = e
                    .target
                    .decode_tree(&tree.tokens, &tree.depths, &tree.mask(), &mut session)
                    .unwrap();
                let am: Vec<u32> = tl.chunks_exact(v).map(|r| massv::generate::argmax(r) as u32).collect();
                let verdict = verify_tree_greedy(&tree, &am);
                assert!(
                    verdict.path.len() >= chain.accepted,
                    "{drafter_dir} {shape}: tree {} < chain {}",
                    verdict.path.len(),
                    chain.accepted
                );
                if verdict.path.len() == chain.accepted {
                    assert_eq!(verdict.next, chain.next, "same path, same target token");
                }
                gained += verdict.path.len() - chain.accepted;
                steps += 1;
                let keep: Vec<usize> = verdict.path.iter().map(|&n| base + n).collect();
                session.cache.compact(base + 1, &keep).unwrap();
                state.commit_tree(&tree, &verdict).unwrap();
                last = verdict.next;
            }
        }
        assert!(steps >= 18);
        eprintln!("{drafter_dir} {shape}: {gained} more tokens than the chain over {steps} passes");
        if drafter_dir == "drafter-tiny-massv" {
            assert!(gained > 0, "{drafter_dir}: the extra branches never helped");
        }
    }
}

/// One node with k children: the emitted token must follow p.
fn one_node_chi2(proposal: Proposal, rule: fn(&[f32], &[f32]) -> Vec<f32>, seed: u64) -> f64 {
    let p = vec![0.35f32, 0.25, 0.2, 0.1, 0.06, 0.04];
    let q = vec![0.05f32, 0.1, 0.15, 0.2, 0.25, 0.25];
    let mut rng = Rng::new(seed);
    let n = 40_000;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        let mut t = TokenTree::root(0, proposal);
        let children = match proposal {
            Proposal::Sampled => draw_without_replacement(&q, 3, &mut rng),
            // Fixed children: the drafter's top 3, whatever the target thinks.
            Proposal::Fixed => vec![5, 4, 3],
        };
        for &c in &children {
            t.push(0, c);
        }
        if proposal == Proposal::Sampled {
            t.q[0] = Some(QRow::Host(q.clone()));
        }
        let ps = vec![p.clone(); t.len()];
        let v = verify_tree_sampled(&t, &ps, &mut rng, rule).unwrap();
        let first = v.emitted(&t)[0];
        counts[first as usize] += 1;
    }
    counts
        .iter()
        .zip(&p)
        .map(|(&c, &pi)| (c as f64 - pi as f64 * n as f64).powi(2) / (pi as f64 * n as f64))
        .sum()
}

#[test]
fn tree_rejection_sampling_keeps_p_and_catches_a_broken_residual() {
    fn broken(p: &[f32], _q: &[f32]) -> Vec<f32> {
        p.to_vec() // keep p instead of normalize(max(0, p − q))
    }
    let crit = chi2_critical(5);
    for proposal in [Proposal::Sampled, Proposal::Fixed] {
        let good = one_node_chi2(proposal, residual, 1);
        assert!(good < crit, "{proposal:?}: χ² = {good}");
        let bad = one_node_chi2(proposal, broken, 1);
        assert!(
            bad > 10.0 * crit,
            "{proposal:?}: broken rule must be caught: χ² = {bad}"
        );
    }
}

/// Target-only sampling vs tree sampling with a drafter that disagrees with the target:
/// the 3-token outputs must follow the exact sequence probabilities.
#[test]
fn tree_sampling_keeps_the_target_distribution() {
    let e = engine(TARGET, Some("qwen2-tiny-mha-untied"));
    let sp = SamplingParams {
        temperature: 1.0,
        top_k: 2,
        top_p: 1.0,
    };
    let prompt = e
        .tokenizer
        .encode(&e.tokenizer.user_prompt("hi", false).unwrap())
        .unwrap();
    let expected = exact_sequences(&e, &prompt, &sp);
    for shape in ["static:2x2", "dynamic:4,2,2"] {
        let n = 3000;
        let mut observed: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
        let mut rejected = 0;
        for seed in 0..n {
            let params = GenerateParams {
                tree: Some(shape.parse().unwrap()),
                sampling: sp,
                seed: seed as u64,
                max_new_tokens: 3,
                ..Default::default()
            };
            let out = e.generate_ids(&prompt, &[], &params, Hooks::default()).unwrap();
            assert_eq!(out.tokens.len(), 3);
            rejected += out.metrics.accepted_hist.first().copied().unwrap_or(0);
            *observed.entry(out.tokens).or_default() += 1;
        }
        assert!(rejected > n / 20, "{shape}: the test needs rejections ({rejected})");
        let df = expected.len() - 1;
        let stat = chi2(&observed, &expected, n);
        assert!(
            stat < chi2_critical(df),
            "{shape}: χ² = {stat:.2} (df {df}): {observed:?} vs {expected:?}"
        );
    }
}

#[test]
fn compacted_caches_equal_a_fresh_prefill() {
    // Text target and drafter, then the VL target (M-RoPE positions) with a MASSV drafter.
    let e = engine(TARGET, None);
    let drafter = Drafter::load(&fixture("qwen2-tiny-mha-untied")).unwrap();
    let ids = e
        .tokenizer
        .encode(&e.tokenizer.user_prompt(PROMPTS[0], false).unwrap())
        .unwrap();
    let vt = VisionTokens::of(&e.target, &e.tokenizer);
    let embeds = |ids: &[u32]| drafter.prompt_embeddings(DraftMode::Text, ids, ids, &[], &vt).unwrap();
    let (_, mut session) = e.target.prefill(&ids, &[], &[], 128, Logits::Last).unwrap();
    let first = 7u32;
    let mut state = DraftState::prefill(&drafter, embeds(&ids), first, 128).unwrap();
    let mut committed = vec![first];
    let mut rng = Rng::new(5);
    let spec: TreeSpec = "dynamic:10,4,3".parse().unwrap();
    // Forced verdicts: nothing, the second child's branch, the deepest path.
    for pick in [0usize, 1, 2, 1, 2] {
        let tree = state
            .draft_tree(&drafter, &spec, 4, &SamplingParams::default(), &mut rng, None)
            .unwrap();
        let base = session.cache.len();
        e.target
            .decode_tree(&tree.tokens, &tree.depths, &tree.mask(), &mut session)
            .unwrap();
        let path: Vec<usize> = match pick {
            0 => Vec::new(),
            1 => {
                let second = tree.children(0).nth(1).expect("two children at the root");
                std::iter::successors(Some(second), |&n| tree.children(n).next()).collect()
            }
            _ => {
                let deepest = (0..tree.len()).max_by_key(|&n| (tree.depths[n], n)).unwrap();
                let mut p: Vec<usize> = std::iter::successors(Some(deepest), |&n| (n != 0).then(|| tree.parents[n]))
                    .filter(|&n| n != 0)
                    .collect();
                p.reverse();
                p
            }
        };
        let verdict = massv::spec::tree::TreeVerdict {
            path: path.clone(),
            next: 11 + committed.len() as u32,
        };
        let keep: Vec<usize> = path.iter().map(|&n| base + n).collect();
        session.cache.compact(base + 1, &keep).unwrap();
        state.commit_tree(&tree, &verdict).unwrap();
        committed.extend(verdict.emitted(&tree));

        let seen: Vec<u32> = ids.iter().chain(&committed[..committed.len() - 1]).copied().collect();
        let (_, fresh) = e.target.prefill(&seen, &[], &[], 0, Logits::Last).unwrap();
        assert_eq!(session.cache.len(), fresh.cache.len());
        for l in 0..e.target.text_config().num_hidden_layers {
            let ((k1, v1), (k2, v2)) = (session.cache.layer(l).unwrap(), fresh.cache.layer(l).unwrap());
            assert!(
                max_abs_diff(k1, k2) < 1e-4 && max_abs_diff(v1, v2) < 1e-4,
                "target layer {l} pick {pick}"
            );
        }
        let upto = committed.len() - state.pending.len();
        assert_eq!(&committed[upto..], &state.pending[..]);
        let dseen: Vec<u32> = ids.iter().chain(&committed[..upto]).copied().collect();
        let fresh = DraftState::prefill(&drafter, embeds(&dseen), 0, 0).unwrap();
        assert_eq!(state.cache.len(), fresh.cache.len(), "pick {pick}");
        for l in 0..drafter.lm.cfg.num_hidden_layers {
            let ((k1, v1), (k2, v2)) = (state.cache.layer(l).unwrap(), fresh.cache.layer(l).unwrap());
            assert!(
                max_abs_diff(k1, k2) < 1e-4 && max_abs_diff(v1, v2) < 1e-4,
                "drafter layer {l} pick {pick}"
            );
        }
    }
}

#[test]
fn vl_tree_cache_equals_a_fresh_prefill() {
    let e = engine(VL_TARGET, Some("drafter-tiny-massv"));
    let img = ImageInput::from_path(&fixture("images/nonsquare_150x100.png")).unwrap();
    let pre = preprocess(&img, &PreprocessorConfig::from_dir(&fixture(VL_TARGET)).unwrap()).unwrap();
    let ids = e
        .tokenizer
        .encode(&e.tokenizer.user_prompt("Describe the image.", true).unwrap())
        .unwrap();
    let vision = e.target.encode_images(std::slice::from_ref(&pre)).unwrap();
    let (_, mut session) = e
        .target
        .prefill(&ids, std::slice::from_ref(&pre), &vision, 32, Logits::Last)
        .unwrap();
    let tree = {
        let mut t = TokenTree::root(5, Proposal::Fixed);
        let a = t.push(0, 8);
        t.push(0, 9);
        let c = t.push(a, 10);
        t.push(c, 12);
        t.push(a, 11);
        t
    };
    let base = session.cache.len();
    e.target
        .decode_tree(&tree.tokens, &tree.depths, &tree.mask(), &mut session)
        .unwrap();
    // Accept 8 → 10 → 12.
    session
        .cache
        .compact(base + 1, &[base + 1, base + 3, base + 4])
        .unwrap();
    let mut seen = ids.clone();
    seen.extend([5, 8, 10, 12]);
    let (_, fresh) = e
        .target
        .prefill(&seen, std::slice::from_ref(&pre), &vision, 0, Logits::Last)
        .unwrap();
    assert_eq!(session.cache.len(), fresh.cache.len());
    for l in 0..e.target.text_config().num_hidden_layers {
        let ((k1, v1), (k2, v2)) = (session.cache.layer(l).unwrap(), fresh.cache.layer(l).unwrap());
        assert!(max_abs_diff(k1, k2) < 1e-4 && max_abs_diff(v1, v2) < 1e-4, "layer {l}");
    }
}

/// The greedy passes hand back exactly the argmax of the logits passes (first index of
/// the maximum), and leave the same cache: chain and tree, on the VL target (M-RoPE
/// positions shifted by rope_delta).
#[test]
fn argmax_passes_equal_the_argmax_of_the_logits_passes() {
    let e = engine(VL_TARGET, None);
    let img = ImageInput::from_path(&fixture("images/nonsquare_150x100.png")).unwrap();
    let pre = preprocess(&img, &PreprocessorConfig::from_dir(&fixture(VL_TARGET)).unwrap()).unwrap();
    let ids = e
        .tokenizer
        .encode(&e.tokenizer.user_prompt("Describe the image.", true).unwrap())
        .unwrap();
    let vision = e.target.encode_images(std::slice::from_ref(&pre)).unwrap();
    let (_, session) = e
        .target
        .prefill(&ids, std::slice::from_ref(&pre), &vision, 32, Logits::Last)
        .unwrap();
    assert_ne!(session.rope_delta, 0, "the image shifts text positions");
    let argmax_rows = |logits: &[f32], n: usize| -> Vec<u32> {
        let v = logits.len() / n;
        logits
            .chunks_exact(v)
            .map(|r| massv::generate::argmax(r) as u32)
            .collect()
    };
    let block = [5u32, 8, 10, 12];
    let (mut a, mut b) = (session.try_clone().unwrap(), session.try_clone().unwrap());
    let want = argmax_rows(&e.target.decode(&block, &mut a, Logits::All).unwrap(), block.len());
    assert_eq!(e.target.decode_argmax(&block, &mut b).unwrap(), want);
    assert_eq!(a.cache.layer(0).unwrap(), b.cache.layer(0).unwrap());

    let mut t = TokenTree::root(5, Proposal::Fixed);
    let x = t.push(0, 8);
    t.push(0, 9);
    t.push(x, 10);
    let (mut a, mut b) = (session.try_clone().unwrap(), session.try_clone().unwrap());
    let logits = e.target.decode_tree(&t.tokens, &t.depths, &t.mask(), &mut a).unwrap();
    let got = e
        .target
        .decode_tree_argmax(&t.tokens, &t.depths, &t.mask(), &mut b)
        .unwrap();
    assert_eq!(got, argmax_rows(&logits, t.len()));
    assert_eq!(a.cache.layer(0).unwrap(), b.cache.layer(0).unwrap());
    assert!(e
        .target
        .decode_tree_argmax(&t.tokens, &t.depths[1..], &t.mask(), &mut b)
        .is_err());
}

#[test]
fn tree_errors_are_clear() {
    let target_only = engine(TARGET, None);
    let e = target_only
        .generate("hi", None, &tree_params("dynamic:8,3", 8), Hooks::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--tree needs --draft"), "{e}");
    let spec = engine(TARGET, Some("qwen2-tiny-mha-untied"));
    // A tree deeper than what is left to generate is cut to fit.
    let out = spec
        .generate("hi", None, &tree_params("static:1x1x1x1x1x1x1x1", 3), Hooks::default())
        .unwrap();
    assert!(out.tokens.len() <= 3);
    let mut bad = TokenTree::root(1, Proposal::Fixed);
    bad.push(0, 2);
    bad.parents[1] = 1;
    assert!(bad.validate().is_err());
}

/// [`TreeRows`] kept in host memory, ranked and drawn with the kernels' twins
/// (`reference::top_k_probs`, `reference::sample_without_replacement`): the device path of
/// tree drafting (row numbering, a depth's block of rows, one draw call per depth, the
/// RNG advanced by the uniforms used) run without a device.
struct HostRows {
    rows: Vec<f32>,
    n: usize,
}

impl TreeRows for HostRows {
    fn drafts_here(&self) -> bool {
        true
    }

    fn start_tree(&mut self) {
        self.rows.clear();
    }

    fn score_tokens(
        &mut self,
        drafter: &Drafter,
        tokens: &[u32],
        cache: &mut Cache,
        params: &SamplingParams,
    ) -> massv::Result<usize> {
        let row = self.rows.len() / self.n;
        self.rows.extend(drafter.run_tokens_probs(tokens, cache, params)?);
        Ok(row)
    }

    fn score_tree(
        &mut self,
        drafter: &Drafter,
        tokens: &[u32],
        position: i32,
        cache: &mut Cache,
        mask: TreeMask,
        params: &SamplingParams,
    ) -> massv::Result<usize> {
        let row0 = self.rows.len() / self.n;
        self.rows
            .extend(drafter.run_tree_probs(tokens, position, cache, mask, params)?);
        Ok(row0)
    }

    fn top(&mut self, row0: usize, m: usize, k: usize) -> massv::Result<Vec<Vec<(u32, f32)>>> {
        let rows = &self.rows[row0 * self.n..(row0 + m) * self.n];
        Ok(rows
            .chunks_exact(self.n)
            .map(|r| reference::top_k_probs(r, k))
            .collect())
    }

    fn draw(&mut self, row0: usize, counts: &[usize], rng: &mut Rng) -> massv::Result<Vec<Vec<(u32, f32)>>> {
        let total: usize = counts.iter().sum();
        let uniforms = rng.peek_uniforms(total);
        let (drawn, used) = reference::sample_without_replacement(&self.rows, self.n, row0, counts, &uniforms);
        rng.skip_uniforms(used);
        Ok(drawn)
    }
}

/// T > 0 trees drafted through [`TreeRows`] (the device's way, here with host rows) are
/// the trees the host path drafts from the same state and RNG: the same tokens and shape,
/// every row a node names ([`QRow::Device`]) holding the distribution the host tree keeps
/// for that node, the same RNG state after; static and dynamic shapes, text and MASSV
/// drafters, and a top-k that leaves nodes fewer tokens than children asked of them. The
/// drafters' vocabularies have at most 448 entries, so the twin's blocked sums may differ
/// from the host's sequential ones in the last bit: a draw can only differ when a uniform
/// lands within that rounding of a boundary (not on these seeds).
#[test]
fn trees_drafted_through_tree_rows_are_the_host_paths() {
    let params = [
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 2,
            top_p: 1.0,
        },
    ];
    let img = ImageInput::from_path(&fixture("images/nonsquare_150x100.png")).unwrap();
    let (mut trees, mut device_rows) = (0, 0);
    for (target, drafter_dir, image) in [
        (VL_TARGET, "drafter-tiny-massv", true),
        (TARGET, "qwen2-tiny-mha-untied", false),
    ] {
        let e = engine(target, Some(drafter_dir));
        let drafter = e.drafter.as_ref().unwrap();
        let images = match image {
            true => vec![preprocess(&img, &PreprocessorConfig::from_dir(&fixture(target)).unwrap()).unwrap()],
            false => Vec::new(),
        };
        let vision = e.target.encode_images(&images).unwrap();
        let vt = VisionTokens::of(&e.target, &e.tokenizer);
        let ids = e
            .tokenizer
            .encode(&e.tokenizer.user_prompt("Describe the image.", image).unwrap())
            .unwrap();
        let (logits, session) = e.target.prefill(&ids, &images, &vision, 96, Logits::Last).unwrap();
        let first = massv::generate::argmax(&logits) as u32;
        let embeds = drafter
            .prompt_embeddings(drafter.default_mode(), &session.prompt, &ids, &vision, &vt)
            .unwrap();
        let state = DraftState::prefill(drafter, embeds, first, 96).unwrap();
        for sp in &params {
            for shape in ["static:3x2x1x1", "dynamic:12,4,3", "dynamic:8,3"] {
                let spec: TreeSpec = shape.parse().unwrap();
                let (mut hs, mut hstate, mut hrng) =
                    (session.try_clone().unwrap(), state.try_clone().unwrap(), Rng::new(5));
                let (mut dstate, mut drng) = (state.try_clone().unwrap(), Rng::new(5));
                let mut rows = HostRows {
                    rows: Vec::new(),
                    n: drafter.lm.cfg.vocab_size,
                };
                for pass in 0..4 {
                    let what = format!("{target} {drafter_dir} {sp:?} {shape} pass {pass}");
                    let host = hstate.draft_tree(drafter, &spec, 4, sp, &mut hrng, None).unwrap();
                    let via = dstate
                        .draft_tree(drafter, &spec, 4, sp, &mut drng, Some(&mut rows))
                        .unwrap();
                    assert_eq!((&via.tokens, &via.parents), (&host.tokens, &host.parents), "{what}");
                    assert_eq!(drng.state(), hrng.state(), "{what}: RNG after drafting");
                    for (node, (h, d)) in host.q.iter().zip(&via.q).enumerate() {
                        match (h, d) {
                            (None, None) => {}
                            (Some(QRow::Host(q)), Some(QRow::Device(r))) => {
                                let row = &rows.rows[r * rows.n..(r + 1) * rows.n];
                                assert_eq!(row, &q[..], "{what}: node {node}'s row {r}");
                                device_rows += 1;
                            }
                            _ => panic!("{what}: node {node}: host {h:?}, via rows {d:?}"),
                        }
                    }
                    // Verify the host tree against the target and keep its path in the
                    // target's cache and both drafter states.
                    let base = hs.cache.len();
                    let tl = e
                        .target
                        .decode_tree(&host.tokens, &host.depths, &host.mask(), &mut hs)
                        .unwrap();
                    let v = tl.len() / host.len();
                    let ps: Vec<Vec<f32>> = tl
                        .chunks_exact(v)
                        .map(|r| massv::sampling::probabilities(r, sp))
                        .collect();
                    let verdict = verify_tree_sampled(&host, &ps, &mut hrng, residual).unwrap();
                    drng.skip_uniforms(massv::reference::tree_uniforms_consumed(&host.parents, &verdict));
                    let keep: Vec<usize> = verdict.path.iter().map(|&n| base + n).collect();
                    hs.cache.compact(base + 1, &keep).unwrap();
                    hstate.commit_tree(&host, &verdict).unwrap();
                    dstate.commit_tree(&via, &verdict).unwrap();
                    trees += 1;
                }
            }
        }
    }
    println!("{trees} trees, {device_rows} rows named by index, equal to the host path's");
    assert!(device_rows >= trees, "every tree names rows");
}
