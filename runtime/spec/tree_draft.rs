//! Drafting a token tree depth by depth (all nodes of a depth in one drafter pass, under
//! a tree mask over the drafter's own cache), and keeping only the accepted path of that
//! cache afterwards.

use std::cmp::Ordering;

use crate::error::{Error, Result};
use crate::model::qwen2::TreeMask;
use crate::model::Cache;
use crate::sampling::{Rng, SamplingParams};
use crate::spec::draft::{DraftState, Drafter};
use crate::spec::tree::{draw_without_replacement, top_tokens, Proposal, QRow, TokenTree, TreeSpec, TreeVerdict};

/// Where a T > 0 tree's drafter distributions stay when they do not come to the host
/// (the request's device rows: [`crate::spec::device_sampling::DeviceTreeSampling`]).
/// Rows are numbered in the order they are scored, from 0 for each tree; a depth's rows
/// are consecutive, in the order of its nodes.
pub trait TreeRows {
    /// Whether trees are drafted here (the drafter runs where the rows live).
    fn drafts_here(&self) -> bool;
    /// Forgets the rows of the previous tree.
    fn start_tree(&mut self);
    /// The drafter scores `tokens` after `cache` (causal, positions continuing the cache);
    /// the last row's distribution under `params` becomes a new row, whose index is returned.
    fn score_tokens(
        &mut self,
        drafter: &Drafter,
        tokens: &[u32],
        cache: &mut Cache,
        params: &SamplingParams,
    ) -> Result<usize>;
    /// The drafter scores one depth of a tree (`tokens` at `position` each, seeing what
    /// `mask` allows); each row's distribution becomes a new row, the first returned.
    fn score_tree(
        &mut self,
        drafter: &Drafter,
        tokens: &[u32],
        position: i32,
        cache: &mut Cache,
        mask: TreeMask,
        params: &SamplingParams,
    ) -> Result<usize>;
    /// The `k` most likely tokens of rows row0..row0 + m with their probabilities, best
    /// first (`reference::top_k_probs`).
    fn top(&mut self, row0: usize, m: usize, k: usize) -> Result<Vec<Vec<(u32, f32)>>>;
    /// Node j's `counts[j]` children drawn without replacement from row row0 + j with the
    /// RNG's next uniforms, nodes in order (`reference::sample_without_replacement`), each
    /// with its probability; the RNG advances by the uniforms used.
    fn draw(&mut self, row0: usize, counts: &[usize], rng: &mut Rng) -> Result<Vec<Vec<(u32, f32)>>>;
}

/// A shorter borrow of the optional rows (to pass them on and keep using them).
fn reborrow<'a>(dev: &'a mut Option<&mut dyn TreeRows>) -> Option<&'a mut dyn TreeRows> {
    match dev {
        Some(d) => Some(&mut **d),
        None => None,
    }
}

/// The drafter's distribution a node's children come from.
enum Dist {
    /// T > 0: the whole processed q (children are drawn from it, and verification tests
    /// them against it).
    Full(Vec<f32>),
    /// T = 0: the tree's widest fan-out of most likely tokens under the plain softmax,
    /// with their probabilities, best first: all that ranking children needs (taken where
    /// the drafter runs: on a device only these pairs cross).
    Top(Vec<(u32, f32)>),
    /// T > 0 with the drafter on the device: the processed q in this row of the request's
    /// device rows ([`TreeRows`]), where it is ranked and drawn from.
    Device(usize),
}

impl Dist {
    /// The `k` most likely tokens with non-zero probability, best first (ties: lower
    /// id), with their probabilities; None for a device row ([`TreeRows::top`]).
    fn host_top(&self, k: usize) -> Option<Vec<(u32, f32)>> {
        match self {
            Dist::Full(q) => Some(top_tokens(q, k).into_iter().map(|t| (t, q[t as usize])).collect()),
            Dist::Top(best) => Some(best.iter().take(k).copied().collect()),
            Dist::Device(_) => None,
        }
    }
}

/// A tree while it grows: per node its rank path, log path probability under the
/// drafter, drafter cache slot, and the distribution its children come from.
struct Growing {
    tree: TokenTree,
    ranks: Vec<Vec<usize>>,
    logp: Vec<f64>,
    /// Sampled trees: the measured rate at which a node's first tried child is accepted.
    continue_rate: f64,
    slots: Vec<Option<usize>>,
    dist: Vec<Option<Dist>>,
}

impl Growing {
    fn push(&mut self, parent: usize, rank: usize, token: u32, q: f32) -> usize {
        let c = self.tree.push(parent, token);
        self.ranks.push([self.ranks[parent].as_slice(), &[rank]].concat());
        self.logp.push(self.logp[parent] + (q as f64).ln());
        self.slots.push(None);
        self.dist.push(None);
        c
    }

