//! Compute backends. `cpu` is the f32 reference every other backend is tested against;
//! the CUDA backend (cudarc + the kernels of `cuda/`) plugs in beside it.

pub mod cpu;
pub mod cuda;

use crate::error::Result;

/// The fatbins build.rs compiled from `cuda/*.cu` (empty when built without nvcc), and
/// what ptxas said of each kernel.
pub mod kernels {
    /// One kernel's resources on one SASS architecture, as ptxas reported them when
    /// build.rs compiled it (`-Xptxas=-v`): what decides its occupancy, and whether it
    /// spills registers to local memory.
    #[derive(Debug, Clone, Copy)]
    pub struct Resources {
        /// The .cu file's stem.
        pub module: &'static str,
        pub kernel: &'static str,
        /// "sm_90", ...
        pub arch: &'static str,
        pub registers: u32,
        /// Bytes a thread spills to local memory, and loads back.
        pub spill_stores: u32,
        pub spill_loads: u32,
        /// Bytes of stack frame a thread has.
        pub stack: u32,
        /// Bytes of static shared memory a block has.
        pub shared: u32,
    }

    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "CPU",
            Device::Cuda => "CUDA device",
        }
    }
}

/// What the user asked for on the command line: `auto` resolves to CUDA when it works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceRequest {
    /// `cpu`: the CPU. `cuda`: CUDA if [`cuda::probe`] finds the kernels embedded, a driver
    /// and a GPU, and cuBLAS and cuBLASLt load ([`cuda::blas_present`]), else the error
    /// naming what is missing. `auto`: CUDA when `cuda` would be, else the CPU (never an
    /// error; a one-line note on stderr when a GPU was found but cuBLAS was not). Knows no
    /// model: [`crate::model::Target::choose_device`] also checks that the kernels serve
    /// the target's shapes.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Auto => Ok(match cuda::probe().map(|_| cuda::blas_present()) {
                Err(_) => Device::Cpu,
                Ok(Ok(())) => Device::Cuda,
                Ok(Err(e)) => {
                    eprintln!("massv: using the CPU: {e}");
                    Device::Cpu
                }
            }),
            DeviceRequest::Cuda => cuda::probe().and_then(|_| cuda::blas_present()).map(|_| Device::Cuda),
        }
    }
}
