//! Plain, single-threaded f32 versions of every kernel in `cuda/`, with the same names.
//! They define what each kernel computes: the CPU backend calls them (adding only
//! parallelism) and the CUDA tests compare the device against them.

mod attention;
mod attention_ops;
mod convert;
mod embedding;
mod gelu;
mod gemv;
mod kv_cache;
mod projector;
mod rmsnorm;
mod rope;
mod sampling;
mod swiglu;

pub use attention::{attention, attention_varlen};
pub use attention_ops::{attention_decode, attention_prefill, attention_verify};
pub use convert::{bf16_to_f32, f32_to_bf16};
pub use embedding::{embedding, scatter_rows};
pub use gelu::gelu;
pub use gemv::{gemv_bf16, gemv_bf16_argmax, gemv_rope_kv_append, gemv_swiglu, rms_row_scales, GemvFuse};
pub use kv_cache::{kv_append, kv_compact};
pub use projector::{bias_add, bias_gelu, projector_norm_gather};
pub use rmsnorm::{rms_scale, rmsnorm, rmsnorm_residual};
pub use rope::{mrope, rope, rope_inv_freq, rope_kv_append, rope_vision};
pub use sampling::{
    argmax, blocked_sum, draw_counts, probabilities, probabilities_sample, residual, sample,
    sample_without_replacement, top_k, top_k_probs, tree_uniforms_consumed, uniforms_consumed, verify_greedy,
    verify_sampled, verify_tree_greedy, verify_tree_sampled, SAMPLE_CHUNK, SAMPLE_TILE,
};
pub use swiglu::swiglu;

/// y[n, m] = x[n, k] · w[m, k]ᵀ (+ bias[m]): the nn.Linear convention, naive loops.
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32], k: usize) {
    let m = w.len() / k;
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(m)) {
        for (j, out) in yr.iter_mut().enumerate() {
            let wr = &w[j * k..(j + 1) * k];
            *out = xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>() + bias.map_or(0.0, |b| b[j]);
        }
    }
}