    /// Orders nodes by path probability, best first (ties: earlier node).
    fn by_logp(&self, a: usize, b: usize) -> Ordering {
        self.logp[b]
            .partial_cmp(&self.logp[a])
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    }

    /// The device rows `row0..row0 + frontier.len()` holding the frontier's distributions,
    /// in order (how [`TreeRows::score_tree`] lays a depth out); None when they are on
    /// the host.
    fn device_rows(&self, frontier: &[usize]) -> Result<Option<usize>> {
        let rows: Vec<Option<usize>> = frontier
            .iter()
            .map(|&f| match self.dist[f] {
                Some(Dist::Device(r)) => Some(r),
                _ => None,
            })
            .collect();
        match rows.first().copied().flatten() {
            None if rows.iter().all(Option::is_none) => Ok(None),
            Some(r0) if rows.iter().enumerate().all(|(i, &r)| r == Some(r0 + i)) => Ok(Some(r0)),
            _ => Err(Error::InvalidArgument(
                "a tree frontier whose drafter rows are not one device block".into(),
            )),
        }
    }

    /// Each frontier node's `k` most likely tokens with their probabilities, best first
    /// (on the device for device rows: k pairs a row cross).
    fn tops(&self, frontier: &[usize], k: usize, dev: Option<&mut dyn TreeRows>) -> Result<Vec<Vec<(u32, f32)>>> {
        match (self.device_rows(frontier)?, dev) {
            (Some(row0), Some(dev)) => dev.top(row0, frontier.len(), k),
            (Some(_), None) => Err(Error::InvalidArgument(
                "device drafter rows without their buffers".into(),
            )),
            (None, _) => Ok(frontier
                .iter()
                .map(|&f| self.dist[f].as_ref().and_then(|d| d.host_top(k)).unwrap_or_default())
                .collect()),
        }
    }

    /// Splits `share` children over the frontier whose nodes' best tokens are `tops` (at
    /// most `width` each) by water-filling on expected worth: the node's path probability
    /// times the chance its next child is accepted, estimated as the probability of its
    /// next-ranked token, except for a first child (the branch going on), whose chance is
    /// at least the rate measured on this request's earlier passes: a flat drafter is
    /// still often right, and a branch that stops wastes the path that reached it. Depends
    /// only on the frontier and past passes, never on the children's draws.
    fn allot(&self, frontier: &[usize], tops: &[Vec<(u32, f32)>], share: usize) -> Vec<usize> {
        let ranked: Vec<Vec<f32>> = tops.iter().map(|t| t.iter().map(|&(_, q)| q).collect()).collect();
        let mut counts = vec![0usize; frontier.len()];
        for _ in 0..share {
            let worth = |i: usize| -> Option<f64> {
                let q = *ranked[i].get(counts[i])? as f64;
                let chance = if counts[i] == 0 { q.max(self.continue_rate) } else { q };
                Some(self.logp[frontier[i]] + chance.ln())
            };
            let best = (0..frontier.len())
                .filter_map(|i| worth(i).map(|w| (i, w)))
                .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(Ordering::Equal).then(b.0.cmp(&a.0)));
            match best {
                Some((i, _)) => counts[i] += 1,
                None => break,
            }
        }
        counts
    }

    /// The `nodes` most probable nodes (a node's path probability never exceeds its
    /// parent's, so the kept set is a tree), renumbered parents first, siblings in order.
    fn prune(self, nodes: usize) -> (TokenTree, Vec<Option<usize>>) {
        let n = self.tree.len();
        let mut order: Vec<usize> = (1..n).collect();
        order.sort_by(|&a, &b| self.by_logp(a, b));
        let mut keep = vec![false; n];
        keep[0] = true;
        let mut kept = 0;
        for c in order {
            if kept == nodes {
                break;
            }
            if keep[self.tree.parents[c]] {
                keep[c] = true;
                kept += 1;
            }
        }
        let mut new_order: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        new_order.sort_by_key(|&i| (self.tree.depths[i], i));
        let mut new_index = vec![usize::MAX; n];
        new_index[0] = 0;
        let mut tree = TokenTree::root(self.tree.tokens[0], self.tree.proposal);
        let mut slots = vec![self.slots[0]];
        for &old in &new_order[1..] {
            let c = tree.push(new_index[self.tree.parents[old]], self.tree.tokens[old]);
            tree.q[c] = self.tree.q[old].clone();
            new_index[old] = c;
            slots.push(self.slots[old]);
        }
        tree.q[0] = self.tree.q[0].clone();
        (tree, slots)
    }
}

