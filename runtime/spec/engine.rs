//! The speculative decoding loop: the drafter proposes γ tokens, the target scores the
//! γ + 1 positions in one pass, the acceptance rule picks what is emitted, and both
//! caches keep the accepted prefix. Without a drafter it is plain target decoding, the
//! baseline every speedup is measured against.
//!
//! The target's LM runs on the CPU or on a CUDA device ([`Engine::load_for`]); the
//! drafter's LM runs beside it, on the same device when the kernels serve its shapes and
//! on the CPU otherwise ([`Drafter::load_beside`]). At T = 0 both models hand back only
//! each row's argmax (taken on the device where the LM runs), and a drafter growing a
//! token tree only each node's few best tokens with their probabilities (the `top_k`
//! kernel), so a step copies ids, not vocabulary rows. At T > 0 a chain whose two LMs
//! both run on the device is drawn and verified there ([`DeviceSampling`]: ids and the
//! verdict cross, q and p stay), and so is a token tree ([`DeviceTreeSampling`]: the
//! drafter's rows are ranked and drawn from there, the target's verified there); a chain
//! or tree whose target alone runs on the device is verified there, the drafter's q rows
//! going up from the host; plain decoding on the device draws from the target's p row there (only
//! the drawn id crosses); with the target on the CPU the rejection sampling runs on the
//! host on f32 logit rows.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{Device, DeviceRequest};
use crate::error::{Error, Result};
use crate::generate::{argmax, stop_tokens};
use crate::image::{preprocess, ImageInput, Preprocessed, PreprocessorConfig};
use crate::metrics::{Counters, Metrics, Timings, Trace};
use crate::model::qwen2::Logits;
use crate::model::{one_line, Target};
use crate::sampling::{probabilities, Rng, SamplingParams};
use crate::spec::device_sampling::{DeviceSampling, DeviceTreeSampling};
use crate::spec::draft::{DraftMode, DraftState, Drafter, VisionTokens};
use crate::spec::tree::{verify_tree_greedy, verify_tree_sampled, TokenTree, TreeSpec, TreeVerdict};
use crate::spec::verify::{residual, verify_greedy, verify_sampled, Verdict};
use crate::spec::TreeRows;
use crate::tokenizer::{StreamDecoder, Tokenizer};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Drafted tokens per verification pass (ignored without a drafter or with a tree).
    pub gamma: usize,
    /// Draft token trees of this shape instead of chains (needs a drafter).
    pub tree: Option<TreeSpec>,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// None: massv for a MASSV drafter directory, text for a text-only one.
    pub draft_mode: Option<DraftMode>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            gamma: 5,
            tree: None,
            sampling: SamplingParams::default(),
            seed: 0,
            max_new_tokens: 128,
            draft_mode: None,
        }
    }
}

pub struct Output {
    /// The answer, without the stop token.
    pub text: String,
    /// Generated ids in order (a final stop token included).
    pub tokens: Vec<u32>,
    pub metrics: Metrics,
}

/// Receives each generated token with its newly completed text; returns false to stop.
pub type TokenCallback<'a> = &'a mut dyn FnMut(u32, &str) -> bool;

/// Optional observers of one generation.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Receives the stage spans.
    pub trace: Option<&'a mut Trace>,
    /// Called for every generated token with its newly completed text; returning false
    /// stops generation after that token.
    pub on_token: Option<TokenCallback<'a>>,
}

pub struct Engine {
    pub target: Target,
    pub target_dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub drafter: Option<Drafter>,
    pub stop: Vec<u32>,
    preprocessor: Option<PreprocessorConfig>,
}

impl Engine {
    /// The target (and drafter) on the CPU.
    pub fn load(target_dir: &Path, drafter_dir: Option<&Path>) -> Result<Self> {
        Self::load_on(target_dir, drafter_dir, Device::Cpu)
    }

