//! Speculative decoding: the drafter and chain / tree drafting, the verification maths,
//! and the loop.

pub mod device_sampling;
pub mod draft;
mod draft_lm;
pub mod engine;
pub mod tree;
mod tree_draft;
pub mod verify;

pub use tree_draft::TreeRows;
