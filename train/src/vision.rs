//! The MASSV projector and the Qwen2.5-VL merger, which are the same op chain:
//! RMSNorm per patch → concatenate the m² patches of a merged unit → fc1 → GELU (erf) →
//! fc2 → un-permute from window order to raster order. Forward with cached activations,
//! and backward into the weights (and optionally into the vision features).

use massv::{Error, Result};

use crate::ops;
use crate::params::Params;

/// Name prefix of the projector's tensors inside a training [`Params`] (stripped on save:
/// `projector.safetensors` holds `norm.weight`, `fc1.weight`, …).
pub const PROJECTOR_PREFIX: &str = "projector.";

/// Where the five tensors of a projector / merger live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergerNames {
    pub norm: String,
    pub fc1_w: String,
    pub fc1_b: String,
    pub fc2_w: String,
    pub fc2_b: String,
}

impl MergerNames {
    /// A MASSV projector inside training params (`projector.norm.weight`, …).
    pub fn projector() -> Self {
        let p = PROJECTOR_PREFIX;
        MergerNames {
            norm: format!("{p}norm.weight"),
            fc1_w: format!("{p}fc1.weight"),
            fc1_b: format!("{p}fc1.bias"),
            fc2_w: format!("{p}fc2.weight"),
            fc2_b: format!("{p}fc2.bias"),
        }
    }

