// Runs a kernel launch on the CPU: blocks one after another, each block's threads as
// fibers on the launching host thread, switched only at barriers. One launch runs at a
// time (under the driver's lock()): the state here and the kernels' __shared__ arrays are
// the process's. (Thread-local state let launches run side by side, but a dlopen'ed
// library's thread-locals cost more than the second core gave back.) __syncthreads releases
// when every live thread of the block waits at it; a warp barrier (shuffle, ballot, mma)
// when every live lane its mask names waits at one. Exited threads count as arrived, as
// on the GPU. A block where nobody can move is a deadlock and fails the launch.
//
// Two orders (MASSV_EMU_ORDER=reverse, or massv_emu_set_order): a block's threads run
// first to last or last to first, and a warp whose warp barrier completes runs on at
// once, so each warp runs ahead of the later ones to a __syncthreads or its end. Code
// that reads shared memory another thread or warp writes without a barrier in between
// gets a different answer under one of them. The grid's blocks run first to last, or
// under the reverse order scattered (scatter_stride): the blocks run one after another
// lie far apart in every dimension and block 0 runs last, so a grid that counts on its
// blocks' order gets a different answer too (a split-K sum's last block to arrive is
// then often not its last split), and so does one whose work items (rows, column ranges,
// key splits) share an arrival counter by mistake: their arrivals interleave, where
// first to last or last to first each item's blocks ran together.
//
// On x86-64 a fiber switch is a few instructions (switch_to below): glibc's swapcontext
// makes a sigprocmask system call on every switch, which was 90 % of the emulator's time.
// A fiber at a barrier switches straight to the next one of the pass, and a warp exchange
// takes one barrier (emu.h): switches are what the emulator spends its time on.
#include "emu_internal.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace massv_emu {
WarpWords warp_words[32];
WarpWords warp_seen[32];

