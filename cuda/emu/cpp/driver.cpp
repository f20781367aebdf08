// The part of the CUDA driver API cudarc calls for massv, over host memory: one device
// ("massv CPU emulator", compute capability 9.0 so the kernels' sm_80+ paths are the ones
// that run), synchronous streams, device pointers that are host pointers. Modules ignore
// the fatbin they are handed and find kernels in the registry by name, so a launcher
// naming a kernel that cuda/*.cu does not define fails here as on a GPU.
//
// Copies and memsets are checked against the allocations (a copy past the end of a buffer
// is CUDA_ERROR_INVALID_VALUE, not silent corruption), a kernel running past the end of
// one faults on a guard page and is named, and copies are counted, with kernel launches
// and allocations, in massv_emu_stats so tests can hold a decode step to "no allocation,
// no copy larger than a few tokens". Every call runs to completion on the calling host
// thread, so the counters are per thread: tests running side by side do not see each
// other's work.
//
// Streams, stream capture and graphs are in capture.cpp, whose header gives the capture
// rules; a call here that takes a stream asks it where the work goes (emu_internal.h).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu_internal.h"

typedef unsigned long long CUdeviceptr;

namespace massv_emu {

std::mutex& lock() {
    static std::mutex m;
    return m;
}
namespace {
std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}
std::map<std::string, Kernel>& kernels() {
    static std::map<std::string, Kernel> k;
    return k;
}
struct Allocation {
    size_t bytes;  // asked for
    void* base;    // of its mapping (which ends with the guard page)
    size_t span;   // bytes mapped
};
std::map<uintptr_t, Allocation> allocations;  // by start
thread_local std::string last_error;
constexpr size_t TOTAL_MEMORY = 64ull << 30;
size_t in_use = 0;

// Whether [p, p + n) lies inside one allocation.
bool inside(uintptr_t p, size_t n) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second.bytes;
}
}  // namespace

void add_kernel(const char* name, const Kernel& k) { registry()[name] = k; }

const Kernel* find_kernel(const char* name) {
    auto& ks = kernels();
    auto it = ks.find(name);
    if (it != ks.end()) return &it->second;
    auto r = registry().find(name);
    if (r == registry().end()) return nullptr;
    auto ins = ks.emplace(name, r->second);
    ins.first->second.name = ins.first->first.c_str();
    return &ins.first->second;
}

// The kernel running now (for the fault report); null between launches.
const char* volatile running_kernel = nullptr;
struct sigaction previous_segv;

void on_fault(int sig, siginfo_t* info, void* ctx) {
    if (running_kernel) {
        char msg[512];
        const int len = snprintf(msg, sizeof msg,
                                 "massv CUDA emulator: kernel %s faulted at %p: past the end of a device "
                                 "allocation, outside any, or past its fiber's stack\n",
                                 running_kernel, info->si_addr);
        if (len > 0) (void)!write(2, msg, (size_t)len < sizeof msg ? (size_t)len : sizeof msg - 1);
    }
    // Then whatever handled SIGSEGV before (Rust's stack-overflow report), else the default.
    if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(sig, info, ctx);
    } else if (previous_segv.sa_handler != SIG_DFL && previous_segv.sa_handler != SIG_IGN) {
        previous_segv.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);  // the faulting access repeats and ends the process
    }
}

void install_fault_handler() {
    static bool installed = false;
    if (installed) return;
    installed = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
}
}  // namespace massv_emu

using namespace massv_emu;

struct MassvEmuStats {
    unsigned long long launches;
    unsigned long long allocations;
    unsigned long long htod_copies;
    unsigned long long htod_bytes;
    unsigned long long htod_largest;
    unsigned long long dtoh_copies;
    unsigned long long dtoh_bytes;
    unsigned long long dtoh_largest;
    unsigned long long dtod_bytes;
    unsigned long long no_context;      // calls refused: no context current on the thread
    unsigned long long graph_launches;  // their kernels count in launches
    unsigned long long pdl_launches;    // launches with programmatic stream serialisation (in launches too)
};
static thread_local MassvEmuStats stats;

