//! Speculative decoding: the drafter and chain drafting, the verification maths, and the loop.

pub mod draft;
pub mod engine;
pub mod verify;
