//! A pass's decoder layers and LM head over the block of tokens in the scratch.

use cudarc::driver::CudaSlice;

use crate::backend::cuda::{AttnShape, DeviceLen, GemvFuse, GEMV_MAX_ROWS};
use crate::error::Result;
use crate::sampling::SamplingParams;

use super::{err, gemv_block, graphs_serve, At, ChainPick, CudaKvCache, CudaQwen2, LmHead, Scratch, HEAD_ROWS};

/// Where the head's rows go.
pub(super) enum Head<'a> {
    Logits(&'a mut Vec<f32>),
    Argmax(&'a mut Vec<u32>),
    /// Each row's distribution under `params` (`probabilities` kernel), copied back.
    HostProbs {
        params: &'a SamplingParams,
        out: &'a mut Vec<f32>,
    },
    /// Each row's `k` most likely tokens with their probabilities (`top_k` kernel).
    TopK {
        k: usize,
        out: &'a mut Vec<Vec<(u32, f32)>>,
    },
    /// The processed distributions (`probabilities` kernel) into device rows, from row
    /// `next` of the buffer on: they never leave the device.
    Probs {
        out: &'a mut CudaSlice<f32>,
        params: &'a SamplingParams,
        next: usize,
    },
    /// The last row's draft ([`ChainPick`]) into slot `slot` of the scratch's `chain`:
    /// nothing is copied back.
    Chain {
        pick: ChainPick<'a>,
        slot: usize,
    },
    /// Nowhere: the head is not run.
    Skip,
}

impl CudaQwen2 {
    /// The decoder layers on the block of n tokens in `s.hidden`, at cache positions
    /// start.. (their keys and values written there), rotary positions at the head of
    /// `s.step_in` (or, for [`At::Device`], a few tokens whose start and positions are
    /// read on the device). A GEMV block (n ≤ GEMV_MAX_ROWS) leaves the residual stream whole in
    /// `s.hidden`; a GEMM block leaves the last layer's down_proj output in `s.proj`, not
    /// yet added ([`Self::head`] takes either).
    pub(super) fn layers(
        &self,
        s: &mut Scratch,
        cache: &mut CudaKvCache,
        at: At,
        n: usize,
        mask_start: Option<usize>,
    ) -> Result<()> {
        let (dev, c) = (&*self.dev, &self.cfg);
        let (start, on_device) = match at {
            At::Host(start) => (start, None),
            At::Device(i) if gemv_block(n) && mask_start.is_none() && graphs_serve(c) => (0, Some(i)),
            At::Device(_) => return Err(err("forward", "a start on the device serves a few 1-D causal tokens")),
        };
        let capacity = cache.capacity();
        let (d, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (eps, theta) = (c.rms_norm_eps as f32, c.rope_theta as f32);
        let qkv_width = qd + 2 * kvd;
        let pos_len = if c.mrope_section.is_some() { 3 * n } else { n };
        let shape = AttnShape {
            n,
            start,
            q_heads: hq,
            kv_heads: hkv,
            head_dim: hd,
        };
        let gemv = gemv_block(n);
        let ones = self.ones.as_view();
        for (l, w) in self.layers.iter().enumerate() {
            let (wv, bv) = (w.qkv_w.as_view(), w.qkv_b.as_view());
            // RoPE's positions and the cache rows' start: on the host, or read on the device.
            let at_view = on_device.map(|i| s.chain_at.slice(i..i + 1));
            let (pos, section, len_at) = match (on_device, &at_view) {
                (Some(i), Some(at)) => (s.chain_at.slice(i..i + n), None, Some(DeviceLen { at, capacity })),
                _ => (s.step_in.slice(..pos_len), c.mrope_section, None),
            };
            let (mut kc, mut vc) = cache.layer_mut(l);
            let mut q = s.q.slice_mut(..n * qd);
            if gemv && hd % 4 == 0 {
                // One launch: the QKV GEMV (its rows RMS-scaled on the way in) writes the
                // rotated queries and the cache rows itself.
                let (x, mut sv) = (s.hidden.slice(..n * d), s.gemv.as_view_mut());
                dev.gemv_rope_kv_append(
                    &x,
                    &wv,
                    Some(&bv),
                    Some(&mut sv),
                    &pos,
                    &mut q,
                    &mut kc,
                    &mut vc,
                    shape,
                    d,
                    Some(eps),
                    theta,
                    section,
                    len_at,
                )?;
            } else {
                let mut qkv = s.qkv.slice_mut(..n * qkv_width);
                if gemv {
                    let (x, mut sv) = (s.hidden.slice(..n * d), s.gemv.as_view_mut());
                    let fuse = GemvFuse::rms(eps);
                    dev.gemv_bf16(&x, &wv, Some(&bv), &mut qkv, Some(&mut sv), n, qkv_width, d, fuse)?;
                } else {
                    let mut normed = s.normed.slice_mut(..n * d);
                    if l == 0 {
                        dev.rmsnorm(&s.hidden.slice(..n * d), &ones, &mut normed, n, d, eps)?;
                    } else {
                        let mut hidden = s.hidden.slice_mut(..n * d);
                        dev.rmsnorm_residual(&s.proj.slice(..n * d), &mut hidden, &ones, &mut normed, n, d, eps)?;
                    }
                    dev.linear(&s.normed.slice(..n * d), &wv, Some(&bv), &mut qkv, n, qkv_width, d)?;
                }
                let qkv = s.qkv.slice(..n * qkv_width);
                dev.rope_kv_append(&qkv, &pos, &mut q, &mut kc, &mut vc, shape, theta, section, len_at)?;
            }
            let (kc, vc) = cache.layer(l);
            let q = s.q.slice(..n * qd);
            let mut out = s.attn.slice_mut(..n * qd);
            match (mask_start, c.layer_window(l), on_device) {
                (None, None, Some(i)) => {
                    let at = s.chain_at.slice(i..i + 1);
                    let len = DeviceLen { at: &at, capacity };
                    let sc = &mut s.attn_split;
                    if n == 1 {
                        dev.attention_decode_at(&q, &kc, &vc, &mut out, len, hq, hkv, hd, sc)?
                    } else {
                        dev.attention_prefill_at(&q, &kc, &vc, &mut out, len, n, hq, hkv, hd, sc)?
                    }
                }
                (Some(ms), _, _) => {
                    dev.attention_verify(&q, &kc, &vc, &mut out, &s.mask.as_view(), ms, shape, &mut s.attn_split)?
                }
                (None, None, _) if n == 1 => {
                    dev.attention_decode(&q, &kc, &vc, &mut out, start + 1, hq, hkv, hd, &mut s.attn_split)?
                }
                (None, window, _) => {
                    dev.attention_prefill(&q, &kc, &vc, &mut out, shape, window, Some(&mut s.attn_split))?
                }
            }
            let attn = s.attn.slice(..n * qd);
            let mut act = s.act.slice_mut(..n * inter);
            if gemv {
                let mut hidden = s.hidden.slice_mut(..n * d);
                let o_w = w.o_w.as_view();
                let mut sv = s.gemv.as_view_mut();
                dev.gemv_bf16(&attn, &o_w, None, &mut hidden, Some(&mut sv), n, d, qd, GemvFuse::ADD)?;
                let (x, mut sv) = (s.hidden.slice(..n * d), s.gemv.as_view_mut());
                dev.gemv_swiglu(
                    &x,
                    &w.gate_up_w.as_view(),
                    &mut act,
                    Some(&mut sv),
                    n,
                    inter,
                    d,
                    Some(eps),
                )?;
                let (act, mut hidden) = (s.act.slice(..n * inter), s.hidden.slice_mut(..n * d));
                let down_w = w.down_w.as_view();
                let mut sv = s.gemv.as_view_mut();
                dev.gemv_bf16(
                    &act,
                    &down_w,
                    None,
                    &mut hidden,
                    Some(&mut sv),
                    n,
                    d,
                    inter,
                    GemvFuse::ADD,
                )?;
            } else {
                dev.linear(&attn, &w.o_w.as_view(), None, &mut s.proj.slice_mut(..n * d), n, d, qd)?;
                let (mut hidden, mut normed) = (s.hidden.slice_mut(..n * d), s.normed.slice_mut(..n * d));
                dev.rmsnorm_residual(&s.proj.slice(..n * d), &mut hidden, &ones, &mut normed, n, d, eps)?;
                let (x, mut gu) = (s.normed.slice(..n * d), s.gate_up.slice_mut(..n * 2 * inter));
                dev.linear(&x, &w.gate_up_w.as_view(), None, &mut gu, n, 2 * inter, d)?;
                dev.swiglu(&s.gate_up.slice(..n * 2 * inter), &mut act, n, inter)?;
                let (act, mut proj) = (s.act.slice(..n * inter), s.proj.slice_mut(..n * d));
                dev.linear(&act, &w.down_w.as_view(), None, &mut proj, n, d, inter)?;
            }
        }
        Ok(())
    }

    /// Final norm of `rows` of a block of n (after the pending residual add of a GEMM
    /// block, see [`Self::layers`]), then the LM head on them: logits copied back in
    /// groups of GEMV rows, or what the device makes of them in groups of [`HEAD_ROWS`]
    /// (a GEMM over more than a GEMV's rows). A folded head on a GEMV block norms its
    /// input rows itself.
    pub(super) fn head(&self, s: &mut Scratch, n: usize, rows: std::ops::Range<usize>, out: &mut Head) -> Result<()> {
        let (dev, c) = (&*self.dev, &self.cfg);
        let (d, v, eps) = (c.hidden_size, c.vocab_size, c.rms_norm_eps as f32);
        let (r0, r1) = (rows.start, rows.end);
        let (w, norm, folded) = match &self.lm_head {
            LmHead::Tied { norm } => (&self.embed, norm, false),
            LmHead::Folded(w) => (w, &self.ones, true),
        };
        let fused = folded && gemv_block(n);
        if !fused {
            let (norm, span) = (norm.as_view(), r0 * d..r1 * d);
            let mut normed = s.normed.slice_mut(span.clone());
            if gemv_block(n) {
                dev.rmsnorm(&s.hidden.slice(span), &norm, &mut normed, r1 - r0, d, eps)?;
            } else {
                let mut hidden = s.hidden.slice_mut(span.clone());
                dev.rmsnorm_residual(&s.proj.slice(span), &mut hidden, &norm, &mut normed, r1 - r0, d, eps)?;
            }
        }
        let w = w.as_view();
        let group = match out {
            Head::Logits(_) | Head::HostProbs { .. } => GEMV_MAX_ROWS,
            _ => HEAD_ROWS,
        };
        for g0 in (r0..r1).step_by(group) {
            let g1 = (g0 + group).min(r1);
            let g = g1 - g0;
            let mut y = s.logits.slice_mut(..g * v);
            let gemm = g > GEMV_MAX_ROWS;
            if gemm {
                // More rows than a GEMV block (n > g): normed above.
                dev.gemm_bf16_f32(&s.normed.slice(g0 * d..g1 * d), &w, &mut y, g, v, d)?;
            } else {
                let (x, fuse) = if fused {
                    (s.hidden.slice(g0 * d..g1 * d), GemvFuse::rms(eps))
                } else {
                    (s.normed.slice(g0 * d..g1 * d), GemvFuse::NONE)
                };
                let mut sv = s.gemv.as_view_mut();
                // A greedy head's argmax is the GEMV's epilogue (no argmax launch below).
                let ids = match out {
                    Head::Argmax(_) => Some(s.argmax.slice_mut(g0..g1)),
                    Head::Chain {
                        pick: ChainPick::Argmax,
                        slot,
                    } => Some(s.chain.slice_mut(*slot..*slot + 1)),
                    _ => None,
                };
                match ids {
                    Some(mut ids) => {
                        dev.gemv_bf16_argmax(&x, &w, None, &mut y, &mut ids, Some(&mut sv), g, v, d, fuse)?
                    }
                    None => dev.gemv_bf16_f32(&x, &w, None, &mut y, Some(&mut sv), g, v, d, fuse)?,
                }
            }
            match out {
                Head::Logits(o) => o.extend(dev.download(&s.logits.slice(..g * v))?),
                Head::Argmax(_) if gemm => {
                    dev.argmax(&s.logits.slice(..g * v), &mut s.argmax.slice_mut(g0..g1), g, v)?
                }
                Head::Argmax(_) => {}
                Head::HostProbs { params, out } => {
                    dev.probabilities(&s.logits.slice(..g * v), &mut s.probs.slice_mut(..g * v), g, v, params)?;
                    out.extend(dev.download(&s.probs.slice(..g * v))?);
                }
                Head::TopK { k, .. } => dev.top_k(
                    &s.logits.slice(..g * v),
                    &mut s.top_ids.slice_mut(g0 * *k..g1 * *k),
                    &mut s.top_probs.slice_mut(g0 * *k..g1 * *k),
                    g,
                    v,
                    *k,
                )?,
                Head::Probs { out, params, next } => {
                    let (a, b) = (*next * v, (*next + g) * v);
                    if b > out.len() {
                        return Err(err(
                            "forward_probs",
                            format!("{} output rows of {v} hold fewer than row {}", out.len() / v, *next + g),
                        ));
                    }
                    dev.probabilities(&s.logits.slice(..g * v), &mut out.slice_mut(a..b), g, v, params)?;
                    *next += g;
                }
                Head::Chain { pick, slot } => {
                    // Only the last row's logits reach a chain's head (Logits::Last).
                    let mut id = s.chain.slice_mut(*slot..*slot + 1);
                    match pick {
                        ChainPick::Argmax if gemm => dev.argmax(&s.logits.slice(..v), &mut id, 1, v)?,
                        ChainPick::Argmax => {}
                        ChainPick::Sample { params, q, uniforms } => {
                            let row = *slot * v..(*slot + 1) * v;
                            let u = uniforms.slice(*slot..*slot + 1);
                            dev.probabilities_sample(
                                &s.logits.slice(..v),
                                &mut q.slice_mut(row),
                                &u,
                                &mut id,
                                1,
                                v,
                                params,
                            )?;
                        }
                    }
                }
                Head::Skip => {}
            }
        }
        match out {
            Head::Argmax(o) => o.extend(dev.download(&s.argmax.slice(r0..r1))?.iter().map(|&i| i as u32)),
            Head::TopK { k, out } => {
                let ids = dev.download(&s.top_ids.slice(r0 * *k..r1 * *k))?;
                let probs = dev.download(&s.top_probs.slice(r0 * *k..r1 * *k))?;
                for (ri, rp) in ids.chunks_exact(*k).zip(probs.chunks_exact(*k)) {
                    // Ids past the row's last non-zero probability are -1.
                    let row = ri
                        .iter()
                        .zip(rp)
                        .map_while(|(&i, &p)| u32::try_from(i).ok().map(|i| (i, p)));
                    out.push(row.collect());
                }
            }
            _ => {}
        }
        Ok(())
    }
}
