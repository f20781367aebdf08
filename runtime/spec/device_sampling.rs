//! Rejection sampling on the device. At T > 0, when the target's and the drafter's LMs
//! both run on CUDA, a chain step keeps the drafter's q rows and the target's p rows in
//! device buffers (the `probabilities` kernel behind the LM head), draws each draft with
//! the `sample` kernel and verifies with `verify_sampled`: per step only draft ids and the
//! verdict come back, and the uniforms go the other way ([`DeviceSampling`]). A drafter
//! on the CPU (one the GPU had no room for) drafts on the host and its γ q rows go up in
//! one copy: the target's p rows still never come back, nor are they normalised on the
//! host.
//!
//! Token trees ([`DeviceTreeSampling`], whenever the target's LM runs on CUDA): the
//! target's p rows of every node stay on the device and `verify_tree_sampled` walks the
//! tree there. When the drafter's LM runs there too, its q rows never leave either: each
//! depth's rows are written by the `probabilities` kernel behind its head, the dynamic
//! shape's budget is spread on their `top_k_probs` (a few pairs a row), and the children
//! are drawn by `sample_without_replacement` (only the drawn ids and their probabilities
//! come back); the tree then names its rows by index ([`QRow::Device`]). A drafter on the
//! CPU drafts on the host, and the rows of the nodes that have children go up in one copy
//! per pass.
//!
//! The uniforms are the request's host RNG draws in the order the host path takes them
//! (one per draft; then the accept tests and the final draw, of which the RNG keeps only
//! those the host would have consumed), so a seed gives the host path's output up to the
//! blocked-sum caveat of cuda/sampling.cu (a uniform within rounding of a boundary).

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::draft::{next_positions, DraftState, Drafter};
use super::tree::{QRow, TokenTree, TreeVerdict};
use super::tree_draft::TreeRows;
use super::verify::Verdict;
use crate::backend::cuda::{CudaDevice, MAX_TOP_K};
use crate::error::{Error, Result};
use crate::model::cuda_qwen2::ChainPick;
use crate::model::qwen2::{Logits, Positions, TreeMask};
use crate::model::{Cache, Lm, Session, Target};
use crate::reference::{top_k_probs, tree_uniforms_consumed, uniforms_consumed};
use crate::sampling::{Rng, SamplingParams};

/// Device buffers of one request's chain steps, sized for up to `gamma` drafts.
pub struct DeviceSampling {
    dev: Arc<CudaDevice>,
    gamma: usize,
    /// Drafter and target vocabularies (rows of q and p).
    nq: usize,
    np: usize,
    /// Whether the drafter's LM runs on the device: drafts and their q rows are made
    /// there; else on the host, the q rows uploaded.
    drafts_here: bool,
    /// A CPU drafter's q rows, gathered for their one upload (reused: no allocation a step).
    host_q: Vec<f32>,
    q: CudaSlice<f32>,        // [γ, nq]
    p: CudaSlice<f32>,        // [γ + 1, np]
    drafts: CudaSlice<i32>,   // [γ]
    uniforms: CudaSlice<f64>, // [γ + 1]
    out: CudaSlice<i32>,      // [2]: a drawn id, or (accepted, next)
}

impl DeviceSampling {
    /// Buffers for chains of up to `gamma` drafts when the target's LM runs on the CUDA
    /// device (the drafter's anywhere), or, without a drafter, for plain decoding's draws
    /// from the target's p row (γ = 0); None when the target's runs on the CPU (the host
    /// path then verifies).
    pub fn new(target: &Target, drafter: Option<&Drafter>, gamma: usize) -> Result<Option<Self>> {
        let Lm::Cuda(t) = target.lm() else {
            return Ok(None);
        };
        let nq = drafter.map_or(0, |d| d.lm.cfg.vocab_size);
        let dev = Arc::clone(t.device());
        let np = target.text_config().vocab_size;
        let g = gamma.max(1);
        let drafts_here = drafter.is_some_and(|d| matches!(d.lm.lm(), Lm::Cuda(_)));
        let host_q = if drafts_here {
            Vec::new()
        } else {
            Vec::with_capacity(gamma * nq)
        };
        Ok(Some(DeviceSampling {
            q: dev.alloc_zeros((g * nq).max(1))?,
            p: dev.alloc_zeros((g + 1) * np)?,
            drafts: dev.alloc_zeros(g)?,
            uniforms: dev.alloc_zeros(g + 1)?,
            out: dev.alloc_zeros(2)?,
            drafts_here,
            host_q,
            dev,
            gamma,
            nq,
            np,
        }))
    }

