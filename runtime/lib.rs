//! massv: speculative decoding for vision-language models with a multimodal drafter.
//!
//! Module map (see README.md for the architecture):
//! - [`weights`], [`config`], [`tokenizer`]: loading HF model directories;
//! - [`backend`]: the CPU reference backend (and the compiled CUDA kernels);
//! - [`reference`]: naive twins of every kernel;
//! - [`model`]: the Qwen2 decoder LM;
//! - [`kv_cache`]: preallocated caches with rollback;
//! - [`generate`]: decoding loops.

pub mod backend;
pub mod bench;
pub mod config;
pub mod demo;
pub mod error;
pub mod generate;
pub mod image;
pub mod kv_cache;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod reference;
pub mod sampling;
pub mod spec;
pub mod synth;
pub mod tokenizer;
pub mod weights;
pub mod world;

pub use error::{Error, Result};