namespace massv_emu {

CUresult fail(CUresult code, const std::string& msg) {
    last_error = msg;
    fprintf(stderr, "massv CUDA emulator: %s\n", msg.c_str());
    return code;
}

// The context current on each thread (cuCtxSetCurrent). Memory calls and launches refuse
// to run without one, as the driver may: an engine freed on a thread that never touched
// CUDA (a C host's worker) must make its context current first, or its frees fail and
// its memory leaks.
static thread_local void* current_ctx = nullptr;
CUresult need_context(const char* call) {
    if (current_ctx) return CUDA_SUCCESS;
    stats.no_context++;
    return fail(CUDA_ERROR_INVALID_CONTEXT, std::string(call) + " with no context current on the calling thread");
}

void count_graph_launch() { stats.graph_launches++; }

}  // namespace massv_emu

// Whether a copy's device side(s) lie inside allocations; else why not.
static bool copy_in_bounds(const void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what,
                           std::string& err) {
    if (n == 0 || ((!dst_dev || inside((uintptr_t)dst, n)) && (!src_dev || inside((uintptr_t)src, n)))) return true;
    err = std::string(what) + " of " + std::to_string(n) + " bytes outside any allocation";
    return false;
}

static bool copy_bytes(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what,
                       std::string& err) {
    if (!copy_in_bounds(dst, src, n, dst_dev, src_dev, what, err)) return false;
    if (n == 0) return true;
    memmove(dst, src, n);
    if (dst_dev && !src_dev) {
        stats.htod_copies++;
        stats.htod_bytes += n;
        if (n > stats.htod_largest) stats.htod_largest = n;
    } else if (!dst_dev && src_dev) {
        stats.dtoh_copies++;
        stats.dtoh_bytes += n;
        if (n > stats.dtoh_largest) stats.dtoh_largest = n;
    } else {
        stats.dtod_bytes += n;
    }
    return true;
}

static bool set_bytes(CUdeviceptr p, unsigned char v, size_t n, const char* what, std::string& err) {
    if (n == 0) return true;
    if (!inside((uintptr_t)p, n)) {
        err = std::string(what) + " of " + std::to_string(n) + " bytes outside any allocation";
        return false;
    }
    memset((void*)(uintptr_t)p, v, n);
    return true;
}

static bool run_kernel(const Kernel& k, void** params, uint3 grid, uint3 block, bool pdl, std::string& err) {
    stats.launches++;
    if (pdl) stats.pdl_launches++;
    running_kernel = k.name;
    const bool ok = run_grid(k, params, grid, block, pdl, err);
    running_kernel = nullptr;
    if (!ok) err = std::string(k.name) + ": " + err;
    return ok;
}

// A synchronous copy or memset: a call that may synchronise, on the legacy stream.
static CUresult sync_call(const char* what) {
    if (CUresult r = need_context(what)) return r;
    if (CUresult r = unsafe_call(what)) return r;
    Capture* c;
    return target(nullptr, what, &c);
}

// Recorded instead of run: the kernel and a copy of its arguments' bytes, taken now.
static Node kernel_node(const Kernel& k, uint3 grid, uint3 block, bool pdl, void** params) {
    struct alignas(std::max_align_t) Word {
        unsigned char bytes[alignof(std::max_align_t)];
    };
    std::vector<size_t> at(k.params);  // in Words
    size_t words = 0;
    for (size_t i = 0; i < k.params; ++i) {
        at[i] = words;
        words += (k.param_sizes[i] + sizeof(Word) - 1) / sizeof(Word);
    }
    std::vector<Word> args(words);
    for (size_t i = 0; i < k.params; ++i) memcpy(&args[at[i]], params[i], k.param_sizes[i]);
    return Node{[&k, grid, block, pdl, at, args](std::string& err) mutable {
        std::vector<void*> argv(at.size());
        for (size_t i = 0; i < at.size(); ++i) argv[i] = &args[at[i]];
        return run_kernel(k, argv.data(), grid, block, pdl, err);
    }};
}

// A copy on a stream: run now, recorded into a capture (device to device), or refused.
static CUresult copy_on(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, void* stream,
                        const char* what) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = need_context(what)) return r;
    Capture* c;
    if (CUresult r = target(stream, what, &c)) return r;
    std::string err;
    if (c) {
        if (!dst_dev || !src_dev)
            return fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                                std::string(what) + " on a capturing stream: host memory here is pageable");
        if (!copy_in_bounds(dst, src, n, true, true, what, err)) return fail_capture(c, CUDA_ERROR_INVALID_VALUE, err);
        record(c, Node{[=](std::string& e) { return copy_bytes(dst, src, n, true, true, what, e); }});
        return CUDA_SUCCESS;
    }
    return copy_bytes(dst, src, n, dst_dev, src_dev, what, err) ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_VALUE, err);
}

