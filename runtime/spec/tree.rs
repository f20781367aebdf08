//! Token trees: the drafter proposes several continuations at once, the target scores
//! every node in one pass (each node sees the prompt, its ancestors and itself), and the
//! longest acceptable root-to-node path is emitted.
//!
//! Shapes. `static:<paths>` lists every node as its path of child ranks from the root
//! (Medusa / SpecInfer style: `0;1;0.0;0.1;0.0.0` is the best two tokens, the best two
//! after the best, and one more after that); `static:<w1>x<w2>x…` gives every node at
//! depth i the same w_i children. `dynamic:<nodes>,<depth>[,<width>]` grows the tree by
//! path probability (the product of the drafter's probabilities along the path): at each
//! depth the `width` most probable new nodes are expanded. At T = 0 (EAGLE-2) each gets
//! its `width` most likely tokens and at the end the `nodes` most probable nodes are kept;
//! at T > 0 the budget is spread over the depths as the tree grows, each depth's share
//! split over the expanded nodes by expected worth before their children are drawn.
//!
//! Exactness at T > 0 (see [`verify_tree_sampled`]). The rule that keeps it: how many
//! children a node gets may depend on anything drafted before them, never on the
//! children's own tokens (so a T > 0 tree is never reranked after drawing). At a node the
//! target's distribution p is tested against its children in order; after a child x with
//! proposal q_x is rejected, p ← normalize(max(0, p − q_x)); when every child is rejected
//! the token is drawn from the final p. Each step is the two-outcome speculative-sampling lemma (emit
//! x ~ q_x with probability min(1, p(x)/q_x(x)), else draw from the residual: the result
//! is distributed as p), applied recursively, so the emitted token is distributed as the
//! target's p provided each child, given everything decided before it, is distributed as
//! its q_x. Two kinds of children satisfy that:
//! - [`Proposal::Sampled`] (every shape at T > 0): children drawn from the drafter's
//!   q *without replacement*; child i's proposal is q with the earlier siblings removed and
//!   renormalised, which is exactly the law it was drawn from (recursive rejection
//!   sampling, Jeon et al. 2024). A rejected sibling has p(x) < q_x(x), so the residual has
//!   no mass on it either, and the lemma applies again with the reduced p and q.
//! - [`Proposal::Fixed`] (T = 0): children chosen without randomness (top tokens, top
//!   path probabilities); verified greedily. The sampled rule treats such a child as a
//!   point-mass proposal q_x = δ_x (accepted with probability p(x); a rejection removes x
//!   from p), which is exact too: a deterministic candidate list never biases the lemma.

use std::collections::BTreeSet;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::sampling::Rng;
use crate::spec::verify::accept_probability;

/// More nodes than this per pass are refused (the target scores them all at once).
pub const MAX_TREE_NODES: usize = 256;

/// How a tree is shaped (see the module documentation for the syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeSpec {
    /// Every drafted node as its path of child ranks; closed under prefixes, sibling
    /// ranks contiguous from 0, sorted by (length, ranks).
    Static(Vec<Vec<usize>>),
    /// EAGLE-2-style growth by path probability.
    Dynamic { nodes: usize, depth: usize, width: usize },
}

impl TreeSpec {
    /// The chain of `gamma` top-1 drafts as a static tree.
    pub fn chain(gamma: usize) -> TreeSpec {
        TreeSpec::Static((1..=gamma).map(|n| vec![0; n]).collect())
    }

    /// Drafted nodes at most (the root excluded).
    pub fn max_nodes(&self) -> usize {
        match self {
            TreeSpec::Static(p) => p.len(),
            TreeSpec::Dynamic { nodes, .. } => *nodes,
        }
    }

    pub fn depth(&self) -> usize {
        match self {
            TreeSpec::Static(p) => p.iter().map(Vec::len).max().unwrap_or(0),
            TreeSpec::Dynamic { depth, .. } => *depth,
        }
    }

    /// Children a node gets at most.
    pub fn max_children(&self) -> usize {
        match self {
            // Sibling ranks are contiguous from 0: a node's children are its last rank + 1.
            TreeSpec::Static(p) => p.iter().filter_map(|r| r.last()).map(|&r| r + 1).max().unwrap_or(0),
            TreeSpec::Dynamic { width, .. } => *width,
        }
    }

