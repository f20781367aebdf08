//! The drafter: a small Qwen2 LM, made multimodal by a MASSV projector or used on text
//! alone, and chain drafting with it. Its LM runs on the CPU or beside a CUDA target on
//! the same device ([`DraftLm`]); its cache is a [`Cache`] of that kind.

use std::path::{Path, PathBuf};

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::model::cuda_qwen2::{ChainPick, Input};
use crate::model::projector::Projector;
use crate::model::qwen2::{Logits, Positions, TreeMask};
use crate::model::qwen2_5_vl::VisionOutput;
use crate::model::{Cache, Lm, Target};
use crate::sampling::{Rng, SamplingParams};
use crate::tokenizer::Tokenizer;

pub use super::draft_lm::DraftLm;

/// What the drafter sees of the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DraftMode {
    /// The target's token sequence, projector embeddings at the image placeholders.
    Massv,
    /// The chat prompt with the `<|vision_start|>…<|vision_end|>` segment removed.
    Text,
}

pub struct Drafter {
    /// On the CPU, or on the target's CUDA device ([`Drafter::load_beside`]).
    pub lm: DraftLm,
    pub projector: Option<Projector>,
    pub tokenizer: Tokenizer,
    pub dir: PathBuf,
}

impl Drafter {
    /// Loads `dir` on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(Drafter {
            lm: DraftLm::load(dir)?,
            projector: Projector::load(dir)?,
            tokenizer: Tokenizer::from_dir(dir)?,
            dir: dir.to_path_buf(),
        })
    }

    /// Loads `dir` beside `target`: its LM on the target's CUDA device when the target's
    /// LM runs there and the kernels serve the drafter's shapes, else on the CPU
    /// ([`DraftLm::load_beside`]); its projector on the target's CUDA device whenever the
    /// target's LM runs there (the projector kernels serve any shape), where the target's
    /// vision features are.
    pub fn load_beside(dir: &Path, target: &Target) -> Result<Self> {
        let dev = match target.lm() {
            Lm::Cuda(t) => Some(t.device()),
            Lm::Cpu(_) => None,
        };
        Ok(Drafter {
            lm: DraftLm::load_beside(dir, target.lm())?,
            projector: Projector::load_on(dir, dev)?,
            tokenizer: Tokenizer::from_dir(dir)?,
            dir: dir.to_path_buf(),
        })
    }

    /// Where the LM runs.
    pub fn device(&self) -> Device {
        self.lm.device()
    }

    /// The mode a drafter directory implies: massv with a projector, text without.
    pub fn default_mode(&self) -> DraftMode {
        if self.projector.is_some() {
            DraftMode::Massv
        } else {
            DraftMode::Text
        }
    }

    /// Checks that this drafter can serve `target` in `mode`: same tokenizer, and a
    /// projector (for massv mode) that fits the target's vision features and our LM.
    pub fn check_compatible(&self, target: &Target, target_tok: &Tokenizer, mode: DraftMode) -> Result<()> {
        let dir = self.dir.display();
        if let Some(why) = self.tokenizer.vocabulary_mismatch(target_tok) {
            return Err(Error::InvalidArgument(format!(
                "drafter {dir} does not share the target's tokenizer: {why}"
            )));
        }
        match (mode, &self.projector) {
            (DraftMode::Massv, None) => {
                return Err(Error::InvalidArgument(format!(
                    "--draft-mode massv needs a MASSV drafter, but {dir} has no massv.json (use --draft-mode text)"
                )))
            }
            (DraftMode::Text, Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "--draft-mode text needs a text-only drafter, but {dir} is a MASSV drafter (use --draft-mode massv)"
                )))
            }
            _ => {}
        }
        if let (Some(p), Target::Vl(t)) = (&self.projector, target) {
            let v = &t.cfg.vision;
            let fits = p.cfg.vision_hidden_size == v.hidden_size
                && p.cfg.spatial_merge_size == v.spatial_merge_size
                && p.cfg.draft_hidden_size == self.lm.cfg.hidden_size;
            if !fits {
                return Err(Error::InvalidArgument(format!(
                    "projector of {dir} maps {}×{m}² → {} but the target's vision features are {}×{}² and the drafter's hidden size is {}",
                    p.cfg.vision_hidden_size,
                    p.cfg.draft_hidden_size,
                    v.hidden_size,
                    v.spatial_merge_size,
                    self.lm.cfg.hidden_size,
                    m = p.cfg.spatial_merge_size,
                )));
            }
        }
        Ok(())
    }

    /// Embeddings of `tokens` on the host ([`DraftLm::embed_lossy`]: a zero row for ids
    /// the drafter's table lacks).
    pub fn embed_lossy(&self, tokens: &[u32]) -> Vec<f32> {
        self.lm.embed_lossy(tokens)
    }

    /// Input embeddings of the drafter's prompt. `target_ids`: the target's prompt with
    /// placeholders expanded; `template_ids`: the chat template's ids (one placeholder
    /// per image); `vision`: the target's vision outputs, one per image.
    pub fn prompt_embeddings(
        &self,
        mode: DraftMode,
        target_ids: &[u32],
        template_ids: &[u32],
        vision: &[VisionOutput],
        tokens: &VisionTokens,
    ) -> Result<Vec<f32>> {
        match mode {
            DraftMode::Text => Ok(self.embed_lossy(&strip_vision(template_ids, tokens))),
            DraftMode::Massv => {
                let d = self.lm.cfg.hidden_size;
                let mut hidden = self.embed_lossy(target_ids);
                let Some(p) = &self.projector else {
                    return Err(Error::InvalidArgument("massv mode without a projector".into()));
                };
                let mut rows = Vec::new();
                for v in vision {
                    rows.extend(p.forward(&v.pre_merger, &v.window_index)?);
                }
                let slots: Vec<usize> = target_ids
                    .iter()
                    .enumerate()
                    .filter(|(_, &t)| t == tokens.image_pad)
                    .map(|(i, _)| i)
                    .collect();
                if slots.len() * d != rows.len() {
                    return Err(Error::InvalidArgument(format!(
                        "{} image placeholders but the projector produced {} embeddings",
                        slots.len(),
                        rows.len() / d
                    )));
                }
                for (slot, row) in slots.iter().zip(rows.chunks_exact(d)) {
                    hidden[slot * d..(slot + 1) * d].copy_from_slice(row);
                }
                Ok(hidden)
            }
        }
    }

    /// Runs input embeddings `hidden` (a prompt) after the cache at 1-D positions = cache
    /// indices; last-row logits.
    pub(super) fn run(&self, hidden: &[f32], cache: &mut Cache) -> Result<Vec<f32>> {
        let positions = next_positions(cache, hidden.len() / self.lm.cfg.hidden_size);
        let input = Input::Embeddings(hidden);
        self.lm
            .lm()
            .forward(input, Positions::Seq(&positions), cache, Logits::Last, None)
    }

    /// Runs `tokens` after the cache at 1-D positions = cache indices; the last row's
    /// distribution under `params` (computed where the LM runs).
    pub fn run_tokens_probs(&self, tokens: &[u32], cache: &mut Cache, params: &SamplingParams) -> Result<Vec<f32>> {
        let positions = next_positions(cache, tokens.len());
        self.lm
            .forward_tokens_host_probs(tokens, Positions::Seq(&positions), cache, Logits::Last, None, params)
    }

    /// [`Drafter::run_tokens`] at T = 0: the last row's argmax only.
    pub(super) fn run_tokens_argmax(&self, tokens: &[u32], cache: &mut Cache) -> Result<u32> {
        let positions = next_positions(cache, tokens.len());
        let ids = self
            .lm
            .forward_tokens_argmax(tokens, Positions::Seq(&positions), cache, Logits::Last)?;
        ids.first()
            .copied()
            .ok_or_else(|| Error::InvalidArgument("a drafter pass with no tokens".into()))
    }

    /// [`Drafter::run_tokens`] for a T = 0 tree: the last row's `k` most likely tokens
    /// with their probabilities ([`DraftLm::forward_tokens_top_k`]).
    pub(super) fn run_tokens_top_k(&self, tokens: &[u32], cache: &mut Cache, k: usize) -> Result<Vec<(u32, f32)>> {
        let positions = next_positions(cache, tokens.len());
        let rows = self
            .lm
            .forward_tokens_top_k(tokens, Positions::Seq(&positions), cache, Logits::Last, None, k)?;
        rows.into_iter()
            .next()
            .ok_or_else(|| Error::InvalidArgument("a drafter pass with no tokens".into()))
    }

    /// Scores one depth of a tree: `tokens` at `position` each, seeing what `mask` allows;
    /// every row's distribution under `params` (computed where the LM runs).
    pub fn run_tree_probs(
        &self,
        tokens: &[u32],
        position: i32,
        cache: &mut Cache,
        mask: TreeMask,
        params: &SamplingParams,
    ) -> Result<Vec<f32>> {
        let positions = vec![position; tokens.len()];
        self.lm.forward_tokens_host_probs(
            tokens,
            Positions::Seq(&positions),
            cache,
            Logits::All,
            Some(mask),
            params,
        )
    }

    /// [`Drafter::run_tree_probs`] for a T = 0 tree: each row's `k` most likely tokens
    /// with their probabilities.
    pub(super) fn run_tree_top_k(
        &self,
        tokens: &[u32],
        position: i32,
        cache: &mut Cache,
        mask: TreeMask,
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        let positions = vec![position; tokens.len()];
        self.lm
            .forward_tokens_top_k(tokens, Positions::Seq(&positions), cache, Logits::All, Some(mask), k)
    }
}

