//! The MASSV projector: maps the target's vision features (the tensor its merger's
//! `ln_q` receives) into the drafter's embedding space, one embedding per merged token.
//! RMSNorm per patch → concatenate m² patches → fc1 → GELU (erf) → fc2. On the CPU in
//! f32 (the reference), or on the CUDA device of the target it serves
//! ([`CudaProjector`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::cuda_projector::CudaProjector;
use crate::backend::cpu;
use crate::backend::cuda::CudaDevice;
use crate::backend::Device;
use crate::config::{read_json_object, Fields};
use crate::error::{Error, Result};
use crate::weights::Weights;

pub const FORMAT: &str = "massv-drafter/1";
pub const CONFIG_FILE: &str = "massv.json";
pub const WEIGHTS_FILE: &str = "projector.safetensors";

/// `massv.json` of a MASSV drafter directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectorConfig {
    /// Dv: width of one vision patch feature (the target's vision hidden size).
    pub vision_hidden_size: usize,
    /// m: patches are merged m×m, as in the target's merger.
    pub spatial_merge_size: usize,
    pub projector_hidden_size: usize,
    /// D: the drafter's hidden size.
    pub draft_hidden_size: usize,
    pub norm_eps: f64,
}

pub struct Projector {
    pub cfg: ProjectorConfig,
    weights: Placement,
}

#[allow(clippy::large_enum_variant)] // one per drafter, never moved in a hot path
enum Placement {
    Cpu(HostWeights),
    Cuda(CudaProjector),
}

struct HostWeights {
    norm: Vec<f32>,  // [Dv]
    fc1_w: Vec<f32>, // [Dh, Dv·m²]
    fc1_b: Vec<f32>, // [Dh]
    fc2_w: Vec<f32>, // [D, Dh]
    fc2_b: Vec<f32>, // [D]
}

impl Projector {
    /// The projector of a drafter directory on the CPU, or None for a text-only drafter
    /// (no massv.json).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        Self::load_on(dir, None)
    }

    /// [`Projector::load`] on `dev` when given (weights uploaded once as bf16), else on
    /// the CPU.
    pub fn load_on(dir: &Path, dev: Option<&Arc<CudaDevice>>) -> Result<Option<Self>> {
        let path = dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let root = read_json_object(&path)?;
        let f = Fields {
            path: &path,
            obj: &root,
        };
        match f.opt_str("format")? {
            Some(FORMAT) => {}
            other => return Err(f.err(format!("format is {other:?}, expected {FORMAT:?}"))),
        }
        match f.opt_str("activation")? {
            None | Some("gelu") => {}
            Some(other) => return Err(f.err(format!("activation {other:?} is not supported (\"gelu\")"))),
        }
        let cfg = ProjectorConfig {
            vision_hidden_size: f.req_usize("vision_hidden_size")?,
            spatial_merge_size: f.req_usize("spatial_merge_size")?,
            projector_hidden_size: f.req_usize("projector_hidden_size")?,
            draft_hidden_size: f.req_usize("draft_hidden_size")?,
            norm_eps: f.opt_f64("norm_eps")?.unwrap_or(1e-6),
        };
        if [
            cfg.vision_hidden_size,
            cfg.spatial_merge_size,
            cfg.projector_hidden_size,
            cfg.draft_hidden_size,
        ]
        .contains(&0)
        {
            return Err(f.err("projector sizes must be positive"));
        }
        // Errors about its tensors name the projector file itself.
        let file = dir.join(WEIGHTS_FILE);
        let w = Weights::open_files(&file, std::slice::from_ref(&file))?;
        let shapes = expected_tensors(&cfg);
        w.check_inventory(&shapes)?;
        let weights = match dev {
            Some(dev) => Placement::Cuda(CudaProjector::from_weights(Arc::clone(dev), &cfg, &w)?),
            None => {
                let get = |name: &str| w.f32(name, &shapes[name]);
                Placement::Cpu(HostWeights {
                    norm: get("norm.weight")?,
                    fc1_w: get("fc1.weight")?,
                    fc1_b: get("fc1.bias")?,
                    fc2_w: get("fc2.weight")?,
                    fc2_b: get("fc2.bias")?,
                })
            }
        };
        Ok(Some(Projector { cfg, weights }))
    }

    /// Where it runs.
    pub fn device(&self) -> Device {
        match self.weights {
            Placement::Cpu(_) => Device::Cpu,
            Placement::Cuda(_) => Device::Cuda,
        }
    }

    /// `pre_merger` [N, Dv] in the merger's (window) order and the merger's
    /// `window_index` → [N/m², D] drafter embeddings in raster order, row i for the i-th
    /// `<|image_pad|>` of the image.
    pub fn forward(&self, pre_merger: &[f32], window_index: &[usize]) -> Result<Vec<f32>> {
        let h = match &self.weights {
            Placement::Cuda(p) => return p.forward(pre_merger, window_index),
            Placement::Cpu(h) => h,
        };
        let c = &self.cfg;
        check_input(c, pre_merger.len(), window_index.len())?;
        let dv = c.vision_hidden_size;
        let normed = cpu::rmsnorm(pre_merger, &h.norm, dv, c.norm_eps as f32);
        let unit = c.spatial_merge_size * c.spatial_merge_size;
        let mut hidden = cpu::linear(&normed, &h.fc1_w, Some(&h.fc1_b), dv * unit);
        cpu::gelu(&mut hidden);
        let out = cpu::linear(&hidden, &h.fc2_w, Some(&h.fc2_b), c.projector_hidden_size);
        Ok(to_raster(&out, window_index, c.draft_hidden_size))
    }
}

/// Checks a projector input of `values` values for `units` merged tokens.
pub(crate) fn check_input(c: &ProjectorConfig, values: usize, units: usize) -> Result<()> {
    let unit = c.spatial_merge_size * c.spatial_merge_size;
    let dv = c.vision_hidden_size;
    if values != units * unit * dv {
        return Err(Error::InvalidArgument(format!(
            "projector input has {values} values, expected {units} merged tokens × {unit} patches × {dv}"
        )));
    }
    Ok(())
}

/// Rows of width `d` in the merger's (window) order → raster order: row j goes to
/// `window_index[j]`.
pub(crate) fn to_raster(rows: &[f32], window_index: &[usize], d: usize) -> Vec<f32> {
    let mut raster = vec![0.0; rows.len()];
    for (j, &u) in window_index.iter().enumerate() {
        raster[u * d..(u + 1) * d].copy_from_slice(&rows[j * d..(j + 1) * d]);
    }
    raster
}

pub fn expected_tensors(c: &ProjectorConfig) -> BTreeMap<String, Vec<usize>> {
    let m2 = c.spatial_merge_size * c.spatial_merge_size;
    BTreeMap::from([
        ("norm.weight".to_string(), vec![c.vision_hidden_size]),
        (
            "fc1.weight".to_string(),
            vec![c.projector_hidden_size, c.vision_hidden_size * m2],
        ),
        ("fc1.bias".to_string(), vec![c.projector_hidden_size]),
        (
            "fc2.weight".to_string(),
            vec![c.draft_hidden_size, c.projector_hidden_size],
        ),
        ("fc2.bias".to_string(), vec![c.draft_hidden_size]),
    ])
}