    /// Tokens the drafter scores in one tree at most (nodes that get children).
    pub fn max_fed(&self) -> usize {
        match self {
            TreeSpec::Static(p) => p.len(),
            TreeSpec::Dynamic { depth, width, .. } => width * depth.saturating_sub(1),
        }
    }

    /// How many children the node at rank path `path` gets (static shapes).
    pub(crate) fn static_children(paths: &[Vec<usize>], path: &[usize]) -> usize {
        paths
            .iter()
            .filter(|p| p.len() == path.len() + 1 && p.starts_with(path))
            .count()
    }
}

impl std::fmt::Display for TreeSpec {
    /// The `static:<paths>` / `dynamic:<nodes>,<depth>,<width>` form `--tree` parses.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeSpec::Static(paths) => {
                let paths: Vec<String> = paths
                    .iter()
                    .map(|p| p.iter().map(usize::to_string).collect::<Vec<_>>().join("."))
                    .collect();
                write!(f, "static:{}", paths.join(";"))
            }
            TreeSpec::Dynamic { nodes, depth, width } => write!(f, "dynamic:{nodes},{depth},{width}"),
        }
    }
}

impl FromStr for TreeSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("--tree {s:?}: {why}"));
        let num = |t: &str| -> Result<usize> {
            t.trim()
                .parse::<usize>()
                .map_err(|_| bad(format!("{t:?} is not a whole number")))
        };
        let (kind, body) = s.split_once(':').ok_or_else(|| {
            bad("expected static:<paths>, static:<w1>x<w2>…, or dynamic:<nodes>,<depth>[,<width>]".into())
        })?;
        let spec = match kind {
            "static" if body.contains('x') => {
                let widths = body.split('x').map(num).collect::<Result<Vec<_>>>()?;
                if widths.contains(&0) {
                    return Err(bad("every depth needs at least one child".into()));
                }
                let mut paths: Vec<Vec<usize>> = Vec::new();
                let mut level: Vec<Vec<usize>> = vec![Vec::new()];
                for w in widths {
                    level = level
                        .iter()
                        .flat_map(|p| (0..w).map(move |r| [p.as_slice(), &[r]].concat()))
                        .collect();
                    paths.extend(level.iter().cloned());
                    if paths.len() > MAX_TREE_NODES {
                        return Err(bad(format!("more than {MAX_TREE_NODES} nodes")));
                    }
                }
                TreeSpec::Static(paths)
            }
            "static" => {
                let mut set = BTreeSet::new();
                for p in body.split(';') {
                    let path = p.split('.').map(num).collect::<Result<Vec<_>>>()?;
                    if !set.insert(path.clone()) {
                        return Err(bad(format!("path {p:?} is listed twice")));
                    }
                }
                for p in &set {
                    let (last, parent) = p.split_last().ok_or_else(|| bad("empty path".into()))?;
                    if !parent.is_empty() && !set.contains(parent) {
                        return Err(bad(format!("path {p:?} lacks its parent {parent:?}")));
                    }
                    if *last > 0 && !set.contains(&[parent, &[last - 1]].concat()) {
                        return Err(bad(format!(
                            "path {p:?}: rank {last} without rank {} before it (ranks are contiguous from 0)",
                            last - 1
                        )));
                    }
                }
                let mut paths: Vec<Vec<usize>> = set.into_iter().collect();
                paths.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
                TreeSpec::Static(paths)
            }
            "dynamic" => {
                let v = body.split(',').map(num).collect::<Result<Vec<_>>>()?;
                let (nodes, depth) = match v[..] {
                    [n, d] | [n, d, _] => (n, d),
                    _ => return Err(bad("dynamic takes <nodes>,<depth>[,<width>]".into())),
                };
                let width = v.get(2).copied().unwrap_or(nodes.min(8));
                if nodes == 0 || depth == 0 || width == 0 {
                    return Err(bad("nodes, depth and width must be at least 1".into()));
                }
                TreeSpec::Dynamic { nodes, depth, width }
            }
            other => return Err(bad(format!("unknown tree kind {other:?} (static or dynamic)"))),
        };
        if spec.max_nodes() > MAX_TREE_NODES {
            return Err(bad(format!("{} nodes is more than {MAX_TREE_NODES}", spec.max_nodes())));
        }
        Ok(spec)
    }
}

/// How a tree's children were chosen; decides how verification treats them at T > 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposal {
    /// Chosen without randomness: each child is a point-mass proposal.
    Fixed,
    /// Drawn from the drafter's distribution at the parent without replacement.
    Sampled,
}