    /// [`DraftState::draft`] at T > 0 with q on the device: each draft drawn there from
    /// its row of q with the RNG's next uniform; from a drafter on the CPU, drawn on the
    /// host and the q rows uploaded in one copy.
    pub fn draft(
        &mut self,
        drafter: &Drafter,
        state: &mut DraftState,
        gamma: usize,
        params: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        self.check_gamma(gamma)?;
        if gamma == 0 {
            return Ok(Vec::new());
        }
        if !self.drafts_here {
            let (drafts, qs) = state.draft(drafter, gamma, params, rng)?;
            let nq = self.nq;
            if drafts.len() != gamma || qs.len() != gamma || qs.iter().any(|q| q.len() != nq) {
                return Err(Error::InvalidArgument(format!(
                    "host drafting gave {} drafts and {} q rows for γ = {gamma} over a {nq}-token vocabulary",
                    drafts.len(),
                    qs.len()
                )));
            }
            let host = &mut self.host_q;
            host.clear();
            qs.iter().for_each(|q| host.extend_from_slice(q));
            self.dev.upload_into(host, &mut self.q.slice_mut(..gamma * nq))?;
            return Ok(drafts);
        }
        let (q, uniforms) = (&mut self.q, &mut self.uniforms);
        // One uniform a draft, drawn in the host path's order and uploaded in one copy.
        let u: Vec<f64> = (0..gamma).map(|_| rng.uniform()).collect();
        self.dev.upload_into(&u, &mut uniforms.slice_mut(..gamma))?;
        let chain = |feed: &[u32], cache: &mut Cache| {
            let pick = ChainPick::Sample { params, q, uniforms };
            drafter.lm.draft_chain(feed, cache, gamma, pick)
        };
        state.draft_chain(gamma, chain)?.ok_or_else(|| {
            Error::InvalidArgument("device rejection sampling needs the drafter's LM on the device".into())
        })
    }

