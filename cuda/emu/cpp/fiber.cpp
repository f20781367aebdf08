// Runs a kernel launch on the CPU: blocks one after another, each block's threads as
// fibers on the launching host thread, switched only at barriers. One launch runs at a
// time (driver.cpp holds its lock): the state here and the kernels' __shared__ arrays are
// the process's. (Thread-local state let launches run side by side, but a dlopen'ed
// library's thread-locals cost more than the second core gave back.) __syncthreads releases
// when every live thread of the block waits at it; a warp barrier (shuffle, ballot, mma)
// when every live lane its mask names waits at one. Exited threads count as arrived, as
// on the GPU. A block where nobody can move is a deadlock and fails the launch.
//
// Two orders (MASSV_EMU_ORDER=reverse, or massv_emu_set_order): a block's threads and the
// grid's blocks run first to last or last to first. Code that reads shared memory another
// thread writes without a barrier in between gets a different answer under one of them,
// and so does a grid that counts on its blocks' order (a split-K sum's last block to
// arrive is the first split under the reverse order).
//
// On x86-64 a fiber switch is a few instructions (switch_to below): glibc's swapcontext
// makes a sigprocmask system call on every switch, which was 90 % of the emulator's time.
#include "emu_internal.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace massv_emu {
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
uint64_t slots[MAX_THREADS / 32][32];
uint32_t scratch[MAX_THREADS / 32][32 * 8];
std::atomic<bool> reverse_order{false};
std::atomic<bool> order_from_env_read{false};

void switch_context(Context& save, Context& next) {
#if defined(__x86_64__)
    massv_emu_switch_to(&save.sp, next.sp);
#else
    swapcontext(&save.uc, &next.uc);
#endif
}

[[noreturn]] void fiber_main() {
    entry(entry_args);
    fibers[current].state = DONE;
    switch_context(fibers[current].ctx, scheduler);
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
    switch_context(f.ctx, scheduler);
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

unsigned linear(const uint3& t) { return t.x + blockDim.x * (t.y + blockDim.y * t.z); }

// Releases whatever barrier can be released; false when nothing could.
bool release() {
    bool any = false;
    // Block barrier: every live thread at it.
    bool all_at_block = true, some_at_block = false;
    for (unsigned i = 0; i < nthreads; ++i) {
        if (fibers[i].state == DONE) continue;
        if (fibers[i].state == AT_BLOCK_BARRIER)
            some_at_block = true;
        else
            all_at_block = false;
    }
    if (some_at_block && all_at_block) {
        for (unsigned i = 0; i < nthreads; ++i)
            if (fibers[i].state == AT_BLOCK_BARRIER) fibers[i].state = RUNNABLE;
        return true;
    }
    // Warp barriers: a lane goes on when every live lane of its mask is at a warp barrier.
    const unsigned warps = (nthreads + 31) / 32;
    for (unsigned w = 0; w < warps; ++w) {
        unsigned live = 0, waiting = 0;
        for (unsigned l = 0; l < 32 && w * 32 + l < nthreads; ++l) {
            const Fiber& f = fibers[w * 32 + l];
            if (f.state != DONE) live |= 1u << l;
            if (f.state == AT_WARP_BARRIER) waiting |= 1u << l;
        }
        unsigned go = 0;
        for (unsigned l = 0; l < 32; ++l) {
            if (!((waiting >> l) & 1u)) continue;
            const unsigned need = fibers[w * 32 + l].wait_mask & live;
            if ((need & waiting) == need) go |= 1u << l;
        }
        for (unsigned l = 0; l < 32; ++l)
            if ((go >> l) & 1u) fibers[w * 32 + l].state = RUNNABLE;
        any = any || go != 0;
    }
    return any;
}

bool run_block(std::string& err) {
    const size_t slot = STACK + page;
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = fibers[i];
        start_fiber(f, stacks + i * slot + page);
        f.state = RUNNABLE;
        f.wait_mask = 0;
        f.tid = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    }
    for (;;) {
        bool ran = false;
        for (unsigned k = 0; k < nthreads; ++k) {
            const unsigned i = reverse_order ? nthreads - 1 - k : k;
            if (fibers[i].state != RUNNABLE) continue;
            current = (int)i;
            threadIdx = fibers[i].tid;
            switch_context(scheduler, fibers[i].ctx);
            ran = true;
        }
        bool done = true;
        for (unsigned i = 0; i < nthreads; ++i) done = done && fibers[i].state == DONE;
        if (done) return true;
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
void warp_barrier(unsigned mask) { wait(AT_WARP_BARRIER, mask); }
unsigned lane_id() { return linear(threadIdx) & 31; }
uint64_t* warp_slots() { return slots[linear(threadIdx) / 32]; }
uint32_t* warp_scratch() { return scratch[linear(threadIdx) / 32]; }

void set_reverse_order(bool reverse) {
    order_from_env_read = true;
    reverse_order = reverse;
}

bool run_grid(KernelEntry k, void** args, uint3 grid, uint3 block, std::string& err) {
    if (!order_from_env_read) {
        const char* o = getenv("MASSV_EMU_ORDER");
        reverse_order = o && std::string(o) == "reverse";
        order_from_env_read = true;
    }
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
    if (!allocate_stacks(err)) return false;
    entry = k;
    entry_args = args;
    nthreads = (unsigned)n;
    blockDim = block;
    gridDim = grid;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long k = 0; k < blocks; ++k) {
        const unsigned long long b = reverse_order ? blocks - 1 - k : k;
        blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y)};
        if (!run_block(err)) return false;
    }
    return true;
}

}  // namespace massv_emu