    /// The target's LM on `device` (a vision tower with it where the kernels serve it, else
    /// on the CPU), the drafter's beside it
    /// ([`Drafter::load_beside`]); an error where that device cannot serve the target, or
    /// fails to load a drafter it serves.
    pub fn load_on(target_dir: &Path, drafter_dir: Option<&Path>, device: Device) -> Result<Self> {
        Self::load_with(target_dir, drafter_dir, false, || Target::load_on(target_dir, device))
    }

    /// The target's LM on the device `req` means for it: [`Target::choose_device`] and
    /// [`Target::load_resolved`] (`auto` is CUDA when the GPU serves the target, else the
    /// CPU, never an error).
    pub fn load_for(target_dir: &Path, drafter_dir: Option<&Path>, req: DeviceRequest) -> Result<Self> {
        let device = Target::choose_device(target_dir, req)?;
        Self::load_resolved(target_dir, drafter_dir, req, device)
    }

    /// [`Engine::load_on`] `device`, what `req` resolved to, with `auto`'s fallback to the
    /// CPU where the target fails to load on the GPU ([`Target::load_resolved`]) or the
    /// drafter does (each with a one-line note on stderr).
    pub fn load_resolved(
        target_dir: &Path,
        drafter_dir: Option<&Path>,
        req: DeviceRequest,
        device: Device,
    ) -> Result<Self> {
        Self::load_with(target_dir, drafter_dir, req == DeviceRequest::Auto, || {
            Target::load_resolved(target_dir, req, device)
        })
    }

