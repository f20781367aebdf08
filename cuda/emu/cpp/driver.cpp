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
// Stream capture and graphs are emulated as strictly as the driver enforces them, so that
// a runtime bug in capturing fails here as on a GPU. A launch, a device-to-device copy or
// a memset on a capturing stream runs nothing: it is recorded (a launch with a copy of its
// arguments' bytes), and cuGraphLaunch replays the records in order, synchronously. What
// capture forbids fails with the driver's error and invalidates the capture, so that
// cuStreamEndCapture then fails with CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: copies between
// host and device on a capturing stream (host memory is pageable: there is no pinned
// memory here), synchronising or querying a capturing stream or the context, the calls
// that may synchronise implicitly (cuMemAlloc, cuMemFree, synchronous copies and memsets)
// made by a thread capturing in GLOBAL or THREAD_LOCAL mode or by any thread during a
// GLOBAL capture, the legacy stream while a blocking stream captures, a capturing stream
// waiting on an event recorded outside the capture, querying an event recorded in one.
// Not emulated, and refused with CUDA_ERROR_NOT_SUPPORTED (capture invalidated): capture
// joined across streams by events, graph memory nodes (cuMemAllocAsync / cuMemFreeAsync on
// a capturing stream), cuBLAS / cuBLASLt work on a capturing stream.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "emu_internal.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum {
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

namespace massv_emu {

namespace {
std::mutex& lock() {
    static std::mutex m;
    return m;
}
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
};
static thread_local MassvEmuStats stats;

static CUresult fail(CUresult code, const std::string& msg) {
    last_error = msg;
    fprintf(stderr, "massv CUDA emulator: %s\n", msg.c_str());
    return code;
}

// The context current on each thread (cuCtxSetCurrent). Memory calls and launches refuse
// to run without one, as the driver may: an engine freed on a thread that never touched
// CUDA (a C host's worker) must make its context current first, or its frees fail and
// its memory leaks.
static thread_local void* current_ctx = nullptr;
static CUresult need_context(const char* call) {
    if (current_ctx) return CUDA_SUCCESS;
    stats.no_context++;
    return fail(CUDA_ERROR_INVALID_CONTEXT, std::string(call) + " with no context current on the calling thread");
}

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

static bool run_kernel(const Kernel& k, void** params, uint3 grid, uint3 block, std::string& err) {
    stats.launches++;
    running_kernel = k.name;
    const bool ok = run_grid(k, params, grid, block, err);
    running_kernel = nullptr;
    if (!ok) err = std::string(k.name) + ": " + err;
    return ok;
}

// ------------------------------------------------------------------------------------
// Streams, capture and graphs. Every call below runs under lock().

// One operation a capture recorded; false and why when it fails at replay.
struct Node {
    std::function<bool(std::string&)> run;
};
enum { CAPTURE_GLOBAL = 0, CAPTURE_THREAD_LOCAL = 1, CAPTURE_RELAXED = 2 };
struct Capture {
    unsigned long long id;
    int mode;
    std::thread::id thread;  // that began it
    bool invalidated;
    std::vector<Node> nodes;
};
struct EmuStream {
    bool blocking;  // created without CU_STREAM_NON_BLOCKING: ordered with the legacy stream
    std::unique_ptr<Capture> capture;
};
struct EmuGraph {
    std::vector<Node> nodes;
};
struct EmuEvent {
    std::chrono::steady_clock::time_point t;
    bool recorded;
    unsigned long long capture;  // the capture it was last recorded in; 0: none
};
// The live handles: a destroyed or foreign one is refused, not dereferenced.
static std::set<EmuStream*> streams;
static std::set<EmuGraph*> graphs, graph_execs;
static unsigned long long captures_begun = 0;

static void* const CU_STREAM_LEGACY = (void*)1;
static void* const CU_STREAM_PER_THREAD = (void*)2;

static EmuStream* live_stream(void* h) {
    auto it = streams.find(static_cast<EmuStream*>(h));
    return it == streams.end() ? nullptr : *it;
}

// An error in a capture (c may be null): the capture is invalidated, so that
// cuStreamEndCapture fails too, as on a GPU.
static CUresult fail_capture(Capture* c, CUresult code, const std::string& msg) {
    if (!c) return fail(code, msg);
    c->invalidated = true;
    return fail(code, msg + " (capture invalidated)");
}

// A capture on a blocking stream: the legacy stream, which waits for every blocking
// stream, cannot be used meanwhile.
static Capture* blocking_capture() {
    for (EmuStream* s : streams)
        if (s->blocking && s->capture) return s->capture.get();
    return nullptr;
}

// Where work for stream h goes: run now (*into stays null) or into *into's capture.
static CUresult target(void* h, const char* what, Capture** into) {
    *into = nullptr;
    if (h == nullptr || h == CU_STREAM_LEGACY) {
        if (Capture* c = blocking_capture())
            return fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
                                std::string(what) + " on the legacy stream while a blocking stream captures");
        return CUDA_SUCCESS;
    }
    if (h == CU_STREAM_PER_THREAD) return CUDA_SUCCESS;
    EmuStream* s = live_stream(h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, std::string(what) + " on a stream that does not exist");
    Capture* c = s->capture.get();
    if (c && c->invalidated)
        return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                    std::string(what) + " on a stream whose capture an earlier error invalidated");
    *into = c;
    return CUDA_SUCCESS;
}