/// Positions cache.len().. for n tokens continuing the cache.
pub(super) fn next_positions(cache: &Cache, n: usize) -> Vec<i32> {
    let start = cache.len() as i32;
    (start..start + n as i32).collect()
}

/// Token ids that delimit images in a prompt.
#[derive(Debug, Clone, Copy)]
pub struct VisionTokens {
    pub vision_start: u32,
    pub vision_end: u32,
    pub image_pad: u32,
}

impl VisionTokens {
    /// The delimiters of `target`'s prompts: from its config for Qwen2.5-VL, else looked up
    /// in the tokenizer (ids that never occur when absent).
    pub fn of(target: &Target, tok: &Tokenizer) -> Self {
        match target {
            Target::Vl(m) => VisionTokens {
                vision_start: m.cfg.vision_start_token_id,
                vision_end: m.cfg.vision_end_token_id,
                image_pad: m.cfg.image_token_id,
            },
            Target::Text(_) => {
                let id = |t: &str| tok.token_to_id(t).unwrap_or(u32::MAX);
                VisionTokens {
                    vision_start: id("<|vision_start|>"),
                    vision_end: id("<|vision_end|>"),
                    image_pad: id("<|image_pad|>"),
                }
            }
        }
    }
}

/// The prompt without its `<|vision_start|> … <|vision_end|>` segments (text mode).
pub fn strip_vision(ids: &[u32], t: &VisionTokens) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len());
    let mut inside = false;
    for &id in ids {
        if id == t.vision_start {
            inside = true;
        } else if inside && id == t.vision_end {
            inside = false;
        } else if !inside {
            out.push(id);
        }
    }
    out
}