namespace {

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in
// *save, and resumes the stack `next` (whose top holds the same six registers and a
// return address). MXCSR and the x87 control word are never changed by the kernels.
extern "C" void massv_emu_switch_to(void** save, void* next);
asm(R"(
    .text
    .globl massv_emu_switch_to
    .hidden massv_emu_switch_to
    .type massv_emu_switch_to, @function
massv_emu_switch_to:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size massv_emu_switch_to, .-massv_emu_switch_to
)");
struct Context {
    void* sp;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Fiber {
    Context ctx;
    State state;
    unsigned wait_mask;
    uint3 tid;
    bool pdl_waited;  // called pdl_wait (griddepcontrol.wait)
};

constexpr size_t STACK = 256 * 1024;
constexpr int MAX_THREADS = 1024;

Context scheduler;
Fiber fibers[MAX_THREADS];
char* stacks = nullptr;
long page = 0;
int current = 0;
unsigned nthreads = 0;
KernelEntry entry = nullptr;
void** entry_args = nullptr;
SharedMemory shared{nullptr, nullptr};
std::atomic<bool> reverse_order{false};
bool reverse = false;  // reverse_order, read once a launch
// The block's state in counts and per-warp lane masks, kept as fibers move (scanning
// every fiber at every barrier cost more than the switches).
unsigned done_count = 0, at_block_count = 0;
static_assert(MAX_THREADS / 32 == sizeof warp_words / sizeof warp_words[0], "a WarpWords per warp");
unsigned warp_live[MAX_THREADS / 32];     // lanes not exited
unsigned warp_waiting[MAX_THREADS / 32];  // lanes at a warp barrier
std::atomic<bool> order_from_env_read{false};
// A programmatic dependent launch: each thread must call pdl_wait before it exits, and
// the first one that did not (linear id in its block; -1: none) fails the launch.
bool pdl_launch = false;
int pdl_missing = -1;

void switch_context(Context& save, Context& next) {
#if defined(__x86_64__)
    massv_emu_switch_to(&save.sp, next.sp);
#else
    swapcontext(&save.uc, &next.uc);
#endif
}

// The fiber a pass runs after fiber i (-1: before the first), or -1 at the pass's end.
int next_in_pass(int i) {
    if (reverse) {
        for (int j = (i < 0 ? (int)nthreads : i) - 1; j >= 0; --j)
            if (fibers[j].state == RUNNABLE) return j;
    } else {
        for (unsigned j = (unsigned)(i + 1); j < nthreads; ++j)
            if (fibers[j].state == RUNNABLE) return (int)j;
    }
    return -1;
}

// Releases the lanes of warp w whose warp barrier is complete: every live lane of the
// lane's mask waits at a warp barrier. False when none.
bool release_warp(unsigned w) {
    const unsigned live = warp_live[w], waiting = warp_waiting[w];
    unsigned go = 0;
    for (unsigned rest = waiting; rest; rest &= rest - 1) {
        const unsigned l = (unsigned)__builtin_ctz(rest);
        const unsigned need = fibers[w * 32 + l].wait_mask & live;
        if ((need & waiting) == need) go |= 1u << l;
    }
    if (go == 0) return false;
    // What the released lanes read; each reads it as it resumes, before the next release.
    warp_seen[w] = warp_words[w];
    warp_waiting[w] &= ~go;
    for (unsigned rest = go; rest; rest &= rest - 1) fibers[w * 32 + (unsigned)__builtin_ctz(rest)].state = RUNNABLE;
    return true;
}

// The first runnable lane of warp w in the order's direction, or -1.
int first_of_warp(unsigned w) {
    const int lo = (int)(w * 32), hi = (int)std::min(w * 32 + 32, nthreads);
    for (int k = 0; k < hi - lo; ++k) {
        const int j = reverse ? hi - 1 - k : lo + k;
        if (fibers[j].state == RUNNABLE) return j;
    }
    return -1;
}

// Leaves the current fiber: for its own warp's lanes again when that completes a warp
// barrier (a warp runs ahead until __syncthreads or its end, so under one order or the
// other a warp reads shared memory before another warp's write that it forgot to wait
// for), else for the next fiber of the pass, or the scheduler after the last. One switch
// a fiber, not two (each switch mispredicts a return).
void leave(Fiber& f) {
    const unsigned w = (unsigned)current / 32;
    bool released = false;
    if (f.state == AT_WARP_BARRIER) {
        // Only the arriving lane's own barrier is checked here (all of it, with the full
        // masks the kernels use); the end of the pass releases whatever else is complete.
        const unsigned need = f.wait_mask & warp_live[w];
        released = (need & warp_waiting[w]) == need && release_warp(w);
    } else if (f.state == DONE) {
        released = warp_waiting[w] != 0 && release_warp(w);
    }
    int j = released ? first_of_warp(w) : -1;
    if (j < 0) j = next_in_pass(current);
    if (j < 0) {
        switch_context(f.ctx, scheduler);
        return;
    }
    current = j;
    threadIdx = fibers[j].tid;
    switch_context(f.ctx, fibers[j].ctx);
}

[[noreturn]] void fiber_main() {
    entry(entry_args);
    if (pdl_launch && !fibers[current].pdl_waited && pdl_missing < 0) pdl_missing = current;
    fibers[current].state = DONE;
    ++done_count;
    warp_live[current / 32] &= ~(1u << (current & 31));
    leave(fibers[current]);
    abort();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f, char* stack) {
#if defined(__x86_64__)
    // The frame switch_to pops: six registers, then fiber_main as the return address,
    // placed so fiber_main starts with the stack alignment of a called function.
    void** sp = reinterpret_cast<void**>(stack + STACK) - 8;
    for (int r = 0; r < 6; ++r) sp[r] = nullptr;
    sp[6] = reinterpret_cast<void*>(&fiber_main);
    sp[7] = nullptr;
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = stack;
    f.ctx.uc.uc_stack.ss_size = STACK;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
}

void wait(State s, unsigned mask) {
    Fiber& f = fibers[current];
    f.state = s;
    f.wait_mask = mask;
    if (s == AT_WARP_BARRIER)
        warp_waiting[current / 32] |= 1u << (current & 31);
    else
        ++at_block_count;
    leave(f);
}

bool allocate_stacks(std::string& err) {
    if (stacks) return true;
    page = sysconf(_SC_PAGESIZE);
    const size_t slot = STACK + page;  // a guard page below each stack
    void* m = mmap(nullptr, slot * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        err = "cannot map fiber stacks";
        return false;
    }
    stacks = static_cast<char*>(m);
    for (int i = 0; i < MAX_THREADS; ++i) mprotect(stacks + i * slot, page, PROT_NONE);
    return true;
}

// Releases whatever barrier can be released; false when nothing could.
bool release() {
    // Block barrier: every live thread at it.
    if (at_block_count > 0 && at_block_count + done_count == nthreads) {
        for (unsigned i = 0; i < nthreads; ++i)
            if (fibers[i].state == AT_BLOCK_BARRIER) fibers[i].state = RUNNABLE;
        at_block_count = 0;
        return true;
    }
    bool any = false;
    const unsigned warps = (nthreads + 31) / 32;
    for (unsigned w = 0; w < warps; ++w) any = (warp_waiting[w] != 0 && release_warp(w)) || any;
    return any;
}

bool run_block(std::string& err) {
    if (shared.begin) memset(shared.begin, 0xff, (size_t)(shared.end - shared.begin));
    const size_t slot = STACK + page;
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = fibers[i];
        start_fiber(f, stacks + i * slot + page);
        f.state = RUNNABLE;
        f.wait_mask = 0;
        f.pdl_waited = false;
        f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    }
    done_count = 0;
    at_block_count = 0;
    for (unsigned w = 0; w * 32 < nthreads; ++w) {
        const unsigned lanes = std::min(32u, nthreads - w * 32);
        warp_live[w] = lanes == 32 ? ~0u : (1u << lanes) - 1;
        warp_waiting[w] = 0;
    }
    for (;;) {
        // A pass: every runnable fiber once, in order, each switching to the next.
        const int first = next_in_pass(-1);
        const bool ran = first >= 0;
        if (ran) {
            current = first;
            threadIdx = fibers[first].tid;
            switch_context(scheduler, fibers[first].ctx);
        }
        if (done_count == nthreads) {
            if (pdl_missing < 0) return true;
            const uint3 t = fibers[pdl_missing].tid;
            char buf[256];
            snprintf(buf, sizeof buf,
                     "thread (%u, %u, %u) of block (%u, %u, %u) exited without pdl_wait (griddepcontrol.wait) in "
                     "a programmatic dependent launch: it may have run beside the kernel before it",
                     t.x, t.y, t.z, blockIdx.x, blockIdx.y, blockIdx.z);
            err = buf;
            return false;
        }
        if (!release() && !ran) {
            unsigned at_block = 0, at_warp = 0, finished = 0;
            for (unsigned i = 0; i < nthreads; ++i) {
                at_block += fibers[i].state == AT_BLOCK_BARRIER;
                at_warp += fibers[i].state == AT_WARP_BARRIER;
                finished += fibers[i].state == DONE;
            }
            char buf[256];
            snprintf(buf, sizeof buf,
                     "deadlock in block (%u, %u, %u): %u threads at __syncthreads, %u at a warp barrier, %u exited",
                     blockIdx.x, blockIdx.y, blockIdx.z, at_block, at_warp, finished);
            err = buf;
            return false;
        }
    }
}

}  // namespace