// A call that may synchronise implicitly (cuMemAlloc, a synchronous copy, ...): refused on
// a thread capturing in GLOBAL or THREAD_LOCAL mode, and on every thread during a GLOBAL
// capture (a thread's own mode, cuThreadExchangeStreamCaptureMode, is not emulated: it is
// GLOBAL, the default).
static CUresult unsafe_call(const char* what) {
    CUresult r = CUDA_SUCCESS;
    for (EmuStream* s : streams) {
        Capture* c = s->capture.get();
        if (c && (c->mode == CAPTURE_GLOBAL ||
                  (c->mode == CAPTURE_THREAD_LOCAL && c->thread == std::this_thread::get_id())))
            r = fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                             std::string(what) + " during a stream capture (a call that may synchronise)");
    }
    return r;
}

// A synchronous copy or memset: a call that may synchronise, on the legacy stream.
static CUresult sync_call(const char* what) {
    if (CUresult r = need_context(what)) return r;
    if (CUresult r = unsafe_call(what)) return r;
    Capture* c;
    return target(nullptr, what, &c);
}

static Capture* active_capture(unsigned long long id) {
    for (EmuStream* s : streams)
        if (s->capture && s->capture->id == id) return s->capture.get();
    return nullptr;
}

static CUresult captured_event(const EmuEvent* e, const char* what) {
    return fail_capture(active_capture(e->capture), CUDA_ERROR_CAPTURED_EVENT,
                        std::string(what) + " on an event last recorded in a stream capture");
}