    /// `auto`: the drafter may fall back to the CPU (`load_drafter`).
    fn load_with(
        target_dir: &Path,
        drafter_dir: Option<&Path>,
        auto: bool,
        load_target: impl FnOnce() -> Result<Target>,
    ) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(target_dir)?;
        let target = load_target()?;
        let stop = stop_tokens(target_dir, &target.text_config().eos_token_ids, &tokenizer)?;
        let preprocessor = match &target {
            Target::Vl(_) => Some(PreprocessorConfig::from_dir(target_dir)?),
            Target::Text(_) => None,
        };
        let drafter = drafter_dir.map(|d| load_drafter(d, &target, auto)).transpose()?;
        if let Some(d) = &drafter {
            d.check_compatible(&target, &tokenizer, d.default_mode())?;
        }
        Ok(Engine {
            target,
            target_dir: target_dir.to_path_buf(),
            tokenizer,
            drafter,
            stop,
            preprocessor,
        })
    }

    /// Chat-templates `prompt` (one user turn: the image, then the text), preprocesses
    /// the image and generates.
    pub fn generate(
        &self,
        prompt: &str,
        image: Option<&ImageInput>,
        params: &GenerateParams,
        hooks: Hooks,
    ) -> Result<Output> {
        let images = match (image, &self.preprocessor) {
            (None, _) => Vec::new(),
            (Some(img), Some(cfg)) => vec![preprocess(img, cfg)?],
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "an image was given but the target is a text-only model".into(),
                ))
            }
        };
        let ids = self
            .tokenizer
            .encode(&self.tokenizer.user_prompt(prompt, image.is_some())?)?;
        self.generate_ids(&ids, &images, params, hooks)
    }

    /// The ids that delimit images in this target's prompts.
    pub fn vision_tokens(&self) -> VisionTokens {
        VisionTokens::of(&self.target, &self.tokenizer)
    }

    fn check(&self, params: &GenerateParams) -> Result<Option<(&Drafter, DraftMode)>> {
        params.sampling.validate()?;
        if params.max_new_tokens == 0 {
            return Err(Error::InvalidArgument("max-new-tokens must be at least 1".into()));
        }
        let Some(d) = &self.drafter else {
            if params.draft_mode.is_some() {
                return Err(Error::InvalidArgument("--draft-mode needs --draft".into()));
            }
            if params.tree.is_some() {
                return Err(Error::InvalidArgument("--tree needs --draft".into()));
            }
            return Ok(None);
        };
        if params.gamma == 0 && params.tree.is_none() {
            return Err(Error::InvalidArgument("gamma must be at least 1 with a drafter".into()));
        }
        let mode = params.draft_mode.unwrap_or(d.default_mode());
        d.check_compatible(&self.target, &self.tokenizer, mode)?;
        Ok(Some((d, mode)))
    }

    /// Generates from template ids (one `<|image_pad|>` per image) and preprocessed images.
    pub fn generate_ids(
        &self,
        template_ids: &[u32],
        images: &[Preprocessed],
        params: &GenerateParams,
        hooks: Hooks,
    ) -> Result<Output> {
        let drafter = self.check(params)?;
        let mut own_trace = Trace::default();
        let trace = hooks.trace.unwrap_or(&mut own_trace);
        let mut on_token = hooks.on_token;
        let mut stream = StreamDecoder::default();
        // Streams one token (the last one releases any held-back bytes); false when the
        // caller asked to stop.
        let mut deliver = |tok: u32, last: bool| -> Result<bool> {
            let Some(cb) = on_token.as_mut() else { return Ok(true) };
            let text_id = (!self.stop.contains(&tok)).then_some(tok);
            let piece = match (last, text_id) {
                (false, Some(id)) => stream.push(&self.tokenizer, id)?,
                _ => stream.finish(&self.tokenizer, text_id)?,
            };
            Ok(cb(tok, &piece))
        };
        let is_last = |tok: u32, len: usize| self.stop.contains(&tok) || len >= params.max_new_tokens;
        let sp = &params.sampling;
        let mut rng = Rng::new(params.seed);
        let mut t = Timings::default();
        let t_total = Instant::now();
        let tree = params.tree.as_ref().filter(|_| drafter.is_some());
        let gamma = match (drafter, tree) {
            (None, _) => 0,
            (Some(_), None) => params.gamma,
            (Some(_), Some(t)) => t.depth(),
        };
        // The caches must hold the output plus one verify block (or drafted tree) beyond it.
        let block = tree.map_or(gamma, |t| t.max_nodes().max(t.max_fed()));
        let extra = params.max_new_tokens + block + 1;

        let t0 = Instant::now();
        let vision = self.target.encode_images(images)?;
        t.vision = trace.span("vision", 0, t0);
        let t0 = Instant::now();
        let (logits, mut session) = self
            .target
            .prefill(template_ids, images, &vision, extra, Logits::Last)?;
        t.prefill_target = trace.span("prefill_target", 0, t0);
        let first = pick(&logits, sp, &mut rng);
        let mut out = vec![first];
        let stopped_by_caller = !deliver(first, is_last(first, 1))?;

        let mut draft_state = match drafter {
            Some((d, mode)) if !stopped_by_caller && !self.stop.contains(&first) && params.max_new_tokens > 1 => {
                let t0 = Instant::now();
                let prompt =
                    d.prompt_embeddings(mode, &session.prompt, template_ids, &vision, &self.vision_tokens())?;
                let state = DraftState::prefill(d, prompt, first, extra)?;
                t.prefill_draft = trace.span("prefill_draft", 0, t0);
                Some((d, state))
            }
            _ => None,
        };
        // T > 0 chains and trees with the target on the device verify there (its p rows
        // never cross; a drafter there keeps its q rows there too), and plain decoding
        // with the target there draws from its p row there.
        let (mut on_device, mut tree_on_device) = match (&draft_state, tree) {
            _ if sp.is_greedy() => (None, None),
            (None, _) => (DeviceSampling::new(&self.target, None, 0)?, None),
            (Some((d, _)), None) => (DeviceSampling::new(&self.target, Some(d), gamma)?, None),
            // The chain buffers serve the last pass, when no token is left to draft.
            (Some((d, _)), Some(spec)) => (
                DeviceSampling::new(&self.target, None, 0)?,
                DeviceTreeSampling::new(&self.target, d, spec.max_nodes())?,
            ),
        };

        let mut counters = Counters::default();
        let t_loop = Instant::now();
        let mut done = stopped_by_caller || self.stop.contains(&first) || out.len() >= params.max_new_tokens;
        let mut step = 0;
        while !done {
            step += 1;
            // Shorten the chain near the end: a pass emits at most g + 1 tokens.
            let g = gamma.min(params.max_new_tokens - out.len() - 1);
            let last = *out.last().unwrap_or(&first);
            // Each arm drafts, verifies, keeps the accepted tokens in both caches and returns
            // them with the depth drafted and when acceptance began.
            let (new, drafted, t_accept) = match (&mut draft_state, tree) {
                (Some((d, state)), Some(spec)) if g > 0 => {
                    let t0 = Instant::now();
                    let rows = tree_on_device.as_mut().map(|r| r as &mut dyn TreeRows);
                    let tr = state.draft_tree(d, spec, g, sp, &mut rng, rows)?;
                    t.draft += trace.span("draft", step, t0);
                    let t0 = Instant::now();
                    let base = session.cache.len();
                    let scores = if sp.is_greedy() {
                        let (tokens, depths, mask) = (&tr.tokens, &tr.depths, &tr.mask());
                        Scores::Argmax(self.target.decode_tree_argmax(tokens, depths, mask, &mut session)?)
                    } else if let Some(dev) = &mut tree_on_device {
                        Scores::TreeVerdict(dev.verify(&self.target, &mut session, &tr, sp, &mut rng)?)
                    } else {
                        Scores::Logits(
                            self.target
                                .decode_tree(&tr.tokens, &tr.depths, &tr.mask(), &mut session)?,
                        )
                    };
                    t.verify += trace.span("verify", step, t0);
                    let t0 = Instant::now();
                    let verdict = verify_tree(&tr, scores, sp, &mut rng)?;
                    let keep: Vec<usize> = verdict.path.iter().map(|&n| base + n).collect();
                    session.cache.compact(base + 1, &keep)?;
                    state.commit_tree(&tr, &verdict)?;
                    counters.record_tree(tr.len() - 1);
                    (verdict.emitted(&tr), tr.depth(), t0)
                }
                _ => {
                    let t0 = Instant::now();
                    let (drafts, qs) = match (&mut draft_state, &mut on_device) {
                        (Some((d, state)), Some(dev)) if g > 0 => (dev.draft(d, state, g, sp, &mut rng)?, Vec::new()),
                        (Some((d, state)), None) if g > 0 => state.draft(d, g, sp, &mut rng)?,
                        _ => (Vec::new(), Vec::new()),
                    };
                    t.draft += trace.span("draft", step, t0);

                    let t0 = Instant::now();
                    let base = session.cache.len();
                    let block: Vec<u32> = std::iter::once(last).chain(drafts.iter().copied()).collect();
                    let scores = if sp.is_greedy() {
                        Scores::Argmax(self.target.decode_argmax(&block, &mut session)?)
                    } else if let Some(dev) = &mut on_device {
                        Scores::Verdict(dev.verify(&self.target, &mut session, &block, &drafts, sp, &mut rng)?)
                    } else {
                        Scores::Logits(self.target.decode(&block, &mut session, Logits::All)?)
                    };
                    t.verify += trace.span("verify", step, t0);

                    let t0 = Instant::now();
                    let verdict = match scores {
                        Scores::Argmax(argmaxes) => verify_greedy(&drafts, &argmaxes),
                        Scores::Verdict(v) => v,
                        Scores::TreeVerdict(_) => {
                            return Err(Error::InvalidArgument(
                                "a tree's device verdict was given for a chain".into(),
                            ))
                        }
                        Scores::Logits(logits) => {
                            let v = logits.len() / block.len();
                            let ps: Vec<Vec<f32>> = logits.chunks_exact(v).map(|r| probabilities(r, sp)).collect();
                            if drafts.is_empty() {
                                Verdict {
                                    accepted: 0,
                                    next: rng.sample(&ps[0]) as u32,
                                }
                            } else {
                                verify_sampled(&drafts, &qs, &ps, &mut rng, residual)
                            }
                        }
                    };
                    session.cache.rollback_to(base + 1 + verdict.accepted)?;
                    if let Some((_, state)) = &mut draft_state {
                        state.commit(&drafts, verdict.accepted, verdict.next)?;
                    }
                    let new: Vec<u32> = drafts[..verdict.accepted]
                        .iter()
                        .copied()
                        .chain([verdict.next])
                        .collect();
                    (new, drafts.len(), t0)
                }
            };
            counters.record_pass(drafted, new.len() - 1, new.len());
            for tok in new {
                out.push(tok);
                let last = is_last(tok, out.len());
                if !deliver(tok, last)? || last {
                    done = true;
                    break;
                }
            }
            t.accept += trace.span("accept", step, t_accept);
        }
        let loop_s = t_loop.elapsed().as_secs_f64();
        t.total = t_total.elapsed().as_secs_f64() * 1e3;

        let text_ids: Vec<u32> = out.iter().copied().filter(|tok| !self.stop.contains(tok)).collect();
        let text = self.tokenizer.decode(&text_ids, true)?;
        let metrics = Metrics {
            mal: counters.mal(),
            accept_rate_by_pos: counters.accept_rate_by_pos(),
            timings_ms: t,
            tokens_per_s: if loop_s > 0.0 {
                (out.len() - 1) as f64 / loop_s
            } else {
                0.0
            },
            target_passes: counters.passes,
            generated_tokens: out.len(),
            gamma,
            tree_nodes: counters.mean_tree_nodes(),
            accepted_hist: counters.accepted_hist.clone(),
        };
        Ok(Output {
            text,
            tokens: out,
            metrics,
        })
    }
}

