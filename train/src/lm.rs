//! The Qwen2 decoder LM (the drafter, or the LM inside Qwen2.5-VL) with a forward pass
//! that keeps its activations and the matching backward: embedding (with rows replaced by
//! given input embeddings, e.g. projector outputs at the image placeholders, whose
//! gradients are returned), RMSNorm, 1-D RoPE or M-RoPE, causal GQA attention, SwiGLU,
//! tied or untied head, and cross-entropy over the selected (response) tokens only.
//!
//! Tensor names are the Hugging Face ones (`{prefix}layers.{i}.self_attn.q_proj.weight`, …),
//! so a [`Params`] read from a checkpoint trains in place and saves back to the same layout.

use std::collections::BTreeMap;

use massv::config::TextConfig;
use massv::model::qwen2::{self, Positions};
use massv::{Error, Result};

use crate::ops::{self, AttnShape};
use crate::params::Params;

/// Which LM of a checkpoint: its config and where its tensors live.
#[derive(Debug, Clone, Copy)]
pub struct LmSpec<'a> {
    pub cfg: &'a TextConfig,
    /// "model." (Qwen2, hub Qwen2.5-VL) or "model.language_model." (transformers 5).
    pub prefix: &'a str,
}

impl LmSpec<'_> {
    pub fn name(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn layer(&self, l: usize, rest: &str) -> String {
        format!("{}layers.{l}.{rest}", self.prefix)
    }

    pub fn embed_name(&self) -> String {
        self.name("embed_tokens.weight")
    }

    /// The output projection: `lm_head.weight`, or the embedding table when tied.
    pub fn head_name(&self) -> String {
        if self.cfg.tie_word_embeddings {
            self.embed_name()
        } else {
            "lm_head.weight".to_string()
        }
    }

    /// Every tensor of the LM with its shape (the runtime's inventory).
    pub fn expected_tensors(&self) -> BTreeMap<String, Vec<usize>> {
        qwen2::expected_tensors(self.cfg, qwen2::Names { prefix: self.prefix })
    }
}

/// One sequence through the LM.
#[derive(Debug, Clone, Copy)]
pub struct LmInput<'a> {
    pub ids: &'a [u32],
    /// 1-D positions (one per token) or M-RoPE positions [3, n].
    pub positions: Positions<'a>,
    /// Token positions whose embedding is replaced by a row of `embed_rows` (in order).
    pub embed_slots: &'a [usize],
    /// [embed_slots.len(), hidden] replacement rows.
    pub embed_rows: &'a [f32],
    /// Token i (i ≥ 1) is a prediction target, scored on the logits of row i − 1, when
    /// `loss_mask[i]`; one flag per token.
    pub loss_mask: &'a [bool],
    /// Ids outside the embedding table embed as zero rows (what the runtime's drafter does
    /// with the target's extra vocabulary) instead of being an error; targets outside the
    /// head's vocabulary are skipped (counted in [`LmLoss::skipped`]) either way.
    pub lossy_oov: bool,
}

/// What one sequence contributed.
#[derive(Debug, Clone, Default)]
pub struct LmLoss {
    /// Σ cross-entropy over the scored tokens (nats).
    pub loss_sum: f64,
    /// Tokens scored.
    pub tokens: usize,
    /// Masked-in targets the head cannot predict (id ≥ vocab).
    pub skipped: usize,
    /// d(loss_sum)/d(embed_rows), [slots, hidden] (empty without gradients).
    pub d_embed_rows: Vec<f32>,
}

struct LayerAct {
    x: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lse: Vec<f32>,
    attn: Vec<f32>,
    x_mid: Vec<f32>,
    h2: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
}

enum Rot {
    Seq(Vec<i32>),
    Multi(Vec<i32>, [usize; 3]),
}

impl Rot {
    fn apply(&self, x: &mut [f32], heads: usize, hd: usize, theta: f32) {
        match self {
            Rot::Seq(p) => ops::rope(x, p, heads, hd, theta),
            Rot::Multi(p, s) => ops::mrope(x, p, *s, heads, hd, theta),
        }
    }

    fn unapply(&self, x: &mut [f32], heads: usize, hd: usize, theta: f32) {
        match self {
            Rot::Seq(p) => ops::rope_backward(x, p, heads, hd, theta),
            Rot::Multi(p, s) => ops::mrope_backward(x, p, *s, heads, hd, theta),
        }
    }
}

