//! Model definitions, one file per architecture.

pub mod qwen2;
