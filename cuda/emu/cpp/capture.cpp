// Streams, stream capture and CUDA graphs, the part of the emulated driver API (driver.cpp
// has the rest) that decides where stream work goes: run now, or recorded into a capture.
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
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "emu_internal.h"

namespace massv_emu {

// Every call below runs under lock().

enum { CAPTURE_GLOBAL = 0, CAPTURE_THREAD_LOCAL = 1, CAPTURE_RELAXED = 2 };
struct Capture {  // declared in emu_internal.h
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
CUresult fail_capture(Capture* c, CUresult code, const std::string& msg) {
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
CUresult target(void* h, const char* what, Capture** into) {
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
CUresult unsafe_call(const char* what) {
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

static Capture* active_capture(unsigned long long id) {
    for (EmuStream* s : streams)
        if (s->capture && s->capture->id == id) return s->capture.get();
    return nullptr;
}

CUresult captured_event(const EmuEvent* e, const char* what) {
    return fail_capture(active_capture(e->capture), CUDA_ERROR_CAPTURED_EVENT,
                        std::string(what) + " on an event last recorded in a stream capture");
}

void record(Capture* c, Node node) { c->nodes.push_back(std::move(node)); }

unsigned long long capture_id(const Capture* c) { return c ? c->id : 0; }

}  // namespace massv_emu

using namespace massv_emu;

extern "C" {

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
    count_graph_launch();
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

}  // extern "C"
