// SwiGLU gate of the Qwen2 MLP: out = silu(gate) * up. CPU twin: runtime/reference/swiglu.rs.
#include "common.cuh"

// gate_up: [rows, 2 * inter] with the gate in the first half of each row and up in the
// second (the layout of a fused gate/up projection); out: [rows, inter].
extern "C" __global__ void swiglu(const bf16* __restrict__ gate_up, bf16* __restrict__ out, int rows,
                                  int inter) {
    pdl_wait();
    const size_t n = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, c = i % inter;
        const float g = to_f32(gate_up[r * 2 * inter + c]);
        const float u = to_f32(gate_up[r * 2 * inter + inter + c]);
        out[i] = to_bf16(g / (1.0f + __expf(-g)) * u);
    }
}