static CUresult copy_sync(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = sync_call(what)) return r;
    std::string err;
    return copy_bytes(dst, src, n, dst_dev, src_dev, what, err) ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_VALUE, err);
}

// Each allocation ends (rounded up to 256 bytes, CUDA's granularity) at an inaccessible
// page, so a kernel reading or writing past it faults at once (see on_fault), as
// compute-sanitizer's memcheck would report it.
static CUresult alloc_bytes(CUdeviceptr* p, size_t n) {
    if (n == 0) return CUDA_ERROR_INVALID_VALUE;
    if (n > TOTAL_MEMORY - in_use) return CUDA_ERROR_OUT_OF_MEMORY;
    install_fault_handler();
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t padded = (n + 255) / 256 * 256;
    const size_t span = (padded + page - 1) / page * page + page;
    void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = static_cast<char*>(base) + span - page;
    mprotect(guard, page, PROT_NONE);
    char* m = guard - padded;
    // Unlike a GPU, fresh memory is poisoned (NaN bf16 / f32 patterns) so a read before
    // any write shows.
    memset(m, 0xff, padded);
    allocations[(uintptr_t)m] = Allocation{n, base, span};
    in_use += n;
    stats.allocations++;
    *p = (CUdeviceptr)(uintptr_t)m;
    return CUDA_SUCCESS;
}

static CUresult free_bytes(CUdeviceptr p) {
    auto it = allocations.find((uintptr_t)p);
    if (it == allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    const Allocation a = it->second;
    in_use -= a.bytes;
    allocations.erase(it);
    munmap(a.base, a.span);
    return CUDA_SUCCESS;
}

// Work on `stream` that the driver would record but the emulator cannot (`unrecorded`
// says what): refused while the stream captures, the capture invalidated.
static CUresult refuse_if_capturing(void* stream, const char* what, const char* unrecorded) {
    Capture* c;
    if (CUresult r = target(stream, what, &c)) return r;
    if (c)
        return fail_capture(c, CUDA_ERROR_NOT_SUPPORTED,
                            std::string(what) + " on a capturing stream: " + unrecorded + " not emulated");
    return CUDA_SUCCESS;
}

// cuMemAllocAsync / cuMemFreeAsync: stream-ordered, so allowed during a capture, except on
// the capturing stream itself, where the driver records graph memory nodes.
static CUresult async_memory_call(void* stream, const char* what) {
    if (CUresult r = need_context(what)) return r;
    return refuse_if_capturing(stream, what, "graph memory nodes are");
}

extern "C" {

// ------------------------------------------------------------------------------------
// The emulator's own entry points (not CUDA's).

void massv_emu_stats(MassvEmuStats* out) {
    std::lock_guard<std::mutex> g(lock());
    *out = stats;
}
void massv_emu_reset_stats() {
    std::lock_guard<std::mutex> g(lock());
    stats = MassvEmuStats{};
}
void massv_emu_set_reverse_order(int reverse) {
    std::lock_guard<std::mutex> g(lock());
    set_reverse_order(reverse != 0);
}
int massv_emu_is_emulator() { return 1; }

// For the emulated cuBLAS / cuBLASLt, whose work is not recorded into graphs: nonzero
// (a CUresult, the capture invalidated) when `stream` may not take work now.
int massv_emu_refuse_capture(void* stream, const char* what) {
    std::lock_guard<std::mutex> g(lock());
    return refuse_if_capturing(stream, what, "cuBLAS work in graphs is");
}

// ------------------------------------------------------------------------------------
// Driver API

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *dev = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    snprintf(name, (size_t)len, "%s", "massv CPU emulator (not a GPU)");
    return CUDA_SUCCESS;
}
// 4, or MASSV_EMU_SMS (132: an H100's): the launchers split K over blocks until about
// twice this many run, so the count picks which split paths the tests take.
static int multiprocessors() {
    const char* s = getenv("MASSV_EMU_SMS");
    const int n = s ? atoi(s) : 0;
    return n > 0 ? n : 4;
}

CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;     // max threads per block
        case 10: *v = 32; break;      // warp size
        case 16: *v = multiprocessors(); break;
        case 41: *v = 1; break;       // unified addressing
        case 75: *v = 9; break;       // compute capability major
        case 76: *v = 0; break;       // minor
        case 8: *v = 48 * 1024; break;   // shared memory per block
        case 97: *v = 227 * 1024; break; // opt-in shared memory per block
        case 115: *v = 1; break;      // memory pools: yes, so cudarc frees with cuMemFreeAsync as on an H100
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = TOTAL_MEMORY;
    return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(lock());
    *total = TOTAL_MEMORY;
    *free_bytes = TOTAL_MEMORY - in_use;
    return CUDA_SUCCESS;
}

