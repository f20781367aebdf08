//! Compute backends. `cpu` is the f32 reference every other backend is tested against;
//! the CUDA backend (cudarc + the kernels of `cuda/`) plugs in beside it.

pub mod cpu;
pub mod cuda;

use crate::error::{Error, Result};

/// The fatbins build.rs compiled from `cuda/*.cu` (empty when built without nvcc).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// What the user asked for on the command line: `auto` resolves to CUDA when it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceRequest {
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            // The CUDA kernels exist (backend::cuda) but no model runs on them yet: `auto`
            // is the CPU, an explicit request says why it cannot be served: no kernels,
            // no driver or GPU (cuda::probe), or no CUDA model path.
            DeviceRequest::Auto => Ok(Device::Cpu),
            DeviceRequest::Cuda => {
                let gpu = cuda::probe()?;
                Err(Error::InvalidArgument(format!(
                    "the CUDA backend has kernels but no CUDA model path yet in this version of massv \
                     (found {}); use --device cpu",
                    gpu.name
                )))
            }
        }
    }
}