/// Where the drafter's distribution at a node lives ([`TokenTree::q`]).
#[derive(Debug, Clone, PartialEq)]
pub enum QRow {
    /// On the host.
    Host(Vec<f32>),
    /// Row r of the request's device rows, where the drafter ran on a CUDA device and its
    /// children were drawn there ([`crate::spec::device_sampling::DeviceTreeSampling`]):
    /// only the device verifies such a tree.
    Device(usize),
}

/// A drafted tree. Node 0 is the root: the last committed token, which the target has
/// not scored yet; every other node is a drafted token whose parent comes before it and
/// whose siblings follow it in proposal order.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTree {
    pub tokens: Vec<u32>,
    /// parents[0] = 0 (the root has none).
    pub parents: Vec<usize>,
    pub depths: Vec<usize>,
    pub proposal: Proposal,
    /// [`Proposal::Sampled`]: the drafter's distribution each node's children were drawn
    /// from (None for nodes without children, and for fixed trees).
    pub q: Vec<Option<QRow>>,
}

impl TokenTree {
    /// A tree of the root alone.
    pub fn root(token: u32, proposal: Proposal) -> Self {
        TokenTree {
            tokens: vec![token],
            parents: vec![0],
            depths: vec![0],
            proposal,
            q: vec![None],
        }
    }

    /// Appends a child of `parent`; returns its index.
    pub fn push(&mut self, parent: usize, token: u32) -> usize {
        self.tokens.push(token);
        self.parents.push(parent);
        self.depths.push(self.depths[parent] + 1);
        self.q.push(None);
        self.tokens.len() - 1
    }

    /// Nodes, the root included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// Children of `node` in proposal order.
    pub fn children(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        (node + 1..self.len()).filter(move |&c| self.parents[c] == node)
    }

    /// Whether `a` is `b` or one of its ancestors.
    pub fn is_ancestor_or_self(&self, a: usize, mut b: usize) -> bool {
        loop {
            if a == b {
                return true;
            }
            if b == 0 || b < a {
                return false;
            }
            b = self.parents[b];
        }
    }

    /// The target's attention mask over the tree, [n, n] row-major: node t sees node j iff
    /// j is t or an ancestor of t.
    pub fn mask(&self) -> Vec<u8> {
        let n = self.len();
        let mut m = vec![0u8; n * n];
        for t in 0..n {
            for j in 0..=t {
                m[t * n + j] = self.is_ancestor_or_self(j, t) as u8;
            }
        }
        m
    }

    /// Checks the invariants verification relies on (parents first, depths consistent).
    pub fn validate(&self) -> Result<()> {
        let n = self.len();
        let ok = n > 0
            && self.parents.len() == n
            && self.depths.len() == n
            && self.q.len() == n
            && self.depths[0] == 0
            && (1..n).all(|i| self.parents[i] < i && self.depths[i] == self.depths[self.parents[i]] + 1);
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument("malformed token tree".into()))
        }
    }
}

/// What verification accepted: the nodes of the accepted path (root excluded, root to
/// leaf) and the target's token after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeVerdict {
    pub path: Vec<usize>,
    pub next: u32,
}

impl TreeVerdict {
    /// Tokens this pass emits: the accepted path's, then `next`.
    pub fn emitted(&self, tree: &TokenTree) -> Vec<u32> {
        self.path.iter().map(|&n| tree.tokens[n]).chain([self.next]).collect()
    }
}

/// T = 0: from the root, follow the child equal to the target's argmax at its parent
/// (`argmax[node]`, one per node) while there is one; then emit the target's token.
pub fn verify_tree_greedy(tree: &TokenTree, argmax: &[u32]) -> TreeVerdict {
    debug_assert_eq!(argmax.len(), tree.len());
    let (mut node, mut path) = (0, Vec::new());
    loop {
        let want = argmax[node];
        match tree.children(node).find(|&c| tree.tokens[c] == want) {
            Some(c) => {
                path.push(c);
                node = c;
            }
            None => return TreeVerdict { path, next: want },
        }
    }
}

