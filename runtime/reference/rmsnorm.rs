//! Twin of cuda/rmsnorm.cu.

/// 1 / sqrt(mean(x²) + eps): what RMSNorm scales a row by.
pub fn rms_scale(row: &[f32], eps: f32) -> f32 {
    1.0 / (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32 + eps).sqrt()
}

/// y = w * x / sqrt(mean(x²) + eps) per row of `dim` values (transformers' Qwen2RMSNorm).
pub fn rmsnorm(x: &[f32], w: &[f32], y: &mut [f32], dim: usize, eps: f32) {
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let inv = rms_scale(xr, eps);
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// residual += x, then y = rmsnorm(residual): the step between two sublayers.
pub fn rmsnorm_residual(x: &[f32], residual: &mut [f32], w: &[f32], y: &mut [f32], dim: usize, eps: f32) {
    for (r, &v) in residual.iter_mut().zip(x) {
        *r += v;
    }
    rmsnorm(residual, w, y, dim, eps);
}
