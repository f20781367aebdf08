//! Twins of cuda/convert.cu.

use half::bf16;

/// Round to nearest even, as __float2bfloat16_rn.
pub fn f32_to_bf16(x: &[f32], y: &mut [bf16]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = bf16::from_f32(v);
    }
}

pub fn bf16_to_f32(x: &[bf16], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.to_f32();
    }
}
