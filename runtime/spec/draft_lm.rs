//! The drafter's language model where it runs: on the CPU, or on the CUDA device of a
//! target whose LM runs there, when the kernels serve the drafter's shapes.

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::backend::cuda::CudaDevice;
use crate::backend::Device;
use crate::config::{self, TextConfig};
use crate::error::{Error, Result};
use crate::model::cuda_qwen2::{self, ChainPick, CudaQwen2, Input};
use crate::model::qwen2::{expected_tensors, Logits, Names, Positions, Qwen2, TreeMask};
use crate::model::{Cache, Lm};
use crate::sampling::SamplingParams;
use crate::weights::Weights;

/// The drafter's [`Lm`] with its config as a field and, on a CUDA device, its embedding
/// table on the host too (drafter prompts are assembled there).
pub struct DraftLm {
    /// The LM's config (the same as `lm().cfg()`).
    pub cfg: TextConfig,
    lm: Lm,
    /// A device LM's embedding table ([V, D] bf16, the values uploaded), kept on the host
    /// because drafter prompts are assembled there (token rows with the projector's image
    /// rows spliced in): a memcpy per row instead of a device round trip. V·D·2 bytes
    /// (272 MB for Qwen2.5-0.5B). None on the CPU, whose model holds its f32 table.
    host_embed: Option<Vec<bf16>>,
}

