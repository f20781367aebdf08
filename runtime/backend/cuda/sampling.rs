//! Launchers of cuda/sampling.cu: argmax, probabilities, top-k, draws and verification.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig};

use super::{block_per_row, cuda_err, i32_arg, need, shape_err, CudaDevice};
use crate::error::Result;
use crate::reference::SAMPLE_TILE;
use crate::sampling::SamplingParams;
use crate::spec::tree::Proposal;

/// Longest row of the single-block sampling kernels (MAX_TILES * SAMPLE_TILE).
pub const SAMPLE_MAX_N: usize = 256 * 1024;

/// Most tokens [`CudaDevice::top_k`] takes per row (a token tree's widest node).
pub const MAX_TOP_K: usize = 64;

/// Rows one launch of the split probabilities kernels takes (their scratch's rows).
const SPLIT_ROWS: usize = 64;
/// Blocks of probabilities_max / probabilities_exp a row (SPLIT_BLOCKS in cuda/sampling.cu).
const SPLIT_BLOCKS: usize = 32;
/// Threads of a split kernel's block (SPLIT_THREADS), and the warps of a
/// probabilities_normalize block (SPLIT_WARPS), a tile of SAMPLE_TILE entries each.
const SPLIT_THREADS: u32 = 128;
const SPLIT_WARPS: usize = 4;
/// Sum warps of a row (SUM_WARPS) and tiles of the longest sampled row (MAX_TILES).
const SUM_WARPS: usize = 128;
const MAX_TILES: usize = SAMPLE_MAX_N / SAMPLE_TILE;
/// A row's state of the split top-k / top-p cut (CUT_ROW_BYTES: its histogram and
/// select state), and its radix digits (a probabilities_cut_digit launch each).
const CUT_ROW_BYTES: usize = 4096;
const CUT_DIGITS: i32 = 4;

/// A split kernel's launch: `blocks` blocks of SPLIT_THREADS a row (blockIdx.x), `rows`
/// rows (blockIdx.y).
fn split_grid(blocks: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, rows as u32, 1),
        block_dim: (SPLIT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The scratch of the split probabilities kernels for [`SPLIT_ROWS`] rows: each block's
/// max, each sum warp's sum, each tile's sum and last positive entry for a draw, each
/// row's cut, each block's top-k candidates (top_k_select's and
/// probabilities_cut_top_k's (probability, id) pairs), and a split verify_sampled's
/// verdict between its two launches. One set per device: its one stream runs one kernel
/// at a time, and a call queues its launches holding the set.
pub(super) struct SplitScratch {
    row_max: CudaSlice<f32>,
    warp_sums: CudaSlice<f64>,
    tile_sums: CudaSlice<f64>,
    tile_lasts: CudaSlice<i32>,
    cut: CudaSlice<u8>,
    top: CudaSlice<u64>,
    verdict: CudaSlice<u64>,
}

impl SplitScratch {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let e = |e| cuda_err("split probabilities scratch", e);
        Ok(SplitScratch {
            row_max: stream.alloc_zeros(SPLIT_ROWS * SPLIT_BLOCKS).map_err(e)?,
            warp_sums: stream.alloc_zeros(SPLIT_ROWS * SUM_WARPS).map_err(e)?,
            tile_sums: stream.alloc_zeros(SPLIT_ROWS * MAX_TILES).map_err(e)?,
            tile_lasts: stream.alloc_zeros(SPLIT_ROWS * MAX_TILES).map_err(e)?,
            // Zero: the histograms are zero between launches.
            cut: stream.alloc_zeros(SPLIT_ROWS * CUT_ROW_BYTES).map_err(e)?,
            top: stream.alloc_zeros(SPLIT_ROWS * SPLIT_BLOCKS * MAX_TOP_K).map_err(e)?,
            // VerifyState: an int and a double.
            verdict: stream.alloc_zeros(2).map_err(e)?,
        })
    }
}

