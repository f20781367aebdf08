//! Speculative decoding: drafting, verification maths, and the loop.

pub mod verify;