    /// The target scores `block` (the last committed token, then `drafts`, whose q rows
    /// [`DeviceSampling::draft`] left on the device) and rejection sampling picks the
    /// verdict there.
    pub fn verify(
        &mut self,
        target: &Target,
        session: &mut Session,
        block: &[u32],
        drafts: &[u32],
        params: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<Verdict> {
        let g = drafts.len();
        self.check_gamma(g)?;
        if block.len() != g + 1 {
            return Err(Error::InvalidArgument(format!(
                "a verify block of {} tokens for {g} drafts",
                block.len()
            )));
        }
        let (dev, nq, np) = (&self.dev, self.nq, self.np);
        target.decode_probs(block, session, params, &mut self.p)?;
        let u = rng.peek_uniforms(g + 1);
        dev.upload_into(&u, &mut self.uniforms.slice_mut(0..=g))?;
        let verdict = if g == 0 {
            let p0 = self.p.slice(0..np);
            dev.sample(&p0, &self.uniforms.slice(0..1), &mut self.out.slice_mut(0..1), 1, np)?;
            Verdict {
                accepted: 0,
                next: dev.download(&self.out.slice(0..1))?[0] as u32,
            }
        } else {
            let ids: Vec<i32> = drafts.iter().map(|&d| d as i32).collect();
            dev.upload_into(&ids, &mut self.drafts.slice_mut(0..g))?;
            dev.verify_sampled(
                &self.drafts.slice(0..g),
                &self.q.slice(0..g * nq),
                &self.p.slice(0..(g + 1) * np),
                &self.uniforms.slice(0..=g),
                &mut self.out.slice_mut(0..2),
                g,
                nq,
                np,
            )?;
            let v = dev.download(&self.out.slice(0..2))?;
            Verdict {
                accepted: v[0] as usize,
                next: v[1] as u32,
            }
        };
        rng.skip_uniforms(uniforms_consumed(verdict, g));
        Ok(verdict)
    }

    fn check_gamma(&self, g: usize) -> Result<()> {
        if g > self.gamma {
            return Err(Error::InvalidArgument(format!(
                "{g} drafts for device buffers of {}",
                self.gamma
            )));
        }
        Ok(())
    }
}

/// Device buffers of one request's token-tree passes, sized for trees of up to `nodes`
/// nodes (the root included).
pub struct DeviceTreeSampling {
    dev: Arc<CudaDevice>,
    nodes: usize,
    /// Drafter and target vocabularies (rows of q and p).
    nq: usize,
    np: usize,
    /// Whether the drafter's LM runs on the device too: then T > 0 trees are drafted
    /// there ([`DeviceTreeSampling::score_tokens`], [`DeviceTreeSampling::draw`]).
    drafts_here: bool,
    /// A CPU drafter's q rows of a tree, gathered for their one upload (reused).
    host_q: Vec<f32>,
    /// Rows of `q` the tree being drafted holds.
    q_rows: usize,
    p: CudaSlice<f32>,         // [nodes, np]
    q: CudaSlice<f32>,         // [nodes, nq]: rows of the nodes with children
    tree_in: CudaSlice<i32>,   // [3, nodes]: tokens, parents, q rows (-1: none), [3, n] packed
    uniforms: CudaSlice<f64>,  // [nodes]
    work: CudaSlice<f32>,      // [np + nq]: the kernels' running p and q
    draw_work: CudaSlice<f32>, // [max(1, nodes / 2), nq]: the running q rows of a depth's draws
    draws: CudaSlice<i32>,     // [nodes]: draws per frontier node, where known before drawing
    out: CudaSlice<i32>,       // [nodes + 1]: (m, next, path[0..m]); a depth's draws + uniforms used
    out_q: CudaSlice<f32>,     // [nodes]: the drawn tokens' probabilities
    counts: CudaSlice<i32>,    // [nodes]: children to draw per frontier node
    top_ids: CudaSlice<i32>,   // [nodes, MAX_TOP_K]
    top_q: CudaSlice<f32>,     // [nodes, MAX_TOP_K]
}

impl DeviceTreeSampling {
    /// Buffers for trees of up to `max_drafted` drafted nodes when the target's LM runs
    /// on the CUDA device (the drafter may run anywhere); None otherwise.
    pub fn new(target: &Target, drafter: &Drafter, max_drafted: usize) -> Result<Option<Self>> {
        let Lm::Cuda(t) = target.lm() else {
            return Ok(None);
        };
        let dev = Arc::clone(t.device());
        let (nq, np) = (drafter.lm.cfg.vocab_size, target.text_config().vocab_size);
        let n = max_drafted + 1;
        let drafts_here = matches!(drafter.lm.lm(), Lm::Cuda(_));
        Ok(Some(DeviceTreeSampling {
            p: dev.alloc_zeros(n * np)?,
            q: dev.alloc_zeros(n * nq)?,
            tree_in: dev.alloc_zeros(3 * n)?,
            uniforms: dev.alloc_zeros(n)?,
            work: dev.alloc_zeros(np + nq)?,
            // Rows for a depth's nodes to draw at once, where they are drafted here.
            draw_work: dev.alloc_zeros(if drafts_here { (n / 2).max(1) } else { 1 } * nq)?,
            draws: dev.alloc_zeros(n)?,
            out: dev.alloc_zeros(n + 1)?,
            out_q: dev.alloc_zeros(n)?,
            counts: dev.alloc_zeros(n)?,
            top_ids: dev.alloc_zeros(n * MAX_TOP_K)?,
            top_q: dev.alloc_zeros(n * MAX_TOP_K)?,
            drafts_here,
            host_q: Vec::new(),
            q_rows: 0,
            dev,
            nodes: n,
            nq,
            np,
        }))
    }

    fn take_rows(&mut self, n: usize) -> Result<usize> {
        let row0 = self.q_rows;
        if row0 + n > self.nodes {
            return Err(Error::InvalidArgument(format!(
                "a tree needing {} drafter rows for device buffers of {}",
                row0 + n,
                self.nodes
            )));
        }
        self.q_rows += n;
        Ok(row0)
    }

    fn check_rows(&self, row0: usize, m: usize) -> Result<()> {
        if row0 + m > self.q_rows {
            return Err(Error::InvalidArgument(format!(
                "drafter rows {row0}..{} of the {} this tree holds",
                row0 + m,
                self.q_rows
            )));
        }
        Ok(())
    }