static int the_context;
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &the_context;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void* ctx) {
    current_ctx = ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current_ctx;
    return CUDA_SUCCESS;
}
// cuCtxSynchronize is in capture.cpp: it has only capture rules to keep.

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = need_context("cuMemAlloc")) return r;
    if (CUresult r = unsafe_call("cuMemAlloc")) return r;
    return alloc_bytes(p, n);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = need_context("cuMemFree")) return r;
    if (CUresult r = unsafe_call("cuMemFree")) return r;
    return free_bytes(p);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void* stream) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = async_memory_call(stream, "cuMemAllocAsync")) return r;
    return alloc_bytes(p, n);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = async_memory_call(stream, "cuMemFreeAsync")) return r;
    return free_bytes(p);
}

CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = sync_call("cuMemsetD8")) return r;
    std::string err;
    return set_bytes(p, v, n, "cuMemsetD8", err) ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_VALUE, err);
}
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void* stream) {
    std::lock_guard<std::mutex> g(lock());
    const char* what = "cuMemsetD8Async";
    if (CUresult r = need_context(what)) return r;
    Capture* c;
    if (CUresult r = target(stream, what, &c)) return r;
    std::string err;
    if (c) {
        if (n != 0 && !inside((uintptr_t)p, n))
            return fail_capture(c, CUDA_ERROR_INVALID_VALUE,
                                std::string(what) + " of " + std::to_string(n) + " bytes outside any allocation");
        record(c, Node{[=](std::string& e) { return set_bytes(p, v, n, what, e); }});
        return CUDA_SUCCESS;
    }
    return set_bytes(p, v, n, what, err) ? CUDA_SUCCESS : fail(CUDA_ERROR_INVALID_VALUE, err);
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return copy_sync((void*)(uintptr_t)dst, src, n, true, false, "cuMemcpyHtoD");
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    return copy_on((void*)(uintptr_t)dst, src, n, true, false, stream, "cuMemcpyHtoDAsync");
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return copy_sync(dst, (const void*)(uintptr_t)src, n, false, true, "cuMemcpyDtoH");
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    return copy_on(dst, (const void*)(uintptr_t)src, n, false, true, stream, "cuMemcpyDtoHAsync");
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy_sync((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, true, true, "cuMemcpyDtoD");
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    return copy_on((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, true, true, stream, "cuMemcpyDtoDAsync");
}

static int module_tag;
CUresult cuModuleLoadData(void** m, const void*) {
    *m = &module_tag;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(void*) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    std::lock_guard<std::mutex> g(lock());
    const Kernel* k = find_kernel(name);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    *f = const_cast<Kernel*>(k);
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(void*, int, int) { return CUDA_SUCCESS; }
CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return CUDA_SUCCESS;
}

// cuLaunchKernel, and cuLaunchKernelEx with `pdl` its programmatic stream serialisation.
static CUresult launch(void* f, uint3 grid, uint3 block, unsigned shared_bytes, void* stream, void** params,
                       void** extra, bool pdl) {
    std::lock_guard<std::mutex> g(lock());  // one launch at a time (fiber.cpp)
    const Kernel* k = static_cast<const Kernel*>(f);
    if (!k) return CUDA_ERROR_INVALID_HANDLE;
    if (CUresult r = need_context(k->name)) return r;
    Capture* c;
    if (CUresult r = target(stream, k->name, &c)) return r;
    if (shared_bytes != 0 || extra != nullptr)
        return fail_capture(c, CUDA_ERROR_INVALID_VALUE,
                            std::string(k->name) + ": dynamic shared memory / extra launch arguments are not emulated");
    if (k->params != 0 && params == nullptr)
        return fail_capture(c, CUDA_ERROR_INVALID_VALUE, std::string(k->name) + ": no kernelParams");
    if (c) {
        // The driver checks the shape at the launch, captured or not.
        std::string err;
        if (!launch_shape_ok(grid, block, err))
            return fail_capture(c, CUDA_ERROR_INVALID_VALUE, std::string(k->name) + ": " + err);
        record(c, kernel_node(*k, grid, block, pdl, params));
        return CUDA_SUCCESS;
    }
    std::string err;
    return run_kernel(*k, params, grid, block, pdl, err) ? CUDA_SUCCESS : fail(CUDA_ERROR_LAUNCH_FAILED, err);
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void* stream, void** params, void** extra) {
    return launch(f, uint3{gx, gy, gz}, uint3{bx, by, bz}, shared_bytes, stream, params, extra, false);
}

// CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out (CUDA 12 / 13).
struct LaunchAttribute {
    int id;
    char pad[4];
    union {
        char bytes[64];
        int value;
    };
};
struct LaunchConfig {
    unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes;
    void* stream;
    LaunchAttribute* attrs;
    unsigned num_attrs;
};
enum { LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6 };

CUresult cuLaunchKernelEx(const LaunchConfig* cfg, void* f, void** params, void** extra) {
    if (!cfg || (cfg->num_attrs > 0 && !cfg->attrs)) return CUDA_ERROR_INVALID_VALUE;
    bool pdl = false;
    for (unsigned i = 0; i < cfg->num_attrs; ++i) {
        const LaunchAttribute& a = cfg->attrs[i];
        if (a.id != LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) {
            std::lock_guard<std::mutex> g(lock());
            return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernelEx: launch attribute " + std::to_string(a.id) +
                                                      " is not emulated (only programmatic stream serialisation)");
        }
        pdl = a.value != 0;
    }
    return launch(f, uint3{cfg->grid_x, cfg->grid_y, cfg->grid_z}, uint3{cfg->block_x, cfg->block_y, cfg->block_z},
                  cfg->shared_bytes, cfg->stream, params, extra, pdl);
}

CUresult cuEventCreate(void** e, unsigned) {
    *e = new EmuEvent{std::chrono::steady_clock::now(), false, 0};
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<EmuEvent*>(e);
    return CUDA_SUCCESS;
}
// On a capturing stream the event marks a point of the capture, not a time.
CUresult cuEventRecord(void* ev, void* stream) {
    std::lock_guard<std::mutex> g(lock());
    EmuEvent* e = static_cast<EmuEvent*>(ev);
    Capture* c;
    if (CUresult r = target(stream, "cuEventRecord", &c)) return r;
    e->recorded = true;
    e->capture = capture_id(c);
    if (!c) e->t = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
static CUresult event_done(void* ev, const char* what) {
    std::lock_guard<std::mutex> g(lock());
    const EmuEvent* e = static_cast<const EmuEvent*>(ev);
    return e->capture ? captured_event(e, what) : CUDA_SUCCESS;
}
CUresult cuEventSynchronize(void* e) { return event_done(e, "cuEventSynchronize"); }
CUresult cuEventQuery(void* e) { return event_done(e, "cuEventQuery"); }
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    if (CUresult r = event_done(a, "cuEventElapsedTime")) return r;
    if (CUresult r = event_done(b, "cuEventElapsedTime")) return r;
    *ms = std::chrono::duration<float, std::milli>(static_cast<EmuEvent*>(b)->t - static_cast<EmuEvent*>(a)->t).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

static const char* error_name(CUresult code) {
    switch (code) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case CUDA_ERROR_STREAM_CAPTURE_MERGE: return "CUDA_ERROR_STREAM_CAPTURE_MERGE";
        case CUDA_ERROR_STREAM_CAPTURE_ISOLATION: return "CUDA_ERROR_STREAM_CAPTURE_ISOLATION";
        case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: return "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT";
        case CUDA_ERROR_CAPTURED_EVENT: return "CUDA_ERROR_CAPTURED_EVENT";
        case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return nullptr;
    }
}
CUresult cuGetErrorName(CUresult code, const char** s) {
    const char* name = error_name(code);
    *s = name ? name : "CUDA_ERROR_UNKNOWN";
    return CUDA_SUCCESS;
}
// The emulator's reason for the calling thread's last error, for the codes it explains.
CUresult cuGetErrorString(CUresult code, const char** s) {
    if (code != CUDA_SUCCESS && code != CUDA_ERROR_OUT_OF_MEMORY && code != CUDA_ERROR_NOT_FOUND && error_name(code)) {
        static thread_local std::string msg;
        {
            std::lock_guard<std::mutex> g(lock());
            msg = "emulated: " + (last_error.empty() ? std::string(error_name(code)) : last_error);
        }
        *s = msg.c_str();
        return CUDA_SUCCESS;
    }
    return cuGetErrorName(code, s);
}

}  // extern "C"
