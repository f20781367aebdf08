//! The MASSV projector ([`super::projector::Projector`]) on a CUDA device: the fused
//! pieces of cuda/projector.cu around two cuBLAS GEMMs,
//!   projector_norm_gather → fc1 GEMM → bias_gelu → fc2 (cuBLASLt, bias fused),
//! so the drafter's image rows cost one upload of the vision features and one download of
//! the merged rows per image, instead of the CPU's f32 GEMMs (on the real shapes, 1024
//! patches × 5120 → Dh → 896, seconds of CPU time).
//!
//! Weights are uploaded once as bf16; activations live in scratch buffers grown for the
//! largest image so far. Storage is bf16, sums f32 inside the kernels; the input comes in
//! and the output goes back as host f32 (the vision features the device tower hands back
//! are bf16 values, so their upload here is exact).

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use half::bf16;

use super::cuda_qwen2::host_bf16;
use super::projector::{check_input, expected_tensors, to_raster, ProjectorConfig};
use crate::backend::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Activations of an image of up to `patches` = N patches; U = N / m² merged tokens.
struct Scratch {
    patches: usize,
    x: CudaSlice<bf16>,        // [N, Dv] the vision features, in the merger's order
    gathered: CudaSlice<bf16>, // [U, m²Dv] normed patches, m² per row
    hidden: CudaSlice<bf16>,   // [U, Dh]
    out: CudaSlice<bf16>,      // [U, D]
}

pub struct CudaProjector {
    cfg: ProjectorConfig,
    dev: Arc<CudaDevice>,
    norm: CudaSlice<bf16>,  // [Dv]
    fc1_w: CudaSlice<bf16>, // [Dh, m²Dv]
    fc1_b: CudaSlice<bf16>, // [Dh]
    fc2_w: CudaSlice<bf16>, // [D, Dh]
    fc2_b: CudaSlice<bf16>, // [D]
    /// Behind a lock so the projector is shared read-only, as the CPU one is.
    scratch: Mutex<Option<Scratch>>,
}

impl Drop for CudaProjector {
    fn drop(&mut self) {
        self.dev.current_for_drop();
    }
}

impl CudaProjector {
    /// Uploads the projector from `w`, inventory-checked by the caller against
    /// [`expected_tensors`] of `cfg`.
    pub fn from_weights(dev: Arc<CudaDevice>, cfg: &ProjectorConfig, w: &Weights) -> Result<Self> {
        let shapes = expected_tensors(cfg);
        let up = |name: &str| -> Result<CudaSlice<bf16>> {
            let shape = shapes.get(name).ok_or_else(|| Error::MissingTensor {
                dir: w.dir().to_path_buf(),
                tensor: name.to_string(),
            })?;
            dev.upload(&host_bf16(w, name, shape)?)
        };
        Ok(CudaProjector {
            norm: up("norm.weight")?,
            fc1_w: up("fc1.weight")?,
            fc1_b: up("fc1.bias")?,
            fc2_w: up("fc2.weight")?,
            fc2_b: up("fc2.bias")?,
            scratch: Mutex::new(None),
            cfg: cfg.clone(),
            dev,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// [`super::projector::Projector::forward`] on the device.
    pub fn forward(&self, pre_merger: &[f32], window_index: &[usize]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        check_input(c, pre_merger.len(), window_index.len())?;
        let m2 = c.spatial_merge_size * c.spatial_merge_size;
        let (dv, dh, d) = (c.vision_hidden_size, c.projector_hidden_size, c.draft_hidden_size);
        let units = window_index.len();
        let n = units * m2;
        if n == 0 {
            return Ok(Vec::new());
        }
        let dev = &*self.dev;
        // A panic elsewhere cannot leave the scratch inconsistent: every call rewrites it.
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|s| s.patches < n) {
            *guard = None; // free the smaller buffers before allocating the larger ones
            *guard = Some(Scratch {
                patches: n,
                x: dev.alloc_zeros(n * dv)?,
                gathered: dev.alloc_zeros(n * dv)?,
                hidden: dev.alloc_zeros(units * dh)?,
                out: dev.alloc_zeros(units * d)?,
            });
        }
        let s = guard.as_mut().ok_or_else(|| Error::Cuda {
            op: "projector".into(),
            reason: "no scratch".into(),
        })?;
        let x: Vec<bf16> = pre_merger.iter().map(|&v| bf16::from_f32(v)).collect();
        dev.upload_into(&x, &mut s.x.slice_mut(..n * dv))?;
        dev.projector_norm_gather(
            &s.x.slice(..n * dv),
            &self.norm.as_view(),
            &mut s.gathered.slice_mut(..n * dv),
            n,
            dv,
            m2,
            c.norm_eps as f32,
        )?;
        // fc1 without its bias, which bias_gelu adds with the activation in one pass.
        dev.gemm_bf16(
            &s.gathered.slice(..n * dv),
            &self.fc1_w.as_view(),
            &mut s.hidden.slice_mut(..units * dh),
            units,
            dh,
            m2 * dv,
        )?;
        dev.bias_gelu(&mut s.hidden.slice_mut(..units * dh), &self.fc1_b.as_view(), units, dh)?;
        dev.linear(
            &s.hidden.slice(..units * dh),
            &self.fc2_w.as_view(),
            Some(&self.fc2_b.as_view()),
            &mut s.out.slice_mut(..units * d),
            units,
            d,
            dh,
        )?;
        let out: Vec<f32> = dev
            .download(&s.out.slice(..units * d))?
            .into_iter()
            .map(bf16::to_f32)
            .collect();
        drop(guard);
        Ok(to_raster(&out, window_index, d))
    }
}
