//! Twin of the GELU kernel (in cuda/projector.cu once the fused projector lands).

/// Exact GELU, x · Φ(x) = x/2 · (1 + erf(x/√2)), in place (torch.nn.GELU()).
pub fn gelu(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}