// Recorded instead of run: the kernel and a copy of its arguments' bytes, taken now.
static Node kernel_node(const Kernel& k, uint3 grid, uint3 block, void** params) {
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
    return Node{[&k, grid, block, at, args](std::string& err) mutable {
        std::vector<void*> argv(at.size());
        for (size_t i = 0; i < at.size(); ++i) argv[i] = &args[at[i]];
        return run_kernel(k, argv.data(), grid, block, err);
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
        c->nodes.push_back(Node{[=](std::string& e) { return copy_bytes(dst, src, n, true, true, what, e); }});
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

// cuMemAllocAsync / cuMemFreeAsync: stream-ordered, so allowed during a capture, except on
// the capturing stream itself, where the driver records graph memory nodes.
static CUresult async_memory_call(void* stream, const char* what) {
    if (CUresult r = need_context(what)) return r;
    Capture* c;
    if (CUresult r = target(stream, what, &c)) return r;
    if (c)
        return fail_capture(c, CUDA_ERROR_NOT_SUPPORTED,
                            std::string(what) + " on a capturing stream: graph memory nodes are not emulated");
    return CUDA_SUCCESS;
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
    Capture* c;
    if (CUresult r = target(stream, what, &c)) return r;
    if (c)
        return fail_capture(c, CUDA_ERROR_NOT_SUPPORTED,
                            std::string(what) + " on a capturing stream: cuBLAS work in graphs is not emulated");
    return CUDA_SUCCESS;
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
// Synchronising the context would synchronise its capturing streams: refused from any
// thread while one captures.
CUresult cuCtxSynchronize() {
    std::lock_guard<std::mutex> g(lock());
    CUresult r = CUDA_SUCCESS;
    for (EmuStream* s : streams)
        if (s->capture)
            r = fail_capture(s->capture.get(), CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
                             "cuCtxSynchronize while a stream of the context captures");
    return r;
}

CUresult cuStreamCreate(void** s, unsigned flags) {
    std::lock_guard<std::mutex> g(lock());
    EmuStream* st = new EmuStream{(flags & 1) == 0, nullptr};
    streams.insert(st);
    *s = st;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
// A capture still under way on the stream is dropped with it.
CUresult cuStreamDestroy_v2(void* h) {
    std::lock_guard<std::mutex> g(lock());
    EmuStream* s = live_stream(h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamDestroy on a stream that does not exist");
    streams.erase(s);
    delete s;
    return CUDA_SUCCESS;
}
// Synchronising or querying a capturing stream is invalid: its work has not been
// submitted for execution.
static CUresult wait_for_stream(void* h, const char* what) {
    std::lock_guard<std::mutex> g(lock());
    Capture* c;
    if (CUresult r = target(h, what, &c)) return r;
    if (c) return fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, std::string(what) + " on a capturing stream");
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* h) { return wait_for_stream(h, "cuStreamSynchronize"); }
CUresult cuStreamQuery(void* h) { return wait_for_stream(h, "cuStreamQuery"); }

// The emulator is synchronous, so a wait only has its capture rules to keep: a capturing
// stream may wait on an event of its own capture, on one never recorded, or with
// CU_EVENT_WAIT_EXTERNAL (1) on one recorded outside it.
CUresult cuStreamWaitEvent(void* h, void* ev, unsigned flags) {
    std::lock_guard<std::mutex> g(lock());
    const EmuEvent* e = static_cast<const EmuEvent*>(ev);
    if (!e) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent on a null event");
    Capture* c;
    if (CUresult r = target(h, "cuStreamWaitEvent", &c)) return r;
    if (!e->recorded || (c && e->capture == c->id)) return CUDA_SUCCESS;
    if (c && e->capture == 0) {
        if (flags & 1) return CUDA_SUCCESS;
        return fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_ISOLATION,
                            "cuStreamWaitEvent: a capturing stream waits on an event recorded outside its capture");
    }
    if (c) {
        if (Capture* other = active_capture(e->capture)) other->invalidated = true;
        return fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_MERGE,
                            "cuStreamWaitEvent: a capturing stream waits on an event of another capture");
    }
    if (e->capture != 0)
        return fail_capture(active_capture(e->capture), CUDA_ERROR_NOT_SUPPORTED,
                            "cuStreamWaitEvent on an event recorded in a stream capture: joining a capture "
                            "across streams is not emulated");
    return CUDA_SUCCESS;
}

// THREAD_LOCAL (1) is what massv uses; GLOBAL (0) and RELAXED (2) differ in which calls
// of which threads break the capture (unsafe_call).
CUresult cuStreamBeginCapture_v2(void* h, int mode) {
    std::lock_guard<std::mutex> g(lock());
    if (CUresult r = need_context("cuStreamBeginCapture")) return r;
    if (mode < CAPTURE_GLOBAL || mode > CAPTURE_RELAXED)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuStreamBeginCapture: capture mode " + std::to_string(mode));
    if (h == nullptr || h == CU_STREAM_LEGACY)
        return fail(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamBeginCapture on the legacy stream");
    if (h == CU_STREAM_PER_THREAD)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "cuStreamBeginCapture on the per-thread stream is not emulated");
    EmuStream* s = live_stream(h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamBeginCapture on a stream that does not exist");
    if (s->capture) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamBeginCapture on a stream already capturing");
    s->capture.reset(new Capture{++captures_begun, mode, std::this_thread::get_id(), false, {}});
    return CUDA_SUCCESS;
}

// Ends the capture whatever its state; a graph only if nothing invalidated it.
CUresult cuStreamEndCapture(void* h, void** graph) {
    std::lock_guard<std::mutex> g(lock());
    *graph = nullptr;
    EmuStream* s = live_stream(h);
    if (!s || !s->capture) return fail(CUDA_ERROR_ILLEGAL_STATE, "cuStreamEndCapture on a stream not capturing");
    if (s->capture->mode != CAPTURE_RELAXED && s->capture->thread != std::this_thread::get_id())
        return fail(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD,
                    "cuStreamEndCapture on another thread than the one that began the capture");
    const std::unique_ptr<Capture> c = std::move(s->capture);
    if (c->invalidated)
        return fail(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                    "cuStreamEndCapture: an earlier error invalidated the capture; no graph");
    EmuGraph* gr = new EmuGraph{std::move(c->nodes)};
    graphs.insert(gr);
    *graph = gr;
    return CUDA_SUCCESS;
}

// status: CU_STREAM_CAPTURE_STATUS_NONE (0), _ACTIVE (1) or _INVALIDATED (2).
CUresult cuStreamIsCapturing(void* h, int* status) {
    std::lock_guard<std::mutex> g(lock());
    *status = 0;
    if (h == nullptr || h == CU_STREAM_LEGACY) {
        if (blocking_capture())
            return fail(CUDA_ERROR_STREAM_CAPTURE_IMPLICIT,
                        "cuStreamIsCapturing on the legacy stream while a blocking stream captures");
        return CUDA_SUCCESS;
    }
    if (h == CU_STREAM_PER_THREAD) return CUDA_SUCCESS;
    EmuStream* s = live_stream(h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamIsCapturing on a stream that does not exist");
    if (s->capture) *status = s->capture->invalidated ? 2 : 1;
    return CUDA_SUCCESS;
}

// The executable graph is a copy: destroying or changing the graph afterwards leaves it.
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long flags) {
    std::lock_guard<std::mutex> g(lock());
    EmuGraph* gr = static_cast<EmuGraph*>(graph);
    if (!graphs.count(gr)) return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiate of a graph that does not exist");
    // AUTO_FREE_ON_LAUNCH (1), UPLOAD (2), DEVICE_LAUNCH (4), USE_NODE_PRIORITY (8); the
    // driver refuses AUTO_FREE_ON_LAUNCH with DEVICE_LAUNCH.
    if ((flags & ~15ull) || ((flags & 1) && (flags & 4)))
        return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphInstantiate flags " + std::to_string(flags));
    EmuGraph* e = new EmuGraph{gr->nodes};
    graph_execs.insert(e);
    *exec = e;
    return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(void* exec, void* stream) {
    std::lock_guard<std::mutex> g(lock());  // one launch at a time (fiber.cpp)
    if (CUresult r = need_context("cuGraphLaunch")) return r;
    EmuGraph* e = static_cast<EmuGraph*>(exec);
    if (!graph_execs.count(e)) return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphLaunch of a graph that does not exist");
    Capture* c;
    if (CUresult r = target(stream, "cuGraphLaunch", &c)) return r;
    if (c) {  // into a capture: the graph's nodes join it, as a child graph would
        c->nodes.insert(c->nodes.end(), e->nodes.begin(), e->nodes.end());
        return CUDA_SUCCESS;
    }
    stats.graph_launches++;
    std::string err;
    for (Node& n : e->nodes)
        if (!n.run(err)) return fail(CUDA_ERROR_LAUNCH_FAILED, "in a graph: " + err);
    return CUDA_SUCCESS;
}

CUresult cuGraphUpload(void* exec, void* stream) {
    std::lock_guard<std::mutex> g(lock());
    if (!graph_execs.count(static_cast<EmuGraph*>(exec)))
        return fail(CUDA_ERROR_INVALID_VALUE, "cuGraphUpload of a graph that does not exist");
    Capture* c;
    if (CUresult r = target(stream, "cuGraphUpload", &c)) return r;
    if (c) return fail_capture(c, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuGraphUpload on a capturing stream");
    return CUDA_SUCCESS;
}

static CUresult destroy_graph(std::set<EmuGraph*>& live, void* graph, const char* what) {
    std::lock_guard<std::mutex> g(lock());
    EmuGraph* gr = static_cast<EmuGraph*>(graph);
    if (!live.erase(gr)) return fail(CUDA_ERROR_INVALID_VALUE, std::string(what) + " of a graph that does not exist");
    delete gr;
    return CUDA_SUCCESS;
}
CUresult cuGraphDestroy(void* graph) { return destroy_graph(graphs, graph, "cuGraphDestroy"); }
CUresult cuGraphExecDestroy(void* exec) { return destroy_graph(graph_execs, exec, "cuGraphExecDestroy"); }

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
        c->nodes.push_back(Node{[=](std::string& e) { return set_bytes(p, v, n, what, e); }});
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

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void* stream, void** params, void** extra) {
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
    const uint3 grid{gx, gy, gz}, block{bx, by, bz};
    if (c) {
        // The driver checks the shape at the launch, captured or not.
        std::string err;
        if (!launch_shape_ok(grid, block, err))
            return fail_capture(c, CUDA_ERROR_INVALID_VALUE, std::string(k->name) + ": " + err);
        c->nodes.push_back(kernel_node(*k, grid, block, params));
        return CUDA_SUCCESS;
    }
    std::string err;
    return run_kernel(*k, params, grid, block, err) ? CUDA_SUCCESS : fail(CUDA_ERROR_LAUNCH_FAILED, err);
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
    e->capture = c ? c->id : 0;
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
