//! massv-train: training for MASSV drafters (arXiv 2505.10526) on the CPU.
//!
//! Module map:
//! - [`ops`]: forward ops (the runtime's own) and their backward, llm.c style; the one
//!   place a CUDA backend would slot in;
//! - [`params`]: named f32 tensors (weights, gradients, moments);
//! - [`lm`]: the Qwen2 LM forward with cached activations + backward, CE over masked tokens;
//! - [`vision`]: the MASSV projector / Qwen2.5-VL merger forward + backward;
//! - [`objective`]: whole-example losses (LM with image rows from the projector);
//! - [`optim`], [`trainer`]: AdamW, schedule, clipping, the generic loop, checkpoints;
//! - [`hf`]: reading and writing the Hugging Face / MASSV directory layouts;
//! - [`data`]: JSONL datasets, vision-feature cache, prompt construction;
//! - [`phases`]: projector pretraining, self-distilled data, SDViT, TVD, and the library
//!   entry points for text-LM and Qwen2.5-VL (LM + merger) training;
//! - [`plot`]: the TVD histogram PNG; [`progress`]: progress bars.

pub mod data;
pub mod hf;
pub mod lm;
pub mod objective;
pub mod ops;
pub mod optim;
pub mod params;
pub mod phases;
pub mod plot;
pub mod progress;
pub mod trainer;
pub mod vision;

pub use massv::{Error, Result};
pub use params::Params;
