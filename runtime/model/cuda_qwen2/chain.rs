//! Drafted chains: each draft picked on the device into the id buffer the next pass
//! reads, and the passes replayed as one CUDA graph where graphs serve.

use std::sync::atomic::Ordering;

use cudarc::driver::{CudaSlice, DevicePtr};

use crate::config::TextConfig;
use crate::error::Result;
use crate::model::qwen2::{Logits, Positions};
use crate::sampling::SamplingParams;

use super::{err, next_positions, At, CudaKvCache, CudaQwen2, Feed, Head, Input, Scratch, CHAIN_GRAPHS};

/// What a captured chain baked in: it replays only while all of it is unchanged.
#[derive(PartialEq)]
pub(super) struct ChainKey {
    gamma: usize,
    /// The first pass in the graph: 0, or 1 after a first pass run outside it.
    from: usize,
    /// The tokens the graph's first pass is fed (1 or 2; 1 from pass 1 on).
    fed: usize,
    /// The cache: its keys' address, capacity (the attention's splits) and values' address.
    cache: (u64, usize, u64),
    /// The scratch's ids and starts.
    ids: (u64, u64),
    /// A sampled chain's q rows and uniforms (addresses, lengths) and parameters' bits.
    sample: Option<(u64, usize, u64, usize, u32, usize, u32)>,
    /// Whether its kernels were captured as programmatic launches (`CudaDevice::set_pdl`).
    pdl: bool,
    /// Whether a sampled chain's rows took the split probabilities kernels
    /// (`CudaDevice::set_split_probabilities`).
    split: bool,
}

/// How [`CudaQwen2::draft_chain`] picks each draft on the device.
pub enum ChainPick<'a> {
    /// The argmax of the logits (T = 0).
    Argmax,
    /// A draw from the distribution under `params` (`probabilities` kernel), with the
    /// uniform `uniforms[i]` for draft i (`sample` kernel); draft i's distribution is
    /// left in row i of `q` ([γ, V]) for the verification.
    Sample {
        params: &'a SamplingParams,
        q: &'a mut CudaSlice<f32>,
        uniforms: &'a CudaSlice<f64>,
    },
}

impl ChainPick<'_> {
    /// The same pick for one pass.
    fn reborrow(&mut self) -> ChainPick<'_> {
        match self {
            ChainPick::Argmax => ChainPick::Argmax,
            ChainPick::Sample { params, q, uniforms } => ChainPick::Sample { params, q, uniforms },
        }
    }
}

