//! Compute backends. `cpu` is the f32 reference every other backend is tested against;
//! the CUDA backend (cudarc + the kernels of `cuda/`) plugs in beside it.

pub mod cpu;

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
            // No CUDA backend is wired in yet: `auto` is the CPU, an explicit request
            // says why it cannot be served.
            DeviceRequest::Auto => Ok(Device::Cpu),
            DeviceRequest::Cuda if !kernels::COMPILED => Err(Error::NoCudaKernels),
            DeviceRequest::Cuda => Err(Error::InvalidArgument(
                "the CUDA backend is not available in this version of massv; use --device cpu".into(),
            )),
        }
    }
}