/// Prior of a first child's acceptance rate: one success in two tries.
const RANK_PRIOR: (f64, f64) = (2.0, 1.0);

impl DraftState {
    /// How often a node's first tried child was accepted on this request's sampled tree
    /// passes (with the prior).
    fn continue_rate(&self) -> f64 {
        let (tried, accepted) = self.rank_stats.first().copied().unwrap_or(RANK_PRIOR);
        (accepted / tried).clamp(1e-3, 1.0)
    }

    /// Counts, at every node verification visited, which ranks were tried and which one
    /// was accepted (none at the last node).
    fn record_ranks(&mut self, tree: &TokenTree, verdict: &TreeVerdict) {
        let mut node = 0;
        let visit = |node: usize, accepted: Option<usize>, stats: &mut Vec<(f64, f64)>| {
            for (k, c) in tree.children(node).enumerate() {
                if stats.len() <= k {
                    stats.resize(k + 1, RANK_PRIOR);
                }
                stats[k].0 += 1.0;
                if Some(c) == accepted {
                    stats[k].1 += 1.0;
                    break;
                }
            }
        };
        for &c in &verdict.path {
            visit(node, Some(c), &mut self.rank_stats);
            node = c;
        }
        visit(node, None, &mut self.rank_stats);
    }

    /// Drafts a tree shaped by `spec`, at most `max_depth` deep, rooted at the last
    /// pending token. Children are the top tokens (T = 0) or draws without replacement
    /// (T > 0); see `spec::tree` for why both are exact. At T > 0 with `dev` and the
    /// drafter where its rows live ([`TreeRows::drafts_here`]), the drafter's rows stay
    /// there: ranked and drawn from there, named by [`QRow::Device`] in the tree, which
    /// `dev` then verifies.
    pub fn draft_tree(
        &mut self,
        drafter: &Drafter,
        spec: &TreeSpec,
        max_depth: usize,
        params: &SamplingParams,
        rng: &mut Rng,
        dev: Option<&mut dyn TreeRows>,
    ) -> Result<TokenTree> {
        let root = *self
            .pending
            .last()
            .ok_or_else(|| Error::InvalidArgument("draft_tree with nothing pending".into()))?;
        self.base = self.cache.len();
        self.fed_drafts = 0;
        // Children are ranked by the plain softmax at T = 0 (the processed q is one-hot
        // there), drawn from the processed q at T > 0 (what verification tests against).
        let fixed = params.is_greedy();
        let mut dev = dev.filter(|d| !fixed && d.drafts_here());
        let fan_out = spec.max_children().max(1);
        let root_dist = if fixed {
            Dist::Top(drafter.run_tokens_top_k(&self.pending, &mut self.cache, fan_out)?)
        } else if let Some(d) = reborrow(&mut dev) {
            d.start_tree();
            Dist::Device(d.score_tokens(drafter, &self.pending, &mut self.cache, params)?)
        } else {
            Dist::Full(drafter.run_tokens_probs(&self.pending, &mut self.cache, params)?)
        };
        self.fed_pending = self.pending.len();
        let tree_start = self.cache.len();
        let root_slot = tree_start - 1;
        let proposal = if fixed { Proposal::Fixed } else { Proposal::Sampled };
        let mut g = Growing {
            tree: TokenTree::root(root, proposal),
            ranks: vec![Vec::new()],
            logp: vec![0.0],
            continue_rate: self.continue_rate(),
            slots: vec![Some(root_slot)],
            dist: vec![Some(root_dist)],
        };
        let depth = spec.depth().min(max_depth);
        let vocab = drafter.lm.cfg.vocab_size;
        let mut frontier = vec![0usize];
        let mut budget = spec.max_nodes();
        for d in 1..=depth {
            let mut born = Vec::new();
            // Children per frontier node, fixed before any of them is drawn.
            let counts: Vec<usize> = match spec {
                TreeSpec::Static(paths) => frontier
                    .iter()
                    .map(|&f| TreeSpec::static_children(paths, &g.ranks[f]))
                    .collect(),
                TreeSpec::Dynamic { width, .. } if fixed => vec![*width; frontier.len()],
                TreeSpec::Dynamic { width, .. } => {
                    let share = budget.div_ceil(depth + 1 - d);
                    let tops = g.tops(&frontier, *width, reborrow(&mut dev))?;
                    let c = g.allot(&frontier, &tops, share);
                    budget -= c.iter().sum::<usize>();
                    c
                }
            };
            // Device rows: every frontier node's children in one kernel, in the order the
            // host would draw them.
            let mut drawn = match (g.device_rows(&frontier)?, reborrow(&mut dev)) {
                (Some(row0), Some(d)) => Some(d.draw(row0, &counts, rng)?.into_iter()),
                _ => None,
            };
            for (&f, &k) in frontier.iter().zip(&counts) {
                let on_device = drawn.as_mut().and_then(Iterator::next);
                let Some(dist) = g.dist[f].take() else { continue };
                let children = match (&dist, on_device) {
                    (Dist::Device(_), Some(children)) => children,
                    (Dist::Device(_), None) => {
                        return Err(Error::InvalidArgument(
                            "device drafter rows without their buffers".into(),
                        ))
                    }
                    (Dist::Full(q), _) if !fixed => draw_without_replacement(q, k, rng)
                        .into_iter()
                        .map(|t| (t, q[t as usize]))
                        .collect(),
                    (d, _) => d.host_top(k).unwrap_or_default(),
                };
                for (rank, &(t, q)) in children.iter().enumerate() {
                    born.push(g.push(f, rank, t, q));
                }
                match (proposal, dist) {
                    (Proposal::Sampled, Dist::Full(q)) => g.tree.q[f] = Some(QRow::Host(q)),
                    (Proposal::Sampled, Dist::Device(r)) => g.tree.q[f] = Some(QRow::Device(r)),
                    _ => {}
                }
            }
            if d == depth {
                break;
            }
            let grow: Vec<usize> = match spec {
                TreeSpec::Static(paths) => born
                    .into_iter()
                    .filter(|&c| TreeSpec::static_children(paths, &g.ranks[c]) > 0)
                    .collect(),
                TreeSpec::Dynamic { width, .. } => {
                    let mut best = born;
                    best.sort_by(|&a, &b| g.by_logp(a, b));
                    best.truncate(*width);
                    best.sort_unstable();
                    best
                }
            };
            if grow.is_empty() {
                break;
            }
            // One pass for the whole depth: each node sees the committed tokens, its
            // ancestors (earlier depths, already cached) and itself.
            let cached = self.cache.len();
            let span = cached + grow.len() - tree_start;
            let mut allow = vec![0u8; grow.len() * span];
            for (i, &c) in grow.iter().enumerate() {
                let row = &mut allow[i * span..(i + 1) * span];
                row[cached + i - tree_start] = 1;
                let mut a = g.tree.parents[c];
                while a != 0 {
                    let slot = g.slots[a]
                        .ok_or_else(|| Error::InvalidArgument("tree node scored before its parent".into()))?;
                    row[slot - tree_start] = 1;
                    a = g.tree.parents[a];
                }
            }
            let tokens: Vec<u32> = grow.iter().map(|&c| g.tree.tokens[c]).collect();
            let mask = TreeMask {
                start: tree_start,
                allow: &allow,
            };
            let position = (root_slot + d) as i32;
            let dists: Vec<Dist> = if fixed {
                let rows = drafter.run_tree_top_k(&tokens, position, &mut self.cache, mask, fan_out)?;
                rows.into_iter().map(Dist::Top).collect()
            } else if let Some(d) = reborrow(&mut dev) {
                let row0 = d.score_tree(drafter, &tokens, position, &mut self.cache, mask, params)?;
                (row0..row0 + tokens.len()).map(Dist::Device).collect()
            } else {
                let q = drafter.run_tree_probs(&tokens, position, &mut self.cache, mask, params)?;
                q.chunks_exact(vocab).map(|r| Dist::Full(r.to_vec())).collect()
            };
            for (i, (&c, dist)) in grow.iter().zip(dists).enumerate() {
                g.slots[c] = Some(cached + i);
                g.dist[c] = Some(dist);
            }
            frontier = grow;
        }
        // Reranking looks at the children's own values: only fixed (T = 0) trees may.
        let (tree, slots) = match spec {
            TreeSpec::Dynamic { nodes, .. } if fixed => g.prune(*nodes),
            _ => (g.tree, g.slots),
        };
        self.tree_slots = slots;
        Ok(tree)
    }

    /// After verifying `tree`: the accepted nodes the drafter scored move to contiguous
    /// cache positions after the root, everything else of the tree is forgotten, and the
    /// accepted tokens it has not scored (plus the target's token) become pending.
    pub fn commit_tree(&mut self, tree: &TokenTree, verdict: &TreeVerdict) -> Result<()> {
        if tree.proposal == Proposal::Sampled {
            self.record_ranks(tree, verdict);
        }
        let scored: Vec<usize> = verdict
            .path
            .iter()
            .map_while(|&n| self.tree_slots.get(n).copied().flatten())
            .collect();
        self.cache.compact(self.base + self.fed_pending, &scored)?;
        self.pending = verdict.path[scored.len()..]
            .iter()
            .map(|&n| tree.tokens[n])
            .chain([verdict.next])
            .collect();
        self.tree_slots.clear();
        Ok(())
    }
}
