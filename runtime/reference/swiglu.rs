//! Twin of cuda/swiglu.cu.

/// out[r, c] = silu(gate_up[r, c]) * gate_up[r, inter + c]: the gate/up projection is
/// one fused matrix, gate rows first.
pub fn swiglu(gate_up: &[f32], out: &mut [f32], inter: usize) {
    for (gu, o) in gate_up.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}