    /// The target scores `tree` after the session's cache (its p rows left on the device)
    /// and multi-candidate rejection sampling picks the accepted path there
    /// ([`crate::spec::tree::verify_tree_sampled`]'s rule). The drafter's rows are the
    /// device rows the tree was drafted with, or its host rows, uploaded in one copy. The
    /// RNG advances by the uniforms the host path would have drawn.
    pub fn verify(
        &mut self,
        target: &Target,
        session: &mut Session,
        tree: &TokenTree,
        params: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<TreeVerdict> {
        tree.validate()?;
        let n = tree.len();
        if n > self.nodes {
            return Err(Error::InvalidArgument(format!(
                "a tree of {n} nodes for device buffers of {}",
                self.nodes
            )));
        }
        let (dev, nq, np) = (&self.dev, self.nq, self.np);
        target.decode_tree_probs(&tree.tokens, &tree.depths, &tree.mask(), session, params, &mut self.p)?;

        let mut q_row = vec![-1i32; n];
        let rows = &mut self.host_q;
        rows.clear();
        let on_device = tree.q.iter().any(|q| matches!(q, Some(QRow::Device(_))));
        for (node, q) in tree.q.iter().enumerate() {
            match q {
                None => {}
                Some(QRow::Device(r)) if *r < self.q_rows => q_row[node] = *r as i32,
                Some(QRow::Device(r)) => {
                    return Err(Error::InvalidArgument(format!(
                        "node {node}'s drafter row {r} is not one of the {} this tree was drafted with",
                        self.q_rows
                    )))
                }
                Some(QRow::Host(_)) if on_device => {
                    return Err(Error::InvalidArgument(
                        "a tree with drafter rows both on the host and on the device".into(),
                    ))
                }
                Some(QRow::Host(q)) if q.len() != nq => {
                    return Err(Error::InvalidArgument(format!(
                        "node {node}'s drafter distribution has {} entries, the drafter's vocabulary {nq}",
                        q.len()
                    )))
                }
                Some(QRow::Host(q)) => {
                    q_row[node] = (rows.len() / nq) as i32;
                    rows.extend_from_slice(q);
                }
            }
        }
        let q_rows = if on_device {
            self.q_rows
        } else {
            // The host path's rows go up in one copy.
            dev.upload_into(rows, &mut self.q.slice_mut(..rows.len()))?;
            rows.len() / nq
        };
        let tree_in: Vec<i32> = (tree.tokens.iter().map(|&t| t as i32))
            .chain(tree.parents.iter().map(|&p| p as i32))
            .chain(q_row)
            .collect();
        dev.upload_into(&tree_in, &mut self.tree_in.slice_mut(..3 * n))?;
        let u = rng.peek_uniforms(n);
        dev.upload_into(&u, &mut self.uniforms.slice_mut(..n))?;

        dev.verify_tree_sampled(
            &self.tree_in.slice(..n),
            &self.tree_in.slice(n..2 * n),
            tree.proposal,
            &self.tree_in.slice(2 * n..3 * n),
            &self.q.slice(..q_rows * nq),
            &self.p.slice(..n * np),
            &self.uniforms.slice(..n),
            &mut self.work.as_view_mut(),
            &mut self.out.slice_mut(..n + 1),
            n,
            q_rows,
            nq,
            np,
        )?;
        let out = dev.download(&self.out.slice(..n + 1))?;
        let m = usize::try_from(out[0]).ok().filter(|&m| m < n);
        let path: Option<Vec<usize>> = m.and_then(|m| out[2..2 + m].iter().map(|&c| usize::try_from(c).ok()).collect());
        let (Some(path), Ok(next)) = (path, u32::try_from(out[1])) else {
            return Err(Error::Cuda {
                op: "verify_tree_sampled".into(),
                reason: format!("malformed verdict {:?}", &out[..2]),
            });
        };
        let verdict = TreeVerdict { path, next };
        rng.skip_uniforms(tree_uniforms_consumed(&tree.parents, &verdict));
        Ok(verdict)
    }
}

/// The device rows of [`DeviceTreeSampling`]: the drafter's LM writes them through the
/// `probabilities` kernel, `top_k_probs` ranks them and `sample_without_replacement` draws
/// from them; only ids and a few probabilities cross.
impl TreeRows for DeviceTreeSampling {
    /// Whether T > 0 trees are drafted on the device (the drafter's LM runs there).
    fn drafts_here(&self) -> bool {
        self.drafts_here
    }

    /// Forgets the rows of the previous tree.
    fn start_tree(&mut self) {
        self.q_rows = 0;
    }

    /// The drafter scores `tokens` after `cache` (causal); the last row's distribution
    /// under `params` stays in a new device row, whose index is returned.
    fn score_tokens(
        &mut self,
        drafter: &Drafter,
        tokens: &[u32],
        cache: &mut Cache,
        params: &SamplingParams,
    ) -> Result<usize> {
        let row = self.take_rows(1)?;
        let positions = next_positions(cache, tokens.len());
        drafter.lm.forward_tokens_probs(
            tokens,
            Positions::Seq(&positions),
            cache,
            Logits::Last,
            None,
            params,
            &mut self.q,
            row,
        )?;
        Ok(row)
    }