impl CudaDevice {
    /// First index of each row's maximum; x: [rows, n] f32, out: [rows].
    pub fn argmax(&self, x: &CudaView<'_, f32>, out: &mut CudaViewMut<'_, i32>, rows: usize, n: usize) -> Result<()> {
        const OP: &str = "argmax";
        need(OP, "x", x.len(), rows * n)?;
        need(OP, "out", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let (xp, op) = (self.rptr(x), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(rows, 1024),
            &[&xp, &op, &i32_arg(OP, "n", n)?],
        )
    }

    /// The sampling distribution of each row (massv::sampling::probabilities); logits,
    /// out: [rows, n] f32. At T > 0 a row takes many blocks, its softmax and its top-k /
    /// top-p cut ([`Self::set_split_probabilities`]); at T = 0 one block a row.
    pub fn probabilities(
        &self,
        logits: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        params: &SamplingParams,
    ) -> Result<()> {
        const OP: &str = "probabilities";
        params.validate()?;
        need(OP, "logits", logits.len(), rows * n)?;
        need(OP, "out", out.len(), rows * n)?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        if self.splits_probabilities(params) {
            return self.probabilities_split(logits, out, None, rows, n, params);
        }
        let top_k = cut_top_k(params);
        let (lp, op) = (self.rptr(logits), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(rows, 1024),
            &[
                &lp,
                &op,
                &i32_arg(OP, "n", n)?,
                &params.temperature,
                &top_k,
                &params.top_p,
            ],
        )
    }

    /// Whether `probabilities` splits each row over many blocks (three launches, two
    /// more for a top-k of at most [`MAX_TOP_K`] (the shipped generation configs'), five
    /// for another top-k / top-p cut; the same bits) for these parameters: at T > 0,
    /// unless turned off ([`Self::set_split_probabilities`]).
    fn splits_probabilities(&self, params: &SamplingParams) -> bool {
        self.split_probabilities() && params.temperature > 0.0
    }

    /// Turns the split probabilities kernels on (the default) or off; off, every row
    /// takes one block of the `probabilities` kernel, and of `top_k` / `top_k_probs`,
    /// and `verify_sampled` one block (their bits are the same: for tests and
    /// benchmarks).
    pub fn set_split_probabilities(&self, on: bool) {
        self.split_probabilities.store(on, Ordering::Relaxed);
    }

    /// Whether `probabilities` splits rows over many blocks where it can
    /// ([`Self::set_split_probabilities`]).
    pub fn split_probabilities(&self) -> bool {
        self.split_probabilities.load(Ordering::Relaxed)
    }

    /// probabilities_max and probabilities_exp; where params cut the rows, the cut (a top-k
    /// of at most [`MAX_TOP_K`] below n: probabilities_cut_top_k, the cut found among
    /// the top-k; otherwise probabilities_cut_digit for each of the four radix digits;
    /// then probabilities_cut_keep); then probabilities_normalize; over `rows` rows of
    /// n, [`SPLIT_ROWS`] at a time; with `draw` (uniforms, ids), each row's draw too.
    fn probabilities_split(
        &self,
        logits: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        mut draw: Option<(&CudaView<'_, f64>, &mut CudaViewMut<'_, i32>)>,
        rows: usize,
        n: usize,
        params: &SamplingParams,
    ) -> Result<()> {
        // Held until the last launch is queued (see CudaDevice::split_scratch).
        let s = self.split_scratch.lock().unwrap_or_else(|p| p.into_inner());
        let (mp, wp, tp, lp, kp, candp) = (
            self.rptr(&s.row_max.as_view()),
            self.rptr(&s.warp_sums.as_view()),
            self.rptr(&s.tile_sums.as_view()),
            self.rptr(&s.tile_lasts.as_view()),
            self.rptr(&s.cut.as_view()),
            self.rptr(&s.top.as_view()),
        );
        let n_arg = i32_arg("probabilities", "n", n)?;
        let (cut, top_k) = (cuts(params, n), cut_top_k(params));
        let cp = self.counters_ptr();
        let tiles = n.div_ceil(SAMPLE_TILE);
        for r0 in (0..rows).step_by(SPLIT_ROWS) {
            let g = (rows - r0).min(SPLIT_ROWS);
            let cfg = |blocks: usize| split_grid(blocks, g);
            let xp = self.rptr(&logits.slice(r0 * n..(r0 + g) * n));
            let op = self.wptr(&mut out.slice_mut(r0 * n..(r0 + g) * n));
            let (up, ip) = match &mut draw {
                Some((u, ids)) => (
                    self.rptr(&u.slice(r0..r0 + g)),
                    self.wptr(&mut ids.slice_mut(r0..r0 + g)),
                ),
                None => (0u64, 0u64),
            };
            self.launch("sampling", "probabilities_max", cfg(SPLIT_BLOCKS), &[&xp, &mp, &n_arg])?;
            self.launch(
                "sampling",
                "probabilities_exp",
                cfg(SPLIT_BLOCKS),
                &[&xp, &op, &mp, &wp, &n_arg, &params.temperature],
            )?;
            if cut {
                if (1..=MAX_TOP_K as i32).contains(&top_k) && (top_k as usize) < n {
                    self.launch(
                        "sampling",
                        "probabilities_cut_top_k",
                        cfg(SPLIT_BLOCKS),
                        &[&op, &wp, &candp, &kp, &cp, &n_arg, &top_k, &params.top_p],
                    )?;
                } else {
                    for pass in 0..CUT_DIGITS {
                        self.launch(
                            "sampling",
                            "probabilities_cut_digit",
                            cfg(SPLIT_BLOCKS),
                            &[&op, &wp, &kp, &cp, &n_arg, &top_k, &params.top_p, &pass],
                        )?;
                    }
                }
                self.launch(
                    "sampling",
                    "probabilities_cut_keep",
                    cfg(SPLIT_BLOCKS),
                    &[&op, &kp, &wp, &n_arg],
                )?;
            }
            self.launch(
                "sampling",
                "probabilities_normalize",
                cfg(tiles.div_ceil(SPLIT_WARPS)),
                &[&op, &wp, &up, &ip, &tp, &lp, &cp, &n_arg],
            )?;
        }
        Ok(())
    }

    /// One draw per row from `probabilities` of logits ([rows, n]) with uniforms[row]
    /// into ids ([rows]), the distributions into out ([rows, n]): `probabilities` then
    /// `sample`, but where the rows split over blocks (T > 0), the draw is made in the
    /// split's last launch.
    /// Twin: `reference::probabilities_sample`.
    #[allow(clippy::too_many_arguments)]
    pub fn probabilities_sample(
        &self,
        logits: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        ids: &mut CudaViewMut<'_, i32>,
        rows: usize,
        n: usize,
        params: &SamplingParams,
    ) -> Result<()> {
        const OP: &str = "probabilities_sample";
        params.validate()?;
        check_sample_n(OP, n)?;
        need(OP, "logits", logits.len(), rows * n)?;
        need(OP, "out", out.len(), rows * n)?;
        need(OP, "uniforms", uniforms.len(), rows)?;
        need(OP, "ids", ids.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        if self.splits_probabilities(params) {
            return self.probabilities_split(logits, out, Some((uniforms, ids)), rows, n, params);
        }
        self.probabilities(logits, out, rows, n, params)?;
        self.sample(&out.slice(..rows * n), uniforms, ids, rows, n)
    }

    /// Per row of logits ([rows, n]) the k most likely tokens of the plain softmax with a
    /// non-zero probability, best first (ties: lower id), into ids and probs ([rows, k]);
    /// id -1, probability 0 past the last. k ≤ [`MAX_TOP_K`]. A row takes many blocks
    /// (probabilities_max, probabilities_exp's sums, top_k_select; the same bits) unless
    /// [`Self::set_split_probabilities`] turned that off. Twin: `reference::top_k`.
    #[allow(clippy::too_many_arguments)]
    pub fn top_k(
        &self,
        logits: &CudaView<'_, f32>,
        ids: &mut CudaViewMut<'_, i32>,
        probs: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.top_k_rows("top_k", logits, ids, probs, rows, n, k, true)
    }

    /// [`Self::top_k`] of rows that already are distributions (q: [rows, n]), ranked by
    /// their own values (`reference::top_k_probs`): one launch where rows split.
    pub fn top_k_probs(
        &self,
        q: &CudaView<'_, f32>,
        ids: &mut CudaViewMut<'_, i32>,
        probs: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.top_k_rows("top_k_probs", q, ids, probs, rows, n, k, false)
    }

    /// `top_k` (of_logits) or `top_k_probs`: the one-block kernel `op`, or the split
    /// kernels [`SPLIT_ROWS`] rows at a time.
    #[allow(clippy::too_many_arguments)]
    fn top_k_rows(
        &self,
        op: &'static str,
        x: &CudaView<'_, f32>,
        ids: &mut CudaViewMut<'_, i32>,
        probs: &mut CudaViewMut<'_, f32>,
        rows: usize,
        n: usize,
        k: usize,
        of_logits: bool,
    ) -> Result<()> {
        if k == 0 || k > MAX_TOP_K {
            return Err(shape_err(op, format!("k = {k} (1 to {MAX_TOP_K})")));
        }
        need(op, if of_logits { "logits" } else { "q" }, x.len(), rows * n)?;
        need(op, "ids", ids.len(), rows * k)?;
        need(op, "probs", probs.len(), rows * k)?;
        if rows == 0 {
            return Ok(());
        }
        let (n_arg, k_arg) = (i32_arg(op, "n", n)?, k as i32);
        if !self.split_probabilities() {
            let (xp, ip, pp) = (self.rptr(x), self.wptr(ids), self.wptr(probs));
            return self.launch(
                "sampling",
                op,
                block_per_row(rows, 1024),
                &[&xp, &ip, &pp, &n_arg, &k_arg],
            );
        }
        // Held until the last launch is queued (see CudaDevice::split_scratch).
        let s = self.split_scratch.lock().unwrap_or_else(|p| p.into_inner());
        let (mp, wp, tp) = (
            self.rptr(&s.row_max.as_view()),
            self.rptr(&s.warp_sums.as_view()),
            self.rptr(&s.top.as_view()),
        );
        let cp = self.counters_ptr();
        for r0 in (0..rows).step_by(SPLIT_ROWS) {
            let g = (rows - r0).min(SPLIT_ROWS);
            let cfg = split_grid(SPLIT_BLOCKS, g);
            let xp = self.rptr(&x.slice(r0 * n..(r0 + g) * n));
            let ip = self.wptr(&mut ids.slice_mut(r0 * k..(r0 + g) * k));
            let pp = self.wptr(&mut probs.slice_mut(r0 * k..(r0 + g) * k));
            let max_ptr = if of_logits {
                self.launch("sampling", "probabilities_max", cfg, &[&xp, &mp, &n_arg])?;
                // The sums alone (no output row), at T = 1.
                let (none, t) = (0u64, 1.0f32);
                self.launch(
                    "sampling",
                    "probabilities_exp",
                    cfg,
                    &[&xp, &none, &mp, &wp, &n_arg, &t],
                )?;
                mp
            } else {
                0u64
            };
            self.launch(
                "sampling",
                "top_k_select",
                cfg,
                &[&xp, &max_ptr, &wp, &tp, &cp, &ip, &pp, &n_arg, &k_arg],
            )?;
        }
        Ok(())
    }

    /// A token tree's children drawn without replacement
    /// (`reference::sample_without_replacement`): node j draws counts[j] tokens from q row
    /// row0 + j (q: [rows, n]) with the next of `uniforms` ([sum counts]); `out` ([sum
    /// counts + 1]) gets the draws node by node (-1 past a node's last) and then the
    /// uniforms used, `out_q` ([sum counts]) each draw's probability in its row.
    /// `draws`: [m] scratch (`reference::draw_counts`); `work`: scratch rows of n, at least
    /// one. With max(1, total / 2) rows (as many as nodes can draw two or more) the m nodes
    /// draw at once, one block each, wherever `draw_counts` knows every node's draws before
    /// drawing (rows that are distributions); otherwise one block draws them in turn.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_without_replacement(
        &self,
        q: &CudaView<'_, f32>,
        counts: &CudaView<'_, i32>,
        uniforms: &CudaView<'_, f64>,
        draws: &mut CudaViewMut<'_, i32>,
        work: &mut CudaViewMut<'_, f32>,
        out: &mut CudaViewMut<'_, i32>,
        out_q: &mut CudaViewMut<'_, f32>,
        row0: usize,
        m: usize,
        total: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "sample_without_replacement";
        check_sample_n(OP, n)?;
        need(OP, "q", q.len(), (row0 + m) * n)?;
        need(OP, "counts", counts.len(), m)?;
        need(OP, "uniforms", uniforms.len(), total)?;
        need(OP, "draws", draws.len(), m)?;
        need(OP, "work", work.len(), n)?;
        need(OP, "out", out.len(), total + 1)?;
        need(OP, "out_q", out_q.len(), total)?;
        let (qp, cp, up, wp, op, oq) = (
            self.rptr(q),
            self.rptr(counts),
            self.rptr(uniforms),
            self.wptr(work),
            self.wptr(out),
            self.wptr(out_q),
        );
        let (m_arg, row0_arg) = (i32_arg(OP, "m", m)?, i32_arg(OP, "row0", row0)?);
        let at_once = m > 1 && work.len() / n >= (total / 2).max(1);
        let dp = if at_once {
            self.draw_counts(q, counts, draws, row0, m, n)?;
            self.wptr(draws)
        } else {
            0u64 // one block draws the nodes in turn
        };
        self.launch(
            "sampling",
            OP,
            block_per_row(if at_once { m } else { 1 }, 1024),
            &[&qp, &cp, &dp, &up, &wp, &op, &oq, &m_arg, &row0_arg, &(n as i32)],
        )
    }

    /// Per node of `sample_without_replacement`, the draws it makes when that is known
    /// before drawing (`reference::draw_counts`): draws ([m]) of q rows row0.. ([rows, n]).
    pub fn draw_counts(
        &self,
        q: &CudaView<'_, f32>,
        counts: &CudaView<'_, i32>,
        draws: &mut CudaViewMut<'_, i32>,
        row0: usize,
        m: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "draw_counts";
        need(OP, "q", q.len(), (row0 + m) * n)?;
        need(OP, "counts", counts.len(), m)?;
        need(OP, "draws", draws.len(), m)?;
        if m == 0 {
            return Ok(());
        }
        let (qp, cp, dp) = (self.rptr(q), self.rptr(counts), self.wptr(draws));
        self.launch(
            "sampling",
            OP,
            block_per_row(m, 1024),
            &[&qp, &cp, &dp, &i32_arg(OP, "row0", row0)?, &i32_arg(OP, "n", n)?],
        )
    }

    /// One draw per row from non-negative weights w ([rows, n]) with uniforms[row].
    pub fn sample(
        &self,
        w: &CudaView<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        out: &mut CudaViewMut<'_, i32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "sample";
        need(OP, "w", w.len(), rows * n)?;
        need(OP, "uniforms", uniforms.len(), rows)?;
        need(OP, "out", out.len(), rows)?;
        check_sample_n(OP, n)?;
        if rows == 0 {
            return Ok(());
        }
        let (wp, up, op) = (self.rptr(w), self.rptr(uniforms), self.wptr(out));
        self.launch("sampling", OP, block_per_row(rows, 1024), &[&wp, &up, &op, &(n as i32)])
    }

    /// (accepted, next) of greedy verification into out[0..2]; drafts: [γ],
    /// target_argmax: [γ + 1].
    pub fn verify_greedy(
        &self,
        drafts: &CudaView<'_, i32>,
        target_argmax: &CudaView<'_, i32>,
        out: &mut CudaViewMut<'_, i32>,
        gamma: usize,
    ) -> Result<()> {
        const OP: &str = "verify_greedy";
        need(OP, "drafts", drafts.len(), gamma)?;
        need(OP, "target_argmax", target_argmax.len(), gamma + 1)?;
        need(OP, "out", out.len(), 2)?;
        let (dp, tp, op) = (self.rptr(drafts), self.rptr(target_argmax), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 32),
            &[&dp, &tp, &op, &i32_arg(OP, "gamma", gamma)?],
        )
    }