/// T > 0: multi-candidate rejection sampling down the tree (the module documentation
/// says why it is exact). `p[node]`: the target's processed distribution after the path
/// to `node`. `residual_rule` is [`crate::spec::verify::residual`] in the engine; tests
/// pass broken rules to show the statistical tests catch them.
pub fn verify_tree_sampled(
    tree: &TokenTree,
    p: &[Vec<f32>],
    rng: &mut Rng,
    residual_rule: fn(&[f32], &[f32]) -> Vec<f32>,
) -> Result<TreeVerdict> {
    if p.len() != tree.len() {
        return Err(Error::InvalidArgument(format!(
            "{} target rows for a tree of {} nodes",
            p.len(),
            tree.len()
        )));
    }
    let (mut node, mut path) = (0, Vec::new());
    'down: loop {
        let mut pn = p[node].clone();
        // Sampled: the law of the next child (q without the siblings already tried).
        let mut q_left = match (tree.proposal, &tree.q[node]) {
            (Proposal::Sampled, Some(QRow::Host(q))) => Some(q.clone()),
            (Proposal::Sampled, Some(QRow::Device(_))) => {
                return Err(Error::InvalidArgument(format!(
                    "node {node}'s drafter distribution is on the device: the device verifies this tree"
                )))
            }
            _ => None,
        };
        for c in tree.children(node) {
            let x = tree.tokens[c] as usize;
            let qc = match &q_left {
                Some(q) => q.clone(),
                None => point_mass(x, pn.len()),
            };
            let a = accept_probability(pn.get(x).copied().unwrap_or(0.0), qc.get(x).copied().unwrap_or(0.0));
            if rng.uniform() < a as f64 {
                path.push(c);
                node = c;
                continue 'down;
            }
            pn = residual_rule(&pn, &qc);
            if let Some(q) = &mut q_left {
                without(q, x);
            }
        }
        return Ok(TreeVerdict {
            path,
            next: rng.sample(&pn) as u32,
        });
    }
}

fn point_mass(x: usize, len: usize) -> Vec<f32> {
    let mut q = vec![0.0; len.max(x + 1)];
    q[x] = 1.0;
    q
}

/// q with token x removed, renormalised (all zeros when nothing is left).
pub fn without(q: &mut [f32], x: usize) {
    if let Some(v) = q.get_mut(x) {
        *v = 0.0;
    }
    let sum: f64 = q.iter().map(|&v| v as f64).sum();
    for v in q.iter_mut() {
        *v = if sum > 0.0 { (*v as f64 / sum) as f32 } else { 0.0 };
    }
}

