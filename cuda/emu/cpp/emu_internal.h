// What the emulator's pieces share: the kernel registry and the grid runner.
#pragma once
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
};
void register_kernel(const char* name, KernelEntry entry, SharedMemory shared);
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

bool run_grid(const Kernel& k, void** args, uint3 grid, uint3 block, std::string& err);
void set_reverse_order(bool reverse);

}  // namespace massv_emu