impl CudaQwen2 {
    /// Turns the CUDA graph of drafted chains on or off (on by default where it serves:
    /// 1-D RoPE, no sliding window; MASSV_CUDA_GRAPHS=0 starts it off). Either way the
    /// drafts are the same.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on && graphs_serve(&self.cfg), Ordering::Relaxed);
    }

    /// Whether drafted chains replay as a CUDA graph, or why not.
    pub fn graph_status(&self) -> std::result::Result<(), String> {
        if let Some(why) = self.graph_failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(format!("capturing a chain failed: {why}"));
        }
        if !graphs_serve(&self.cfg) {
            return Err("M-RoPE or sliding-window models draft without graphs".into());
        }
        if !self.graphs.load(Ordering::Relaxed) {
            return Err("turned off (MASSV_CUDA_GRAPHS=0 or set_graphs)".into());
        }
        Ok(())
    }

    /// Drafts a chain of `gamma` tokens: `first` after the cache's committed positions,
    /// then each draft fed back, every pass at the next 1-D positions and committed. Each
    /// draft is picked on the device ([`ChainPick`]) into an id buffer the next pass's
    /// embedding reads, so the host queues all γ passes without waiting for one and a
    /// single copy brings the γ ids back (a pass-by-pass loop waits γ times, and the
    /// GPU idles while the host queues each next pass: a small drafter's step is mostly
    /// launch time). Where graphs serve ([`Self::set_graphs`]) the passes replay as one
    /// CUDA graph, one launch instead of about 5 a layer each: all of them when one or two
    /// tokens are fed (a correction, or the last draft and the bonus after a chain was
    /// accepted whole), those after the first when more are.
    pub fn draft_chain(
        &self,
        first: Input,
        cache: &mut CudaKvCache,
        gamma: usize,
        mut pick: ChainPick,
    ) -> Result<Vec<u32>> {
        const OP: &str = "draft_chain";
        if gamma == 0 {
            return Ok(Vec::new());
        }
        let v = self.cfg.vocab_size;
        if let ChainPick::Sample { q, uniforms, .. } = &pick {
            if q.len() < gamma * v || uniforms.len() < gamma {
                return Err(err(
                    OP,
                    format!(
                        "{gamma} drafts of a {v}-token vocabulary need {} q values and {gamma} uniforms, given {} and {}",
                        gamma * v,
                        q.len(),
                        uniforms.len()
                    ),
                ));
            }
        }
        // The scratch stays locked for the whole chain: its ids live there between passes,
        // where another request's pass would overwrite them.
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        if s.chain.len() < gamma {
            s.chain = self.dev.alloc_zeros(gamma)?;
        }
        let mut feed = Feed::Host(first);
        let mut plain = 0..gamma;
        let kind = usize::from(matches!(pick, ChainPick::Sample { .. }));
        // One or two tokens fed (the usual cases) are read on the device with the drafts,
        // so the graph holds every pass; else the first runs here, the rest in a graph.
        let fed = match first {
            Input::Tokens(t) if t.len() <= 2 && t.iter().all(|&id| (id as usize) < v) => t,
            _ => &[],
        };
        let whole = !fed.is_empty() && (fed.len() == 1 || s.pair_warm);
        if s.chain_warm[kind] && self.graphs.load(Ordering::Relaxed) && (whole || gamma > 1) {
            if !whole {
                self.chain_pass(s, feed, cache, 0, pick.reborrow())?;
                plain = 1..gamma;
                feed = Feed::Drafted(0);
            }
            if self.chain_graph(s, cache, gamma, whole.then_some(fed), pick.reborrow())? {
                plain = 0..0;
            }
        }
        for slot in plain {
            self.chain_pass(s, feed, cache, slot, pick.reborrow())?;
            feed = Feed::Drafted(slot);
        }
        let ids = self.dev.download(&s.chain.slice(..gamma))?;
        Ok(ids.into_iter().map(|id| id as u32).collect())
    }

    /// Pass `slot` of a chain launched here (not from a graph), fed `feed`; marks the
    /// kernels it loaded as warm for a capture.
    fn chain_pass(
        &self,
        s: &mut Scratch,
        feed: Feed,
        cache: &mut CudaKvCache,
        slot: usize,
        pick: ChainPick,
    ) -> Result<()> {
        let n = self.rows(feed)?;
        let kind = usize::from(matches!(pick, ChainPick::Sample { .. }));
        let positions = next_positions(cache, n);
        let head = Head::Chain { pick, slot };
        self.run_in(s, feed, Positions::Seq(&positions), cache, Logits::Last, None, head)?;
        s.chain_warm[kind] |= slot > 0;
        s.pair_warm |= n == 2 && matches!(feed, Feed::Host(Input::Tokens(_)));
        Ok(())
    }

    /// The passes of a chain from its first (fed `first`, one or two tokens) or, with
    /// `first` None, from its second (the first ran): fed the previous draft, at the next
    /// positions, committed; replayed as one CUDA graph, captured on the first such chain
    /// after one ran pass by pass (with the same kind of pick and first pass) and again
    /// when what it baked in changes ([`ChainKey`]). Ok(false): the capture failed (graphs
    /// are then off for this model, the reason kept for [`Self::graph_status`]) and
    /// nothing ran.
    fn chain_graph(
        &self,
        s: &mut Scratch,
        cache: &mut CudaKvCache,
        gamma: usize,
        first: Option<&[u32]>,
        pick: ChainPick,
    ) -> Result<bool> {
        let from = usize::from(first.is_none());
        let fed = first.map_or(1, <[u32]>::len);
        let n = gamma - from + fed - 1;
        cache.reserve(n)?;
        let at_len = gamma + 2 * fed - 1;
        if s.chain_at.len() < at_len {
            s.chain_at = self.dev.alloc_zeros(at_len)?;
        }
        // chain_at ([`Scratch::chain_at`]): token j's position base + j (pass 0 of a chain
        // run whole at base = the cache's length), then the tokens fed; one upload.
        let base = i32::try_from(cache.len()).map_err(|_| err("draft_chain", "cache length exceeds i32"))?;
        let mut chain_in: Vec<i32> = (0..(gamma + fed - 1) as i32).map(|j| base + j - from as i32).collect();
        chain_in.extend(first.unwrap_or(&[0]).iter().map(|&id| id as i32));
        self.dev
            .upload_into(&chain_in, &mut s.chain_at.slice_mut(..chain_in.len()))?;
        let stream = self.dev.stream();
        let addr = |p: (u64, _)| p.0;
        let key = ChainKey {
            gamma,
            from,
            fed,
            cache: (
                addr(cache.k.device_ptr(stream)),
                cache.capacity(),
                addr(cache.v.device_ptr(stream)),
            ),
            ids: (addr(s.chain.device_ptr(stream)), addr(s.chain_at.device_ptr(stream))),
            sample: match &pick {
                ChainPick::Argmax => None,
                ChainPick::Sample { params, q, uniforms } => Some((
                    addr(q.device_ptr(stream)),
                    q.len(),
                    addr(uniforms.device_ptr(stream)),
                    uniforms.len(),
                    params.temperature.to_bits(),
                    params.top_k,
                    params.top_p.to_bits(),
                )),
            },
            pdl: self.dev.pdl(),
            split: self.dev.split_probabilities(),
        };
        let found = s.chain_graphs.iter().position(|(k, _)| *k == key);
        if found.is_none() {
            if s.chain_graphs.len() == CHAIN_GRAPHS {
                s.chain_graphs.remove(0);
            }
            let mut pick = pick;
            let captured = self.dev.capture(|| {
                for slot in from..gamma {
                    self.pass_at(s, cache, gamma, fed, slot, pick.reborrow())?;
                }
                Ok(())
            });
            match captured {
                Ok(graph) => s.chain_graphs.push((key, graph)),
                Err(e) => {
                    self.graphs.store(false, Ordering::Relaxed);
                    *self.graph_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    return Ok(false);
                }
            }
        }
        let at = found.unwrap_or(s.chain_graphs.len() - 1);
        self.dev.launch_graph(&s.chain_graphs[at].1)?;
        cache.commit(n)?;
        Ok(true)
    }

    /// Pass `slot` of a chain as a graph holds it, its positions read on the device
    /// ([`Scratch::chain_at`]): the draft of slot − 1, or for slot 0 the `fed` tokens
    /// uploaded; its draft into slot `slot`.
    fn pass_at(
        &self,
        s: &mut Scratch,
        cache: &mut CudaKvCache,
        gamma: usize,
        fed: usize,
        slot: usize,
        pick: ChainPick,
    ) -> Result<()> {
        let d = self.cfg.hidden_size;
        let (ids, n, at) = match slot {
            0 => (s.chain_at.slice(gamma + fed - 1..gamma + 2 * fed - 1), fed, 0),
            _ => (s.chain.slice(slot - 1..slot), 1, slot + fed - 1),
        };
        self.dev
            .embedding(&ids, &self.embed.as_view(), &mut s.hidden.as_view_mut(), n, d)?;
        self.layers(s, cache, At::Device(at), n, None)?;
        self.head(s, n, n - 1..n, &mut Head::Chain { pick, slot })
    }
}

/// Whether a drafted chain's passes can replay as one CUDA graph: each reads its start
/// on the device as its one 1-D position (not M-RoPE's three), and no layer's window
/// moves with the length.
pub(super) fn graphs_serve(c: &TextConfig) -> bool {
    c.mrope_section.is_none() && (0..c.num_hidden_layers).all(|l| c.layer_window(l).is_none())
}
