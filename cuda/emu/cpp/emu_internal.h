// What the emulator's pieces share: the kernel registry and the grid runner.
#pragma once
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

#include "emu.h"

namespace massv_emu {

typedef void (*KernelEntry)(void** args);

// The __shared__ arrays of a kernel's file (emu.h), poisoned before each block; empty for
// a file without any.
struct SharedMemory {
    char* begin;
    char* end;
};
// Every `extern "C" __global__` kernel of cuda/*.cu registers itself by name (the
// registration units build.rs generates), as cuModuleGetFunction finds it.
struct Kernel {
    const char* name;
    KernelEntry entry;
    SharedMemory shared;
    // Each parameter's size: a launch into a stream capture copies its arguments' bytes,
    // as the driver copies kernelParams, so the graph keeps the values of capture time.
    const size_t* param_sizes;
    size_t params;
};
void add_kernel(const char* name, const Kernel& k);
const Kernel* find_kernel(const char* name);

// cuLaunchKernel's void** holds one pointer per parameter, to a value of its type.
template <class... A, size_t... I>
inline void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}
template <auto K>
void invoke(void** args) {
    call_with(K, args, std::make_index_sequence<arity(K)>{});
}

// A captured argument is stored at a max_align_t boundary.
template <class... A>
struct Parameters {
    static_assert(((alignof(A) <= alignof(std::max_align_t)) && ...), "a kernel parameter aligned past max_align_t");
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};  // + 1: no empty array
    static constexpr size_t count = sizeof...(A);
};
template <class... A>
Parameters<A...> parameters(void (*)(A...));  // for decltype only

template <auto K>
void register_kernel(const char* name, SharedMemory shared) {
    using P = decltype(parameters(K));
    add_kernel(name, Kernel{nullptr, &invoke<K>, shared, P::sizes, P::count});
}

// Whether the driver takes this grid and block; else why not.
bool launch_shape_ok(uint3 grid, uint3 block, std::string& err);
bool run_grid(const Kernel& k, void** args, uint3 grid, uint3 block, std::string& err);
void set_reverse_order(bool reverse);

}  // namespace massv_emu