/// The drafter's side of one request: its cache (where the drafter's LM runs), and the
/// committed tokens it has not seen yet (the target's last token, plus the last draft
/// when all were accepted).
pub struct DraftState {
    pub cache: Cache,
    pub pending: Vec<u32>,
    /// Cache length before the last `draft` call fed anything.
    pub(super) base: usize,
    /// Tokens of the last `draft` call that entered the cache: pending, then drafts.
    pub(super) fed_drafts: usize,
    pub(super) fed_pending: usize,
    /// After `draft_tree`: the cache index of each tree node the drafter scored.
    pub(super) tree_slots: Vec<Option<usize>>,
    /// Sampled trees: per child rank, (children of that rank tried, accepted).
    pub(super) rank_stats: Vec<(f64, f64)>,
}

impl DraftState {
    /// A copy of this state (the cache copied where it lives).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(DraftState {
            cache: self.cache.try_clone()?,
            pending: self.pending.clone(),
            base: self.base,
            fed_drafts: self.fed_drafts,
            fed_pending: self.fed_pending,
            tree_slots: self.tree_slots.clone(),
            rank_stats: self.rank_stats.clone(),
        })
    }

    /// Prefills the drafter's prompt; `first` is the token the target's prefill chose.
    pub fn prefill(drafter: &Drafter, prompt: Vec<f32>, first: u32, extra: usize) -> Result<Self> {
        let n = prompt.len() / drafter.lm.cfg.hidden_size;
        let capacity = n + extra;
        if capacity > drafter.lm.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                tokens: n,
                new: extra,
                capacity: drafter.lm.cfg.max_position_embeddings,
            });
        }
        let mut cache = drafter.lm.lm().new_cache(capacity)?;
        drafter.run(&prompt, &mut cache)?;
        Ok(DraftState {
            cache,
            pending: vec![first],
            base: 0,
            fed_drafts: 0,
            fed_pending: 0,
            tree_slots: Vec::new(),
            rank_stats: Vec::new(),
        })
    }

    /// Proposes `gamma` tokens: at T = 0 each the argmax (and no q rows: greedy
    /// verification compares argmaxes, so a vocabulary-wide one-hot row per draft would
    /// be built for nothing), at T > 0 each a draw from the processed distribution q
    /// returned with it.
    pub fn draft(
        &mut self,
        drafter: &Drafter,
        gamma: usize,
        params: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
        if params.is_greedy() {
            let chain = |feed: &[u32], cache: &mut Cache| drafter.lm.draft_chain(feed, cache, gamma, ChainPick::Argmax);
            if let Some(drafts) = self.draft_chain(gamma, chain)? {
                return Ok((drafts, Vec::new()));
            }
        }
        let mut qs = Vec::with_capacity(if params.is_greedy() { 0 } else { gamma });
        let drafts = self.draft_with(gamma, |feed, cache, _| {
            if params.is_greedy() {
                return drafter.run_tokens_argmax(feed, cache);
            }
            let q = drafter.run_tokens_probs(feed, cache, params)?;
            let d = rng.sample(&q) as u32;
            qs.push(q);
            Ok(d)
        })?;
        Ok((drafts, qs))
    }

    /// The chain loop of [`DraftState::draft`] with the step left to `step(feed, cache, i)`:
    /// it runs the tokens `feed` after the cache and returns draft i. Keeps the bookkeeping
    /// [`DraftState::commit`] relies on.
    pub(super) fn draft_with(
        &mut self,
        gamma: usize,
        mut step: impl FnMut(&[u32], &mut Cache, usize) -> Result<u32>,
    ) -> Result<Vec<u32>> {
        self.base = self.cache.len();
        self.fed_pending = 0;
        self.fed_drafts = 0;
        let mut drafts = Vec::with_capacity(gamma);
        let mut feed = self.pending.clone();
        for i in 0..gamma {
            let d = step(&feed, &mut self.cache, i)?;
            if i == 0 {
                self.fed_pending = feed.len();
            } else {
                self.fed_drafts += 1;
            }
            drafts.push(d);
            feed = vec![d];
        }
        Ok(drafts)
    }

    /// The chain of [`DraftState::draft_with`] drafted in one call: `chain(feed, cache)`
    /// runs the pending tokens and the first γ − 1 drafts after the cache and returns the
    /// γ drafts, or None where it cannot (a drafter on the CPU), and then nothing ran.
    /// Keeps the same bookkeeping.
    pub(super) fn draft_chain(
        &mut self,
        gamma: usize,
        chain: impl FnOnce(&[u32], &mut Cache) -> Result<Option<Vec<u32>>>,
    ) -> Result<Option<Vec<u32>>> {
        if gamma == 0 {
            return Ok(None);
        }
        let base = self.cache.len();
        let Some(drafts) = chain(&self.pending, &mut self.cache)? else {
            return Ok(None);
        };
        self.base = base;
        self.fed_pending = self.pending.len();
        self.fed_drafts = gamma - 1;
        Ok(Some(drafts))
    }

    /// After verification: keeps the accepted drafts, forgets the rest, and queues the
    /// committed tokens the cache lacks.
    pub fn commit(&mut self, drafts: &[u32], accepted: usize, next: u32) -> Result<()> {
        if self.fed_pending == 0 {
            // Nothing was drafted (γ = 0): the pending tokens are still pending.
            self.pending.extend_from_slice(&drafts[..accepted]);
            self.pending.push(next);
            return Ok(());
        }
        let kept = accepted.min(self.fed_drafts);
        self.cache.rollback_to(self.base + self.fed_pending + kept)?;
        self.pending = drafts[kept..accepted].to_vec();
        self.pending.push(next);
        Ok(())
    }
}