    /// (accepted, next) of rejection-sampling verification into out[0..2]: drafts [γ],
    /// q [γ, nq], p [γ + 1, np], uniforms [γ + 1] (the host RNG's next draws; see
    /// `reference::verify_sampled` and `reference::uniforms_consumed`). The vocabulary
    /// splits over many blocks (verify_sampled_tiles, verify_sampled_draw: the same
    /// verdict) unless [`Self::set_split_probabilities`] turned that off.
    #[allow(clippy::too_many_arguments)]
    pub fn verify_sampled(
        &self,
        drafts: &CudaView<'_, i32>,
        q: &CudaView<'_, f32>,
        p: &CudaView<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        out: &mut CudaViewMut<'_, i32>,
        gamma: usize,
        nq: usize,
        np: usize,
    ) -> Result<()> {
        const OP: &str = "verify_sampled";
        need(OP, "drafts", drafts.len(), gamma)?;
        need(OP, "q", q.len(), gamma * nq)?;
        need(OP, "p", p.len(), (gamma + 1) * np)?;
        need(OP, "uniforms", uniforms.len(), gamma + 1)?;
        need(OP, "out", out.len(), 2)?;
        check_sample_n(OP, np)?;
        let (dp, qp, pp, up, op) = (
            self.rptr(drafts),
            self.rptr(q),
            self.rptr(p),
            self.rptr(uniforms),
            self.wptr(out),
        );
        let (g, nq_arg, np_arg) = (i32_arg(OP, "gamma", gamma)?, i32_arg(OP, "nq", nq)?, np as i32);
        if self.split_probabilities() {
            // A warp a tile of the vocabulary, two passes (the residual's total, then its
            // normalised tiles and the draw); held until both are queued.
            let s = self.split_scratch.lock().unwrap_or_else(|p| p.into_inner());
            let (vp, tp, lp, cp) = (
                self.rptr(&s.verdict.as_view()),
                self.rptr(&s.tile_sums.as_view()),
                self.rptr(&s.tile_lasts.as_view()),
                self.counters_ptr(),
            );
            let cfg = split_grid(np.div_ceil(SAMPLE_TILE).div_ceil(SPLIT_WARPS), 1);
            self.launch(
                "sampling",
                "verify_sampled_tiles",
                cfg,
                &[&dp, &qp, &pp, &up, &op, &vp, &tp, &lp, &cp, &g, &nq_arg, &np_arg],
            )?;
            return self.launch(
                "sampling",
                "verify_sampled_draw",
                cfg,
                &[&qp, &pp, &up, &op, &vp, &tp, &lp, &cp, &nq_arg, &np_arg],
            );
        }
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 1024),
            &[&dp, &qp, &pp, &up, &op, &g, &nq_arg, &np_arg],
        )
    }

    /// Greedy verification of a token tree of n nodes (node 0 the root; children after
    /// their parent, siblings in proposal order): tokens, parents, argmax: [n] (argmax[i]
    /// the target's argmax after the path to node i). out: [n + 1] ← (m, next,
    /// path[0..m]), the accepted path's node indices root-side first.
    /// Twin: `reference::verify_tree_greedy`.
    pub fn verify_tree_greedy(
        &self,
        tokens: &CudaView<'_, i32>,
        parents: &CudaView<'_, i32>,
        argmax: &CudaView<'_, i32>,
        out: &mut CudaViewMut<'_, i32>,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "verify_tree_greedy";
        check_tree_n(OP, n)?;
        need(OP, "tokens", tokens.len(), n)?;
        need(OP, "parents", parents.len(), n)?;
        need(OP, "argmax", argmax.len(), n)?;
        need(OP, "out", out.len(), n + 1)?;
        let (tp, pp, ap, op) = (self.rptr(tokens), self.rptr(parents), self.rptr(argmax), self.wptr(out));
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 32),
            &[&tp, &pp, &ap, &op, &i32_arg(OP, "n", n)?],
        )
    }

    /// Multi-candidate rejection sampling down a token tree of n nodes into out: [n + 1]
    /// ← (m, next, path[0..m]). tokens, parents: [n]; p: [n, np] the target's distribution
    /// after the path to each node; q: [q_rows, nq] drafter rows and q_row: [n] the row
    /// each node's children were drawn from (-1: none; used with [`Proposal::Sampled`]
    /// only, otherwise children are point-mass proposals); uniforms: [n] (the host RNG's
    /// next draws: one per tested child, then the final draw; see
    /// `reference::tree_uniforms_consumed`); work: [np + nq] scratch ([np] for
    /// [`Proposal::Fixed`]). Twin: `reference::verify_tree_sampled`.
    #[allow(clippy::too_many_arguments)]
    pub fn verify_tree_sampled(
        &self,
        tokens: &CudaView<'_, i32>,
        parents: &CudaView<'_, i32>,
        proposal: Proposal,
        q_row: &CudaView<'_, i32>,
        q: &CudaView<'_, f32>,
        p: &CudaView<'_, f32>,
        uniforms: &CudaView<'_, f64>,
        work: &mut CudaViewMut<'_, f32>,
        out: &mut CudaViewMut<'_, i32>,
        n: usize,
        q_rows: usize,
        nq: usize,
        np: usize,
    ) -> Result<()> {
        const OP: &str = "verify_tree_sampled";
        check_tree_n(OP, n)?;
        check_sample_n(OP, np)?;
        let sampled = proposal == Proposal::Sampled;
        need(OP, "tokens", tokens.len(), n)?;
        need(OP, "parents", parents.len(), n)?;
        need(OP, "p", p.len(), n * np)?;
        need(OP, "uniforms", uniforms.len(), n)?;
        need(OP, "out", out.len(), n + 1)?;
        if sampled {
            need(OP, "q_row", q_row.len(), n)?;
            if q_rows > 0 {
                check_sample_n(OP, nq)?;
            }
            need(OP, "q", q.len(), q_rows * nq)?;
            need(OP, "work", work.len(), np + nq)?;
        } else {
            need(OP, "work", work.len(), np)?;
        }
        let (tp, pa, qr, qp, pp, up, wp, op) = (
            self.rptr(tokens),
            self.rptr(parents),
            self.rptr(q_row),
            self.rptr(q),
            self.rptr(p),
            self.rptr(uniforms),
            self.wptr(work),
            self.wptr(out),
        );
        self.launch(
            "sampling",
            OP,
            block_per_row(1, 1024),
            &[
                &tp,
                &pa,
                &qr,
                &qp,
                &pp,
                &up,
                &wp,
                &op,
                &(n as i32),
                &(sampled as i32),
                &i32_arg(OP, "q_rows", if sampled { q_rows } else { 0 })?,
                &i32_arg(OP, "nq", if sampled { nq } else { 0 })?,
                &(np as i32),
            ],
        )
    }
}

/// Whether top-k / top-p cut a row of n (the kernels' test).
fn cuts(params: &SamplingParams, n: usize) -> bool {
    params.top_p < 1.0 || (params.top_k > 0 && params.top_k < n)
}

/// params.top_k as the kernels take it (0: off; past n, the kernels cut by top-p alone).
fn cut_top_k(params: &SamplingParams) -> i32 {
    params.top_k.min(i32::MAX as usize) as i32
}

fn check_sample_n(op: &str, n: usize) -> Result<()> {
    if n == 0 || n > SAMPLE_MAX_N {
        return Err(shape_err(
            op,
            format!("rows of {n} entries (supported: 1..={SAMPLE_MAX_N})"),
        ));
    }
    Ok(())
}

fn check_tree_n(op: &str, n: usize) -> Result<()> {
    if n == 0 || n > i32::MAX as usize - 2 {
        return Err(shape_err(
            op,
            format!("a tree of {n} nodes (the root counts: at least 1)"),
        ));
    }
    Ok(())
}