    /// The merger of a Qwen2.5-VL vision tower whose tensors start with `visual_prefix`
    /// ("visual." in hub checkpoints, "model.visual." in transformers 5).
    pub fn qwen2_5_vl(visual_prefix: &str) -> Self {
        let p = format!("{visual_prefix}merger.");
        MergerNames {
            norm: format!("{p}ln_q.weight"),
            fc1_w: format!("{p}mlp.0.weight"),
            fc1_b: format!("{p}mlp.0.bias"),
            fc2_w: format!("{p}mlp.2.weight"),
            fc2_b: format!("{p}mlp.2.bias"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [&self.norm, &self.fc1_w, &self.fc1_b, &self.fc2_w, &self.fc2_b]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergerSpec {
    pub names: MergerNames,
    /// Dv: width of one patch feature.
    pub vision_hidden: usize,
    /// m: patches are merged m×m.
    pub merge: usize,
    pub eps: f32,
}

impl MergerSpec {
    pub fn unit(&self) -> usize {
        self.merge * self.merge
    }
}

/// Activations of one image through the projector.
pub struct MergerCache {
    input: Vec<f32>,
    normed: Vec<f32>,
    pre_gelu: Vec<f32>,
    hidden: Vec<f32>,
    window_index: Vec<usize>,
    out_dim: usize,
}

impl MergerCache {
    /// Merged tokens (output rows).
    pub fn units(&self) -> usize {
        self.window_index.len()
    }
}

fn dims(params: &Params, spec: &MergerSpec) -> Result<(usize, usize)> {
    let shape = |n: &str| {
        params
            .shape(n)
            .map(<[usize]>::to_vec)
            .ok_or_else(|| Error::InvalidArgument(format!("no parameter `{n}`")))
    };
    let (fc1, fc2) = (shape(&spec.names.fc1_w)?, shape(&spec.names.fc2_w)?);
    let din = spec.vision_hidden * spec.unit();
    if fc1.len() != 2 || fc2.len() != 2 || fc1[1] != din || fc2[1] != fc1[0] {
        return Err(Error::InvalidArgument(format!(
            "projector shapes do not chain: {} {fc1:?}, {} {fc2:?}, input {}×{}",
            spec.names.fc1_w,
            spec.names.fc2_w,
            spec.vision_hidden,
            spec.unit()
        )));
    }
    Ok((fc1[0], fc2[0]))
}

/// `pre_merger` [N, Dv] in window order + `window_index` → [N/m², D] rows in raster order,
/// row u for merged unit u (the u-th image placeholder).
pub fn forward(
    params: &Params,
    spec: &MergerSpec,
    pre_merger: &[f32],
    window_index: &[usize],
) -> Result<(Vec<f32>, MergerCache)> {
    let (hidden_dim, out_dim) = dims(params, spec)?;
    let (dv, unit) = (spec.vision_hidden, spec.unit());
    let units = window_index.len();
    if pre_merger.len() != units * unit * dv {
        return Err(Error::InvalidArgument(format!(
            "projector input has {} values, expected {units} merged tokens × {unit} patches × {dv}",
            pre_merger.len()
        )));
    }
    let mut seen = vec![false; units];
    for &u in window_index {
        if u >= units || std::mem::replace(&mut seen[u], true) {
            return Err(Error::InvalidArgument(format!(
                "window index {u} is out of range or repeated ({units} merged tokens)"
            )));
        }
    }
    let normed = ops::rmsnorm(pre_merger, params.get(&spec.names.norm)?, dv, spec.eps);
    let pre_gelu = ops::linear(
        &normed,
        params.get(&spec.names.fc1_w)?,
        Some(params.get(&spec.names.fc1_b)?),
        dv * unit,
    );
    let mut hidden = pre_gelu.clone();
    ops::gelu(&mut hidden);
    let out = ops::linear(
        &hidden,
        params.get(&spec.names.fc2_w)?,
        Some(params.get(&spec.names.fc2_b)?),
        hidden_dim,
    );
    let mut raster = vec![0.0; out.len()];
    for (j, &u) in window_index.iter().enumerate() {
        raster[u * out_dim..(u + 1) * out_dim].copy_from_slice(&out[j * out_dim..(j + 1) * out_dim]);
    }
    Ok((
        raster,
        MergerCache {
            input: pre_merger.to_vec(),
            normed,
            pre_gelu,
            hidden,
            window_index: window_index.to_vec(),
            out_dim,
        },
    ))
}

/// Adds the gradients of the projector's weights (those `grads` holds) for output
/// gradient `d_out` [N/m², D] (raster order), and d(input) into `d_input` when given.
pub fn backward(
    params: &Params,
    grads: &mut Params,
    spec: &MergerSpec,
    cache: &MergerCache,
    d_out: &[f32],
    d_input: Option<&mut [f32]>,
) -> Result<()> {
    let (dv, unit) = (spec.vision_hidden, spec.unit());
    let od = cache.out_dim;
    if d_out.len() != cache.window_index.len() * od {
        return Err(Error::InvalidArgument(format!(
            "projector output gradient has {} values, expected {}",
            d_out.len(),
            cache.window_index.len() * od
        )));
    }
    let hidden_dim = cache.hidden.len() / cache.window_index.len().max(1);
    // Back to window order.
    let mut dy = vec![0.0f32; d_out.len()];
    for (j, &u) in cache.window_index.iter().enumerate() {
        dy[j * od..(j + 1) * od].copy_from_slice(&d_out[u * od..(u + 1) * od]);
    }
    let n = &spec.names;
    let mut dh = vec![0.0f32; cache.hidden.len()];
    ops::linear_backward(
        &dy,
        &cache.hidden,
        params.get(&n.fc2_w)?,
        hidden_dim,
        Some(&mut dh),
        grads.get_mut(&n.fc2_w),
        None,
    );
    ops::linear_backward(
        &dy,
        &cache.hidden,
        params.get(&n.fc2_w)?,
        hidden_dim,
        None,
        None,
        grads.get_mut(&n.fc2_b),
    );
    let mut dpre = vec![0.0f32; dh.len()];
    ops::gelu_backward(&dh, &cache.pre_gelu, &mut dpre);
    let fc1 = params.get(&n.fc1_w)?;
    let needs_input = d_input.is_some() || grads.contains(&n.norm);
    let mut dnormed = vec![0.0f32; if needs_input { cache.normed.len() } else { 0 }];
    ops::linear_backward(
        &dpre,
        &cache.normed,
        fc1,
        dv * unit,
        needs_input.then_some(dnormed.as_mut_slice()),
        grads.get_mut(&n.fc1_w),
        None,
    );
    ops::linear_backward(
        &dpre,
        &cache.normed,
        fc1,
        dv * unit,
        None,
        None,
        grads.get_mut(&n.fc1_b),
    );
    if needs_input {
        let norm = params.get(&n.norm)?;
        ops::rmsnorm_backward(
            &dnormed,
            &cache.input,
            norm,
            dv,
            spec.eps,
            d_input,
            grads.get_mut(&n.norm),
        );
    }
    Ok(())
}