void block_barrier() { wait(AT_BLOCK_BARRIER, 0); }
void pdl_wait() { fibers[current].pdl_waited = true; }
void warp_barrier(unsigned mask) { wait(AT_WARP_BARRIER, mask); }

void set_reverse_order(bool reverse) {
    order_from_env_read = true;
    reverse_order = reverse;
}

bool launch_shape_ok(uint3 grid, uint3 block, std::string& err) {
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (n == 0 || n > MAX_THREADS) {
        err = "block of " + std::to_string(n) + " threads (1..1024)";
        return false;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
        err = "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
              ") out of range";
        return false;
    }
    return true;
}

// The scattered order's step: run i is block (blocks - 1 - i) * stride mod blocks, a
// permutation since stride and blocks are coprime; stride near blocks / φ puts the blocks
// run in a row far apart.
unsigned long long scatter_stride(unsigned long long blocks) {
    unsigned long long s = (unsigned long long)((double)blocks * 0.6180339887498949) | 1ull;
    while (std::gcd(s, blocks) != 1) s += 2;
    return s;
}

bool run_grid(const Kernel& k, void** args, uint3 grid, uint3 block, bool pdl, std::string& err) {
    if (!order_from_env_read) {
        const char* o = getenv("MASSV_EMU_ORDER");
        reverse_order = o && std::string(o) == "reverse";
        order_from_env_read = true;
    }
    reverse = reverse_order;
    if (!launch_shape_ok(grid, block, err)) return false;
    const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
    if (!allocate_stacks(err)) return false;
    entry = k.entry;
    entry_args = args;
    pdl_launch = pdl;
    pdl_missing = -1;
    shared = k.shared;
    nthreads = (unsigned)n;
    blockDim = block;
    gridDim = grid;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    const unsigned long long stride = scatter_stride(blocks);
    for (unsigned long long i = 0; i < blocks; ++i) {
        const unsigned long long b =
            reverse ? (unsigned long long)((unsigned __int128)(blocks - 1 - i) * stride % blocks) : i;
        blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
        if (!run_block(err)) return false;
    }
    return true;
}

}  // namespace massv_emu