/// What a verification pass hands back: at T = 0 only the target's argmax of each row
/// (on a device nothing vocabulary-sized is copied back); at T > 0 every row's logits, or
/// the verdict itself when the device verified.
enum Scores {
    Argmax(Vec<u32>),
    Logits(Vec<f32>),
    /// Verified on the device ([`DeviceSampling`]).
    Verdict(Verdict),
    /// A tree verified on the device ([`DeviceTreeSampling`]).
    TreeVerdict(TreeVerdict),
}

/// The accepted path of a scored tree: greedy on argmaxes, rejection sampling on logits.
fn verify_tree(tree: &TokenTree, scores: Scores, sp: &SamplingParams, rng: &mut Rng) -> Result<TreeVerdict> {
    Ok(match scores {
        Scores::Argmax(argmaxes) => verify_tree_greedy(tree, &argmaxes),
        Scores::Logits(logits) => {
            let v = logits.len() / tree.len();
            let ps: Vec<Vec<f32>> = logits.chunks_exact(v).map(|r| probabilities(r, sp)).collect();
            verify_tree_sampled(tree, &ps, rng, residual)?
        }
        Scores::TreeVerdict(v) => v,
        Scores::Verdict(_) => {
            return Err(Error::InvalidArgument(
                "a chain's device verdict was given for a token tree".into(),
            ))
        }
    })
}

/// The drafter beside `target` ([`Drafter::load_beside`]); under `auto` (`auto` true), one
/// that fails to load on the GPU (out of memory) loads on the CPU instead, with a
/// one-line note on stderr, as the target does.
fn load_drafter(dir: &Path, target: &Target, auto: bool) -> Result<Drafter> {
    match Drafter::load_beside(dir, target) {
        Err(e) if auto && target.device() == Device::Cuda => {
            let drafter = Drafter::load(dir)?;
            eprintln!("massv: the drafter uses the CPU: {}", one_line(&e));
            Ok(drafter)
        }
        r => r,
    }
}

/// The first token, from the prefill's last row: argmax at T = 0, else a draw from the
/// processed distribution.
fn pick(logits: &[f32], sp: &SamplingParams, rng: &mut Rng) -> u32 {
    if sp.is_greedy() {
        argmax(logits) as u32
    } else {
        rng.sample(&probabilities(logits, sp)) as u32
    }
}
