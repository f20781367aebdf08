// What the emulator's pieces share: the kernel registry, the grid runner, and the driver
// API's two halves (driver.cpp, capture.cpp).
#pragma once
#include <chrono>
#include <cstddef>
#include <functional>
#include <mutex>
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
// pdl: a programmatic dependent launch (cuLaunchKernelEx's programmatic stream
// serialisation); it runs in stream order as any other, and fails if a thread never
// calls pdl_wait.
bool run_grid(const Kernel& k, void** args, uint3 grid, uint3 block, bool pdl, std::string& err);
void set_reverse_order(bool reverse);

// ------------------------------------------------------------------------------------
// driver.cpp and capture.cpp. The streams, their captures and the graphs are capture.cpp's
// alone, so that the capture rules live in one file: driver.cpp's calls that take a stream
// ask it where their work goes (target) and hand it what they would have run (record).

typedef int CUresult;
enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_MERGE = 902,
    CUDA_ERROR_STREAM_CAPTURE_ISOLATION = 905,
    CUDA_ERROR_STREAM_CAPTURE_IMPLICIT = 906,
    CUDA_ERROR_CAPTURED_EVENT = 907,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
};

// Every driver call holds it, in either file: one launch runs at a time (fiber.cpp), and
// the allocations, streams and captures are every host thread's.
std::mutex& lock();

// driver.cpp's, so that capture.cpp's calls fail (cuGetErrorString's reason), refuse to
// run without a context and count in massv_emu_stats as the other calls do.
CUresult fail(CUresult code, const std::string& msg);
CUresult need_context(const char* call);
void count_graph_launch();

// One operation a capture recorded; false and why when it fails at replay. driver.cpp
// makes them (it knows how to copy, set and launch), capture.cpp keeps and replays them.
struct Node {
    std::function<bool(std::string&)> run;
};
struct Capture;  // only capture.cpp looks inside
CUresult target(void* stream, const char* what, Capture** into);
CUresult fail_capture(Capture* c, CUresult code, const std::string& msg);
void record(Capture* c, Node node);
unsigned long long capture_id(const Capture* c);  // 0 for none, as EmuEvent::capture
CUresult unsafe_call(const char* what);

// driver.cpp creates and records events; capture.cpp's cuStreamWaitEvent keeps their
// capture rules.
struct EmuEvent {
    std::chrono::steady_clock::time_point t;
    bool recorded;
    unsigned long long capture;  // the capture it was last recorded in; 0: none
};
CUresult captured_event(const EmuEvent* e, const char* what);

}  // namespace massv_emu