/// The forward pass with everything the backward needs.
struct Forward {
    n: usize,
    /// The embedding of each token, None where replaced or out of the table.
    table_ids: Vec<Option<u32>>,
    rot: Rot,
    layers: Vec<LayerAct>,
    x_final: Vec<f32>,
}

fn gather_rows(x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

fn split_cols(x: &[f32], a: usize, b: usize) -> (Vec<f32>, Vec<f32>) {
    let mut l = Vec::with_capacity(x.len() / (a + b) * a);
    let mut r = Vec::with_capacity(x.len() / (a + b) * b);
    for row in x.chunks_exact(a + b) {
        l.extend_from_slice(&row[..a]);
        r.extend_from_slice(&row[a..]);
    }
    (l, r)
}

fn validate(spec: &LmSpec, inp: &LmInput) -> Result<Rot> {
    let c = spec.cfg;
    let n = inp.ids.len();
    if n == 0 {
        return Err(Error::InvalidArgument("empty sequence".into()));
    }
    if inp.loss_mask.len() != n {
        return Err(Error::InvalidArgument(format!(
            "loss mask has {} flags for {n} tokens",
            inp.loss_mask.len()
        )));
    }
    if inp.embed_rows.len() != inp.embed_slots.len() * c.hidden_size {
        return Err(Error::InvalidArgument(format!(
            "{} replacement values for {} slots of width {}",
            inp.embed_rows.len(),
            inp.embed_slots.len(),
            c.hidden_size
        )));
    }
    let mut seen = vec![false; n];
    for &s in inp.embed_slots {
        if s >= n || std::mem::replace(&mut seen[s], true) {
            return Err(Error::InvalidArgument(format!(
                "embedding slot {s} is out of range or repeated ({n} tokens)"
            )));
        }
    }
    let (given, want) = match inp.positions {
        Positions::Seq(p) => (p.len(), n),
        Positions::Multi(p) => (p.len(), 3 * n),
    };
    if given != want {
        return Err(Error::InvalidArgument(format!(
            "{given} position values for {n} tokens"
        )));
    }
    // As the runtime: text positions under M-RoPE repeat on the three axes.
    Ok(match (inp.positions, c.mrope_section) {
        (Positions::Seq(p), None) => Rot::Seq(p.to_vec()),
        (Positions::Seq(p), Some(s)) => Rot::Multi(p.repeat(3), s),
        (Positions::Multi(p), Some(s)) => Rot::Multi(p.to_vec(), s),
        (Positions::Multi(_), None) => {
            return Err(Error::InvalidArgument(
                "3-D positions given to a model without mrope_section".into(),
            ))
        }
    })
}

fn forward(params: &Params, spec: &LmSpec, inp: &LmInput) -> Result<Forward> {
    let rot = validate(spec, inp)?;
    let c = spec.cfg;
    let (d, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let n = inp.ids.len();
    let eps = c.rms_norm_eps as f32;
    let theta = c.rope_theta as f32;
    let table = params.get(&spec.embed_name())?;
    let mut x = vec![0.0f32; n * d];
    let mut table_ids = vec![None; n];
    let mut slot_of = vec![usize::MAX; n];
    for (j, &s) in inp.embed_slots.iter().enumerate() {
        slot_of[s] = j;
    }
    for (i, &id) in inp.ids.iter().enumerate() {
        let row = &mut x[i * d..(i + 1) * d];
        if slot_of[i] != usize::MAX {
            row.copy_from_slice(&inp.embed_rows[slot_of[i] * d..][..d]);
        } else if (id as usize) < c.vocab_size {
            row.copy_from_slice(&table[id as usize * d..][..d]);
            table_ids[i] = Some(id);
        } else if !inp.lossy_oov {
            return Err(Error::TokenOutOfRange {
                id,
                vocab: c.vocab_size,
            });
        }
    }
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let w = |rest: &str| params.get(&spec.layer(l, rest));
        let h1 = ops::rmsnorm(&x, w("input_layernorm.weight")?, d, eps);
        let mut q = ops::linear(&h1, w("self_attn.q_proj.weight")?, Some(w("self_attn.q_proj.bias")?), d);
        let mut k = ops::linear(&h1, w("self_attn.k_proj.weight")?, Some(w("self_attn.k_proj.bias")?), d);
        let v = ops::linear(&h1, w("self_attn.v_proj.weight")?, Some(w("self_attn.v_proj.bias")?), d);
        rot.apply(&mut q, c.num_attention_heads, c.head_dim, theta);
        rot.apply(&mut k, c.num_key_value_heads, c.head_dim, theta);
        let shape = attn_shape(c, l, n);
        let (attn, lse) = ops::attention_forward(&q, &k, &v, shape);
        let mut x_mid = x.clone();
        ops::add_into(&mut x_mid, &ops::linear(&attn, w("self_attn.o_proj.weight")?, None, qd));
        let h2 = ops::rmsnorm(&x_mid, w("post_attention_layernorm.weight")?, d, eps);
        let g = ops::linear(&h2, w("mlp.gate_proj.weight")?, None, d);
        let u = ops::linear(&h2, w("mlp.up_proj.weight")?, None, d);
        let mut gu = Vec::with_capacity(2 * n * inter);
        for (gr, ur) in g.chunks_exact(inter).zip(u.chunks_exact(inter)) {
            gu.extend_from_slice(gr);
            gu.extend_from_slice(ur);
        }
        let act = ops::swiglu(&gu, inter);
        let mut x_out = x_mid.clone();
        ops::add_into(&mut x_out, &ops::linear(&act, w("mlp.down_proj.weight")?, None, inter));
        debug_assert_eq!(k.len(), n * kvd);
        layers.push(LayerAct {
            x: std::mem::replace(&mut x, x_out),
            h1,
            q,
            k,
            v,
            lse,
            attn,
            x_mid,
            h2,
            gu,
            act,
        });
    }
    Ok(Forward {
        n,
        table_ids,
        rot,
        layers,
        x_final: x,
    })
}

fn attn_shape(c: &TextConfig, l: usize, n: usize) -> AttnShape {
    AttnShape {
        tokens: n,
        q_heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        window: c.layer_window(l),
    }
}

/// Logits of every position, [n, vocab] (evaluation; equals the runtime's forward).
pub fn logits(params: &Params, spec: &LmSpec, inp: &LmInput) -> Result<Vec<f32>> {
    let f = forward(params, spec, inp)?;
    let c = spec.cfg;
    let normed = ops::rmsnorm(
        &f.x_final,
        params.get(&spec.name("norm.weight"))?,
        c.hidden_size,
        c.rms_norm_eps as f32,
    );
    Ok(ops::linear(
        &normed,
        params.get(&spec.head_name())?,
        None,
        c.hidden_size,
    ))
}

fn grad<'a>(g: &'a mut Option<&mut Params>, name: &str) -> Option<&'a mut [f32]> {
    g.as_deref_mut().and_then(|p| p.get_mut(name))
}