impl DraftLm {
    /// Loads a Qwen2 causal-LM directory on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        let m = Qwen2::load(dir)?;
        Ok(DraftLm {
            cfg: m.cfg.clone(),
            lm: Lm::Cpu(m),
            host_embed: None,
        })
    }

    /// Loads `dir` beside the target's LM: on the target's CUDA device (sharing its
    /// context, stream and loaded kernels) when the target runs there and the kernels serve
    /// the drafter's shapes ([`cuda_qwen2::check_served`]), else on the CPU. A drafter the
    /// kernels do not serve runs on the CPU even under an explicit `--device cuda`:
    /// `--device` places the target, and the drafter follows it where it can.
    pub fn load_beside(dir: &Path, target: &Lm) -> Result<Self> {
        let Lm::Cuda(t) = target else {
            return Self::load(dir);
        };
        let cfg = config::load_qwen2(&dir.join("config.json"))?;
        if cuda_qwen2::check_served(&cfg).is_err() {
            return Self::load(dir);
        }
        Self::load_cuda(dir, cfg, t.device().clone())
    }

    /// Loads `dir` (its config `cfg`) on `dev`, keeping the embedding table on the host too.
    fn load_cuda(dir: &Path, cfg: TextConfig, dev: Arc<CudaDevice>) -> Result<Self> {
        let w = Weights::open(dir)?;
        w.check_inventory(&expected_tensors(&cfg, Names::QWEN2))?;
        let name = format!("{}embed_tokens.weight", Names::QWEN2.prefix);
        let host_embed = cuda_qwen2::host_bf16(&w, &name, &[cfg.vocab_size, cfg.hidden_size])?;
        let lm = CudaQwen2::from_weights(dev, cfg.clone(), &w, Names::QWEN2)?;
        Ok(DraftLm {
            cfg,
            lm: Lm::Cuda(lm),
            host_embed: Some(host_embed),
        })
    }

    /// The LM, for [`Lm::forward`] and [`Lm::new_cache`] on its device.
    pub fn lm(&self) -> &Lm {
        &self.lm
    }

    pub fn device(&self) -> Device {
        self.lm.device()
    }

    /// The CPU model, for host-side work on its weights; an error for a drafter on a CUDA
    /// device.
    pub fn cpu(&self) -> Result<&Qwen2> {
        match &self.lm {
            Lm::Cpu(m) => Ok(m),
            Lm::Cuda(_) => Err(Error::InvalidArgument(
                "the drafter runs on the CUDA device, and this needs its CPU model".into(),
            )),
        }
    }

    /// Embedding rows of `tokens` on the host, [n, D]. Ids the table lacks (padding rows of
    /// a larger target vocabulary) get a zero row: the drafter only needs context, and
    /// verification stays exact whatever it proposes.
    pub fn embed_lossy(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.cfg.hidden_size;
        let mut out = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let t = t as usize;
            match (&self.lm, &self.host_embed) {
                (Lm::Cpu(m), _) => match m.embed(&[t as u32]) {
                    Ok(row) => out.extend(row),
                    Err(_) => out.extend(std::iter::repeat_n(0.0, d)),
                },
                (Lm::Cuda(_), Some(table)) if t < self.cfg.vocab_size => {
                    out.extend(table[t * d..(t + 1) * d].iter().map(|x| x.to_f32()))
                }
                (Lm::Cuda(_), _) => out.extend(std::iter::repeat_n(0.0, d)),
            }
        }
        out
    }

    /// `tokens` at `positions` after `cache` ([`Lm::forward`]): the LM's own lookup when
    /// every id is in its table (nothing vocabulary-wide crosses to a device), else the rows
    /// of [`DraftLm::embed_lossy`]. Either way the same rows: a device LM's bf16 table
    /// holds exactly the values its host copy gives.
    pub fn forward_tokens(
        &self,
        tokens: &[u32],
        positions: Positions,
        cache: &mut Cache,
        logits: Logits,
        mask: Option<TreeMask>,
    ) -> Result<Vec<f32>> {
        self.with_input(tokens, |input| self.lm.forward(input, positions, cache, logits, mask))
    }

    /// [`DraftLm::forward_tokens`] handing back only each row's argmax ([`Lm::forward_argmax`]:
    /// greedy drafting on a device copies ids, not vocabulary rows).
    pub fn forward_tokens_argmax(
        &self,
        tokens: &[u32],
        positions: Positions,
        cache: &mut Cache,
        logits: Logits,
    ) -> Result<Vec<u32>> {
        self.with_input(tokens, |input| {
            self.lm.forward_argmax(input, positions, cache, logits, None)
        })
    }

    /// [`DraftLm::forward_tokens`] handing back each row's distribution under `params`
    /// instead of its logits ([`Lm::forward_host_probs`]: on a device computed there).
    pub fn forward_tokens_host_probs(
        &self,
        tokens: &[u32],
        positions: Positions,
        cache: &mut Cache,
        logits: Logits,
        mask: Option<TreeMask>,
        params: &SamplingParams,
    ) -> Result<Vec<f32>> {
        self.with_input(tokens, |input| {
            self.lm
                .forward_host_probs(input, positions, cache, logits, mask, params)
        })
    }

    /// [`DraftLm::forward_tokens`] handing back each row's `k` most likely tokens with
    /// their probabilities ([`Lm::forward_top_k`]: T = 0 tree drafting on a device copies
    /// k pairs a row, not vocabulary rows).
    pub fn forward_tokens_top_k(
        &self,
        tokens: &[u32],
        positions: Positions,
        cache: &mut Cache,
        logits: Logits,
        mask: Option<TreeMask>,
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>> {
        self.with_input(tokens, |input| {
            self.lm.forward_top_k(input, positions, cache, logits, mask, k)
        })
    }

    /// [`DraftLm::forward_tokens`] leaving each row's distribution under `params` in
    /// device rows `out[row0..]` ([`Lm::forward_probs`]; CUDA only).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_tokens_probs(
        &self,
        tokens: &[u32],
        positions: Positions,
        cache: &mut Cache,
        logits: Logits,
        mask: Option<TreeMask>,
        params: &SamplingParams,
        out: &mut CudaSlice<f32>,
        row0: usize,
    ) -> Result<()> {
        self.with_input(tokens, |input| {
            self.lm
                .forward_probs(input, positions, cache, logits, mask, params, out, row0)
        })
    }

    /// A chain of `gamma` drafts after `feed` picked on the device, one copy back
    /// ([`CudaQwen2::draft_chain`]); None for a drafter on the CPU.
    pub fn draft_chain(
        &self,
        feed: &[u32],
        cache: &mut Cache,
        gamma: usize,
        pick: ChainPick,
    ) -> Result<Option<Vec<u32>>> {
        let (Lm::Cuda(m), Cache::Cuda(c)) = (&self.lm, cache) else {
            return Ok(None);
        };
        self.with_input(feed, |input| m.draft_chain(input, c, gamma, pick))
            .map(Some)
    }

    /// Calls `f` with `tokens` as ids when the table has them all, else as host rows.
    fn with_input<T>(&self, tokens: &[u32], f: impl FnOnce(Input) -> Result<T>) -> Result<T> {
        if tokens.iter().all(|&t| (t as usize) < self.cfg.vocab_size) {
            f(Input::Tokens(tokens))
        } else {
            let rows = self.embed_lossy(tokens);
            f(Input::Embeddings(&rows))
        }
    }
}