/// The `k` most likely tokens of `q` with non-zero probability, best first (ties: lower id).
pub fn top_tokens(q: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..q.len() as u32).filter(|&i| q[i as usize] > 0.0).collect();
    let better = |a: &u32, b: &u32| {
        q[*b as usize]
            .partial_cmp(&q[*a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    if idx.len() > k && k > 0 {
        idx.select_nth_unstable_by(k - 1, better);
        idx.truncate(k);
    }
    idx.sort_by(better);
    idx.truncate(k);
    idx
}

/// `k` draws from `q` without replacement, in draw order (fewer when q runs out).
pub fn draw_without_replacement(q: &[f32], k: usize, rng: &mut Rng) -> Vec<u32> {
    let mut left = q.to_vec();
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        if !left.iter().any(|&v| v > 0.0) {
            break;
        }
        let x = rng.sample(&left);
        out.push(x as u32);
        without(&mut left, x);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::verify::residual;

    fn tree(parents: &[usize], tokens: &[u32]) -> TokenTree {
        let mut t = TokenTree::root(tokens[0], Proposal::Fixed);
        for i in 1..parents.len() {
            t.push(parents[i], tokens[i]);
        }
        t
    }

    #[test]
    fn parses_shapes() {
        let s: TreeSpec = "static:0;1;0.0;0.1;0.0.0".parse().unwrap();
        assert_eq!(
            s,
            TreeSpec::Static(vec![vec![0], vec![1], vec![0, 0], vec![0, 1], vec![0, 0, 0]])
        );
        assert_eq!((s.max_nodes(), s.depth()), (5, 3));
        let w: TreeSpec = "static:2x2x1".parse().unwrap();
        assert_eq!(w.max_nodes(), 2 + 4 + 4);
        assert_eq!(w.depth(), 3);
        assert_eq!("static:1x1x1".parse::<TreeSpec>().unwrap(), TreeSpec::chain(3));
        for spec in [&s, &w, &TreeSpec::chain(2)] {
            assert_eq!(&spec.to_string().parse::<TreeSpec>().unwrap(), spec, "{spec}");
        }
        assert_eq!(
            "dynamic:32,6".parse::<TreeSpec>().unwrap(),
            TreeSpec::Dynamic {
                nodes: 32,
                depth: 6,
                width: 8
            }
        );
        for bad in [
            "static:1",
            "static:0;0.1",
            "static:0.0",
            "static:0;0",
            "static:0;x",
            "static:2x0",
            "dynamic:0,3",
            "dynamic:4",
            "tree:4",
            "dynamic:300,4",
            "static:16x16",
        ] {
            let e = bad.parse::<TreeSpec>().unwrap_err().to_string();
            assert!(e.contains("--tree"), "{bad}: {e}");
        }
    }

    #[test]
    fn mask_is_ancestors_and_self() {
        // 0 → 1, 2; 1 → 3; 2 → 4
        let t = tree(&[0, 0, 0, 1, 2], &[9, 1, 2, 3, 4]);
        let m = t.mask();
        let row = |i: usize| m[i * 5..(i + 1) * 5].to_vec();
        assert_eq!(row(0), [1, 0, 0, 0, 0]);
        assert_eq!(row(3), [1, 1, 0, 1, 0]);
        assert_eq!(row(4), [1, 0, 1, 0, 1]);
        assert_eq!(t.children(0).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn greedy_follows_the_matching_branch() {
        let t = tree(&[0, 0, 0, 1, 2, 4], &[9, 5, 6, 7, 8, 3]);
        // Target: after root 6, after node 2 (6) → 8, after node 4 (8) → 3, after 5 → 1.
        let argmax = [6, 0, 8, 0, 3, 1];
        let v = verify_tree_greedy(&t, &argmax);
        assert_eq!(
            v,
            TreeVerdict {
                path: vec![2, 4, 5],
                next: 1
            }
        );
        assert_eq!(v.emitted(&t), [6, 8, 3, 1]);
        let v = verify_tree_greedy(&t, &[4, 0, 0, 0, 0, 0]);
        assert_eq!(v, TreeVerdict { path: vec![], next: 4 }, "nothing matches");
    }

    #[test]
    fn sampled_chain_equals_chain_rule() {
        // A one-child-per-node sampled tree is the chain rule, uniform for uniform.
        let q0 = vec![0.6, 0.3, 0.1];
        let q1 = vec![0.2, 0.2, 0.6];
        let p = vec![vec![0.5, 0.4, 0.1], vec![0.1, 0.1, 0.8], vec![0.3, 0.3, 0.4]];
        let mut t = TokenTree::root(7, Proposal::Sampled);
        t.push(0, 1);
        t.push(1, 2);
        t.q[0] = Some(QRow::Host(q0.clone()));
        t.q[1] = Some(QRow::Host(q1.clone()));
        for seed in 0..200 {
            let a = verify_tree_sampled(&t, &p, &mut Rng::new(seed), residual).unwrap();
            let b = crate::spec::verify::verify_sampled(
                &[1, 2],
                &[q0.clone(), q1.clone()],
                &p,
                &mut Rng::new(seed),
                residual,
            );
            assert_eq!(a.path.len(), b.accepted);
            assert_eq!(a.next, b.next);
        }
        // A row left on the device is not verified on the host.
        t.q[1] = Some(QRow::Device(1));
        let p2 = vec![vec![0.0, 1.0, 0.0], p[1].clone(), p[2].clone()];
        let e = verify_tree_sampled(&t, &p2, &mut Rng::new(0), residual).unwrap_err();
        assert!(e.to_string().contains("on the device"), "{e}");
        assert!(verify_tree_sampled(&t, &p2[..2], &mut Rng::new(0), residual).is_err());
    }

    #[test]
    fn top_and_without_replacement() {
        let q = [0.1, 0.4, 0.0, 0.4, 0.1];
        assert_eq!(top_tokens(&q, 3), [1, 3, 0]);
        assert_eq!(top_tokens(&q, 9), [1, 3, 0, 4], "zero-probability tokens never appear");
        let mut rng = Rng::new(3);
        let d = draw_without_replacement(&q, 9, &mut rng);
        assert_eq!(d.len(), 4);
        let set: BTreeSet<u32> = d.iter().copied().collect();
        assert_eq!(set.len(), 4);
        assert!(!set.contains(&2));
    }
}