    /// The drafter scores one depth of a tree (`tokens` at `position` each, seeing what
    /// `mask` allows); each row's distribution stays in a new device row, the first of
    /// which is returned.
    fn score_tree(
        &mut self,
        drafter: &Drafter,
        tokens: &[u32],
        position: i32,
        cache: &mut Cache,
        mask: TreeMask,
        params: &SamplingParams,
    ) -> Result<usize> {
        let row0 = self.take_rows(tokens.len())?;
        let positions = vec![position; tokens.len()];
        drafter.lm.forward_tokens_probs(
            tokens,
            Positions::Seq(&positions),
            cache,
            Logits::All,
            Some(mask),
            params,
            &mut self.q,
            row0,
        )?;
        Ok(row0)
    }

    /// The `k` most likely tokens of device rows row0..row0 + m with their
    /// probabilities, best first (`reference::top_k_probs`): k pairs a row cross.
    fn top(&mut self, row0: usize, m: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        self.check_rows(row0, m)?;
        let (dev, nq) = (&self.dev, self.nq);
        let rows = self.q.slice(row0 * nq..(row0 + m) * nq);
        if k > MAX_TOP_K {
            // Wider than the kernel ranks: the rows come to the host (never for the
            // tree shapes the CLI builds, whose widths are a few).
            let host = dev.download(&rows)?;
            return Ok(host.chunks_exact(nq).map(|r| top_k_probs(r, k)).collect());
        }
        if k == 0 || m == 0 {
            return Ok(vec![Vec::new(); m]);
        }
        dev.top_k_probs(
            &rows,
            &mut self.top_ids.slice_mut(..m * k),
            &mut self.top_q.slice_mut(..m * k),
            m,
            nq,
            k,
        )?;
        let ids = dev.download(&self.top_ids.slice(..m * k))?;
        let probs = dev.download(&self.top_q.slice(..m * k))?;
        Ok(ids
            .chunks_exact(k)
            .zip(probs.chunks_exact(k))
            .map(|(i, p)| pairs(i, p))
            .collect())
    }

    /// The children of the frontier whose distributions are device rows
    /// row0..row0 + counts.len(): `counts[j]` tokens drawn without replacement from row
    /// row0 + j with the RNG's next uniforms, nodes in order
    /// (`spec::tree::draw_without_replacement`'s rule; `reference::sample_without_replacement`),
    /// each with its probability. Only the draws cross; the RNG advances by the uniforms used.
    fn draw(&mut self, row0: usize, counts: &[usize], rng: &mut Rng) -> Result<Vec<Vec<(u32, f32)>>> {
        let m = counts.len();
        self.check_rows(row0, m)?;
        let total: usize = counts.iter().sum();
        if total > self.nodes {
            return Err(Error::InvalidArgument(format!(
                "{total} children to draw for device buffers of {}",
                self.nodes
            )));
        }
        if total == 0 {
            return Ok(vec![Vec::new(); m]);
        }
        let (dev, nq) = (&self.dev, self.nq);
        let u = rng.peek_uniforms(total);
        dev.upload_into(&u, &mut self.uniforms.slice_mut(..total))?;
        let c: Vec<i32> = counts.iter().map(|&k| k as i32).collect();
        dev.upload_into(&c, &mut self.counts.slice_mut(..m))?;
        dev.sample_without_replacement(
            &self.q.slice(..self.q_rows * nq),
            &self.counts.slice(..m),
            &self.uniforms.slice(..total),
            &mut self.draws.slice_mut(..m),
            &mut self.draw_work.as_view_mut(),
            &mut self.out.slice_mut(..total + 1),
            &mut self.out_q.slice_mut(..total),
            row0,
            m,
            total,
            nq,
        )?;
        let ids = dev.download(&self.out.slice(..total + 1))?;
        let probs = dev.download(&self.out_q.slice(..total))?;
        let used = usize::try_from(ids[total])
            .ok()
            .filter(|&u| u <= total)
            .ok_or_else(|| Error::Cuda {
                op: "sample_without_replacement".into(),
                reason: format!("{} uniforms used of {total}", ids[total]),
            })?;
        rng.skip_uniforms(used);
        let mut at = 0;
        Ok(counts
            .iter()
            .map(|&k| {
                let node = pairs(&ids[at..at + k], &probs[at..at + k]);
                at += k;
                node
            })
            .collect())
    }
}

/// (token, probability) pairs of a kernel's padded output, up to its first id of -1.
fn pairs(ids: &[i32], probs: &[f32]) -> Vec<(u32, f32)> {
    ids.iter()
        .zip(probs)
        .map_while(|(&t, &q)| u32::try_from(t).ok().map(|t| (t, q)))
        .collect()
}
