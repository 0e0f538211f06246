// A CPU emulator of CUDA thread blocks, for checking kernels without a GPU (compiled only with MT_EMULATE).
//
// A launch runs the grid's blocks one after the other.  Inside a block every CUDA thread is a fiber
// (ucontext) with its own stack, so per-thread local arrays ("registers") are private as on the GPU; the
// fibers run in turn, each until it reaches __syncthreads() or returns, and a barrier is passed when every
// thread of the block has reached it.  A block in which some threads return while others wait at a barrier
// (a __syncthreads() in divergent code) is reported as an error.  Dynamic shared memory is one buffer per
// block, filled with NaN before the block starts, so that a read of shared memory nothing wrote shows up as
// NaN in the results; it is followed by a NaN-filled guard region, and a block that writes into it is
// reported as an error (a read from it gives NaN).
//
// What this checks: indexing, bounds, the algebra and the barrier structure of a kernel.  What it cannot
// check: races between threads that the GPU's scheduling would expose (fibers are switched only at
// barriers), warp-level behaviour, the memory model, speed.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace mt_emu {

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 blockIdx, threadIdx, blockDim, gridDim;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  bool at_barrier = false;
};

struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  std::vector<float> smem;
  const std::function<void()>* body = nullptr;
};

inline Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

inline float* dynamic_smem() { return scheduler().smem.data(); }

inline void syncthreads() {
  Scheduler& s = scheduler();
  Fiber* f = s.current;
  f->at_barrier = true;
  swapcontext(&f->ctx, &s.main);
}

inline void fiber_entry() {
  Scheduler& s = scheduler();
  (*s.body)();
  s.current->done = true;
  // returning switches to uc_link (the scheduler)
}

// Run `body` (a call of the kernel with its arguments) for every thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  Scheduler& s = scheduler();
  const unsigned nthreads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1) throw std::runtime_error("mt_emu: only 1-D thread blocks are emulated");
  constexpr size_t kStack = 256 * 1024;
  constexpr size_t kCanary = 1024;  // floats past the end, NaN: a write there is reported, a read gives NaN
  s.fibers.resize(nthreads);
  for (auto& f : s.fibers)
    if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
  s.body = &body;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        const size_t nsmem = (smem_bytes + sizeof(float) - 1) / sizeof(float);
        s.smem.assign(nsmem + kCanary, std::numeric_limits<float>::quiet_NaN());
        for (auto& f : s.fibers) {
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.main;
          f.done = f.at_barrier = false;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
          unsigned finished = 0, waiting = 0;
          for (unsigned t = 0; t < nthreads; ++t) {
            Fiber& f = s.fibers[t];
            if (f.done) {
              ++finished;
              continue;
            }
            f.at_barrier = false;
            threadIdx = dim3(t, 0, 0);
            s.current = &f;
            swapcontext(&s.main, &f.ctx);
            if (f.done)
              ++finished;
            else
              ++waiting;
          }
          if (finished == nthreads) {
            for (size_t i = nsmem; i < nsmem + kCanary; ++i)
              if (!std::isnan(s.smem[i])) {
                char msg[160];
                std::snprintf(msg, sizeof msg, "mt_emu: block (%u,%u,%u) wrote past its %zu bytes of shared memory",
                              bx, by, bz, smem_bytes);
                throw std::runtime_error(msg);
              }
            break;
          }
          if (finished != 0 && waiting != 0) {
            char msg[160];
            std::snprintf(msg, sizeof msg,
                          "mt_emu: block (%u,%u,%u): %u threads returned while %u wait at __syncthreads()", bx, by,
                          bz, finished, waiting);
            throw std::runtime_error(msg);
          }
        }
      }
  s.current = nullptr;
}

}  // namespace mt_emu