/// Cross-entropy of the masked tokens, summed, and (with `grads`) its gradient added into
/// every tensor `grads` holds (tensors it lacks are frozen and get no weight gradient).
pub fn loss(params: &Params, mut grads: Option<&mut Params>, spec: &LmSpec, inp: &LmInput) -> Result<LmLoss> {
    let c = spec.cfg;
    let (d, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let eps = c.rms_norm_eps as f32;
    let theta = c.rope_theta as f32;
    let f = forward(params, spec, inp)?;
    let n = f.n;
    // Rows whose next token is a target the head can predict.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut skipped = 0;
    for i in 1..n {
        if inp.loss_mask[i] {
            if (inp.ids[i] as usize) < c.vocab_size {
                rows.push(i - 1);
                targets.push(inp.ids[i]);
            } else {
                skipped += 1;
            }
        }
    }
    let norm_w = params.get(&spec.name("norm.weight"))?;
    let head = params.get(&spec.head_name())?;
    let xs = gather_rows(&f.x_final, &rows, d);
    let normed = ops::rmsnorm(&xs, norm_w, d, eps);
    let logits = ops::linear(&normed, head, None, d);
    let mut dlogits = vec![0.0f32; logits.len()];
    let loss_sum = if rows.is_empty() {
        0.0
    } else {
        ops::cross_entropy(&logits, &targets, 1.0, &mut dlogits)
    };
    let mut out = LmLoss {
        loss_sum,
        tokens: rows.len(),
        skipped,
        d_embed_rows: Vec::new(),
    };
    if grads.is_none() {
        return Ok(out);
    }

    // Head and final norm.
    let mut dnormed = vec![0.0f32; normed.len()];
    ops::linear_backward(
        &dlogits,
        &normed,
        head,
        d,
        Some(&mut dnormed),
        grad(&mut grads, &spec.head_name()),
        None,
    );
    let mut dxs = vec![0.0f32; xs.len()];
    ops::rmsnorm_backward(
        &dnormed,
        &xs,
        norm_w,
        d,
        eps,
        Some(&mut dxs),
        grad(&mut grads, &spec.name("norm.weight")),
    );
    let mut dx = vec![0.0f32; n * d];
    for (j, &r) in rows.iter().enumerate() {
        ops::add_into(&mut dx[r * d..(r + 1) * d], &dxs[j * d..(j + 1) * d]);
    }

    for (l, a) in f.layers.iter().enumerate().rev() {
        let w = |rest: &str| params.get(&spec.layer(l, rest));
        let name = |rest: &str| spec.layer(l, rest);
        // MLP.
        let mut d_act = vec![0.0f32; n * inter];
        ops::linear_backward(
            &dx,
            &a.act,
            w("mlp.down_proj.weight")?,
            inter,
            Some(&mut d_act),
            grad(&mut grads, &name("mlp.down_proj.weight")),
            None,
        );
        let mut d_gu = vec![0.0f32; 2 * n * inter];
        ops::swiglu_backward(&d_act, &a.gu, inter, &mut d_gu);
        let (dg, du) = split_cols(&d_gu, inter, inter);
        let mut d_h2 = vec![0.0f32; n * d];
        ops::linear_backward(
            &dg,
            &a.h2,
            w("mlp.gate_proj.weight")?,
            d,
            Some(&mut d_h2),
            grad(&mut grads, &name("mlp.gate_proj.weight")),
            None,
        );
        ops::linear_backward(
            &du,
            &a.h2,
            w("mlp.up_proj.weight")?,
            d,
            Some(&mut d_h2),
            grad(&mut grads, &name("mlp.up_proj.weight")),
            None,
        );
        let mut dx_mid = dx;
        ops::rmsnorm_backward(
            &d_h2,
            &a.x_mid,
            w("post_attention_layernorm.weight")?,
            d,
            eps,
            Some(&mut dx_mid),
            grad(&mut grads, &name("post_attention_layernorm.weight")),
        );
        // Attention.
        let mut d_attn = vec![0.0f32; n * qd];
        ops::linear_backward(
            &dx_mid,
            &a.attn,
            w("self_attn.o_proj.weight")?,
            qd,
            Some(&mut d_attn),
            grad(&mut grads, &name("self_attn.o_proj.weight")),
            None,
        );
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; n * qd], vec![0.0f32; n * kvd], vec![0.0f32; n * kvd]);
        ops::attention_backward(
            &d_attn,
            &a.q,
            &a.k,
            &a.v,
            &a.lse,
            attn_shape(c, l, n),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        f.rot.unapply(&mut dq, c.num_attention_heads, c.head_dim, theta);
        f.rot.unapply(&mut dk, c.num_key_value_heads, c.head_dim, theta);
        let mut d_h1 = vec![0.0f32; n * d];
        for (dy, proj) in [(&dq, "q_proj"), (&dk, "k_proj"), (&dv, "v_proj")] {
            let wn = format!("self_attn.{proj}.weight");
            let bn = format!("self_attn.{proj}.bias");
            ops::linear_backward(
                dy,
                &a.h1,
                w(&wn)?,
                d,
                Some(&mut d_h1),
                grad(&mut grads, &name(&wn)),
                None,
            );
            ops::linear_backward(dy, &a.h1, w(&wn)?, d, None, None, grad(&mut grads, &name(&bn)));
        }
        let mut dx_in = dx_mid;
        ops::rmsnorm_backward(
            &d_h1,
            &a.x,
            w("input_layernorm.weight")?,
            d,
            eps,
            Some(&mut dx_in),
            grad(&mut grads, &name("input_layernorm.weight")),
        );
        dx = dx_in;
    }
    if let Some(dt) = grad(&mut grads, &spec.embed_name()) {
        ops::embedding_backward(&dx, &f.table_ids, d, dt);
    }
    out.d_embed_rows = gather_rows(&dx, inp.embed_slots, d);
    Ok(out)
}
