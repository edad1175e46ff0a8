// msda_emu.h: run CUDA kernels on the CPU, for tests on machines without a GPU.
//
// Include this header BEFORE a .cu file and compile the pair as plain C++20
// with g++ (`-Icsrc -I$CUDA_HOME/include`): the real <cuda_runtime.h>,
// <cuda_fp16.h> and <cuda_bf16.h> provide the types and the host half/bf16
// conversions; this header provides what nvcc would, on the CPU.
//
// What is emulated
//   * Launches. MSDA_LAUNCH(kernel, blocks, threads, shared_bytes, stream)(args...)
//     runs the grid synchronously. Checks as on hardware: block size 1..1024
//     (x, y <= 1024, z <= 64), grid x <= 2^31-1, y, z <= 65535
//     (cudaErrorInvalidConfiguration); dynamic shared memory <= 48 KiB unless
//     raised per kernel with cudaFuncSetAttribute(MaxDynamicSharedMemorySize),
//     and never above the device's opt-in maximum (cudaErrorInvalidValue).
//   * Blocks run one after another in a seeded shuffled order (no kernel may
//     rely on block order). The threads of a block are cooperative fibers
//     (ucontext) on one OS thread; within each scheduling pass the runnable
//     threads run in a seeded shuffled order, so a missing barrier shows up
//     as a read of data not yet written. Atomics are trivially atomic; runs
//     are deterministic for a given seed.
//   * threadIdx, blockIdx, blockDim, gridDim, warpSize; __syncthreads (all live
//     threads of the block must wait at the SAME __syncthreads call);
//     __syncwarp(mask); __shfl_sync / __shfl_up_sync / __shfl_down_sync /
//     __shfl_xor_sync (any mask, `width` as in PTX shfl.sync, any trivially
//     copyable type of <= 8 bytes); __ballot_sync / __any_sync / __all_sync;
//     atomicAdd (float, double, int, unsigned, unsigned long long; returns the
//     old value), atomicExch, atomicMax / atomicMin (int, unsigned); __ldg;
//     the sm_90 float4 / float2 atomicAdd (aligned, global memory only).
//   * A warp operation releases when every lane named in its mask (lanes that
//     exist: a partial last warp has fewer) waits at the same kind of warp
//     operation with the same mask (and shuffle mode and width). Undefined
//     behaviour on hardware becomes a launch error (cudaErrorLaunchFailure)
//     with a message naming the kernel, the block and the lanes: lanes of a
//     warp waiting at different operations, lanes exited while others wait
//     for them, a lane whose mask leaves itself out, a shuffle that reads a
//     lane outside the mask, __syncthreads at different call sites, or any
//     other deadlock. The emulator does not hang and does not abort the process:
//   * Memory faults inside a kernel (SIGSEGV/SIGBUS/SIGFPE, including a
//     thread stack overflow) end the launch with cudaErrorIllegalAddress; a
//     device assert() ends it with cudaErrorAssert, __trap() with
//     cudaErrorLaunchFailure, a launch running past its CPU-time limit (300 s,
//     set_time_limit) with cudaErrorLaunchTimeout; a
//     misaligned typed access (a 16-byte vector load from an 8-byte aligned
//     pointer, say) ends it with cudaErrorMisalignedAddress, when the file is
//     compiled with -fsanitize=alignment (the test build does; this header
//     provides the sanitizer's handler, no libubsan is linked).
//   * Dynamic shared memory (MSDA_DYNAMIC_SHARED) is filled with 0xFF bytes
//     (NaN for every float type) at the start of every block, and a canary
//     after the requested bytes must survive the block.
//   * Errors: a launch error is left for cudaGetLastError (which clears it) as
//     with <<<>>>; a kernel fault is sticky (every later launch fails) until
//     reset_errors(), as a GPU context stays broken. Messages accumulate in
//     g_message (msda_emu_last_error_message() in the C API).
//   * Host runtime: cudaGetLastError, cudaPeekAtLastError, cudaGetDevice,
//     cudaGetErrorString, cudaGetErrorName, cudaDeviceGetAttribute (an H100 by
//     default: 132 SMs, 227 KiB opt-in shared memory per block, 228 KiB per SM,
//     48 KiB default, 2048 threads and 65536 registers per SM, warp 32; change
//     with msda_emu::set_device), cudaFuncSetAttribute (MaxDynamicSharedMemorySize
//     per kernel, PreferredSharedMemoryCarveout accepted). An attribute not
//     listed is cudaErrorInvalidValue with a message saying so; any other
//     runtime call fails to link (the build uses -Wl,--no-undefined), naming it.
//   * Kernel names in messages come from the library's ELF symbol table.
//
// What is NOT emulated
//   * The memory model and timing: no caches, no reordering, no races between
//     fibers except those the shuffled scheduling exposes; speed says nothing.
//   * Code under `#if defined(__CUDA_ARCH__)`: g++ does not define it, so only
//     the portable #else branch is compiled and run (nvcc compiles the rest).
//     The .cu's one sm_90 branch (vector atomics) sits under
//     MSDA_VECTOR_ATOMICS instead, which a second build defines
//     (load_emulator(vector_atomics=True)), so both branches run here.
//   * Static `__shared__` variables become function-level `static` variables:
//     shared by all threads of a block as on hardware, but zero-initialised once
//     per process and carrying values from block to block (not poisoned).
//     `extern __shared__` must be written as MSDA_DYNAMIC_SHARED.
//   * __launch_bounds__ (ignored), streams (every launch is synchronous),
//     register limits, and out-of-bounds accesses that stay inside mapped
//     memory: the tests fence every buffer with NaN / sentinel margins and
//     inaccessible pages (cuda_emulation.Guarded) for that.
//   * Device-only intrinsics beyond those above (e.g. __fmaf_rn, __popc):
//     add them here when a kernel needs them; the build
//     fails with "was not declared" until then.
//
// Running the tests:  python -m pytest -q tests/ops/test_ms_deform_attn_cuda_emulated.py
// tests/cuda_emulation/__init__.py builds msda_emu_entry.cpp (this header +
// csrc/cuda/ms_deform_attn_cuda.cu, exported as msda_emu_forward/_backward)
// with g++ into build/cuda_emulation/<hash of every source>/ and loads it with
// ctypes; msda_emu_selftest.cpp holds the emulator's own broken-kernel tests.
// The tests skip when g++ or the CUDA headers (cuda_fp16.h) are missing.
// MSDA_EMU_CSRC=/other/checkout/csrc runs another checkout's kernels;
// MSDA_TEST_SEED=<seed> replays the inputs and the block/thread order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <assert.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
// Static shared memory: one instance per kernel instantiation, shared by the
// fibers of the running block (see "What is NOT emulated").
#undef __shared__
#define __shared__ static

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace msda_emu {

// ---------------------------------------------------------------- device ---
struct Device {
  int sm_count = 132;
  int max_shared_optin = 227 * 1024;
};
inline Device g_device;

constexpr size_t kDefaultSharedPerBlock = 48 * 1024;
constexpr size_t kSharedCapacity = 1 << 20;  // upper bound for set_device
constexpr size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xA5;
alignas(256) inline unsigned char g_dynamic_shared[kSharedCapacity + kCanaryBytes];

inline unsigned char* dynamic_shared_base() { return g_dynamic_shared; }

// --------------------------------------------------------------- errors ----
inline cudaError_t g_last_error = cudaSuccess;    // cleared by cudaGetLastError
inline cudaError_t g_sticky_fault = cudaSuccess;  // a kernel fault (until reset_errors)
inline std::string g_message;                     // first message since reset_errors

inline void report(const std::string& message) {
  if (g_message.empty()) {
    g_message = message;
  } else if (g_message.size() < 4000) {
    g_message += "\n" + message;
  }
}

inline void reset_errors() {
  g_last_error = cudaSuccess;
  g_sticky_fault = cudaSuccess;
  g_message.clear();
}

// Kernel names come from the ELF symbol table of the library that holds the
// kernel (kernels live in anonymous namespaces, so dladdr cannot name them).
inline std::string short_demangled(const char* mangled) {
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled ? demangled : mangled;
  std::free(demangled);
  // Drop the parameter list: the first '(' at template depth 0 that does not
  // open "(anonymous namespace)".
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '<') ++depth;
    if (name[i] == '>') --depth;
    if (name[i] == '(' && depth == 0 && name.compare(i, 21, "(anonymous namespace)") != 0) {
      return name.substr(0, i);
    }
  }
  return name;
}

inline std::string kernel_name(const void* function) {
  static std::map<const void*, std::string> cache;
  auto found = cache.find(function);
  if (found != cache.end()) return found->second;
  char fallback[64];
  std::snprintf(fallback, sizeof(fallback), "kernel at %p", function);
  std::string name = fallback;
  Dl_info info{};
  if (dladdr(function, &info) && info.dli_fname) {
    const uintptr_t offset = reinterpret_cast<uintptr_t>(function) - reinterpret_cast<uintptr_t>(info.dli_fbase);
    const int fd = open(info.dli_fname, O_RDONLY);
    struct stat st{};
    if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size > static_cast<off_t>(sizeof(Elf64_Ehdr))) {
      void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (map != MAP_FAILED) {
        const auto* base = static_cast<const unsigned char*>(map);
        const auto* ehdr = reinterpret_cast<const Elf64_Ehdr*>(base);
        const auto* sections = reinterpret_cast<const Elf64_Shdr*>(base + ehdr->e_shoff);
        for (int s = 0; s < ehdr->e_shnum; ++s) {
          if (sections[s].sh_type != SHT_SYMTAB) continue;
          const auto* symbols = reinterpret_cast<const Elf64_Sym*>(base + sections[s].sh_offset);
          const char* strings = reinterpret_cast<const char*>(base + sections[sections[s].sh_link].sh_offset);
          const size_t count = sections[s].sh_size / sizeof(Elf64_Sym);
          for (size_t i = 0; i < count; ++i) {
            if (ELF64_ST_TYPE(symbols[i].st_info) != STT_FUNC) continue;
            if (offset >= symbols[i].st_value && offset < symbols[i].st_value + std::max<uint64_t>(symbols[i].st_size, 1)) {
              name = short_demangled(strings + symbols[i].st_name);
              break;
            }
          }
        }
        munmap(map, st.st_size);
      }
    }
    if (fd >= 0) close(fd);
  }
  cache.emplace(function, name);
  return name;
}

// -------------------------------------------------------------- fibers -----
enum class Wait { kRunnable, kSyncThreads, kWarp, kExited };
enum class WarpOp { kSyncWarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncWarp: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync/__any_sync/__all_sync";
  }
  return "?";
}

struct Thread {
  ucontext_t context;
  char* stack = nullptr;  // lowest address; a guard page sits below usable stack
  uint3 index;
  Wait wait = Wait::kExited;
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0;
  int width = 32;
  int lane_param = 0;  // source lane / delta / lane mask of a shuffle
  uint64_t value = 0;  // the operand's bytes
  uint64_t result = 0;
  const void* site = nullptr;  // call site of __syncthreads
};

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 16 * 1024;
constexpr size_t kSignalStackBytes = 1024 * 1024;  // the fault handler's stack (sigaltstack)

struct Launch {
  const void* kernel;
  void (*invoke)(void*);
  void* closure;
  dim3 grid, block;
  size_t shared_bytes;
};

struct Scheduler {
  Thread* threads = nullptr;  // kMaxThreads, never moved (ucontext holds pointers into itself)
  int allocated_stacks = 0;
  ucontext_t scheduler_context;
  const Launch* launch = nullptr;
  int num_threads = 0;
  int current = -1;  // running fiber, -1 in the scheduler
  bool fault = false;
  cudaError_t fault_code = cudaSuccess;
  uint3 block_index;
  uint64_t rng = 0x9E3779B97F4A7C15ull;
  uint64_t seed = 0x9E3779B97F4A7C15ull;
  std::vector<int> order;
  char* signal_stack = nullptr;
  struct sigaction previous[4];  // SIGSEGV, SIGBUS, SIGFPE, SIGVTALRM outside launches
  double time_limit_seconds = 300;  // CPU seconds per launch (an endless loop ends as a launch error)
  volatile sig_atomic_t timed_out = 0;
  pthread_t launch_thread{};  // the thread running the launch (signals elsewhere are not the kernel's)
};
inline Scheduler g_sched;
inline std::mutex g_launch_mutex;
inline std::string g_launch_log;

inline uint64_t next_random() {
  // splitmix64
  uint64_t z = (g_sched.rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline std::string block_text(uint3 b) {
  char text[64];
  std::snprintf(text, sizeof(text), "block (%u,%u,%u)", b.x, b.y, b.z);
  return text;
}

inline std::string thread_text(uint3 t) {
  char text[64];
  std::snprintf(text, sizeof(text), "thread (%u,%u,%u)", t.x, t.y, t.z);
  return text;
}

inline std::string where() {
  std::string text = kernel_name(g_sched.launch->kernel) + ", " + block_text(g_sched.block_index);
  if (g_sched.current >= 0) text += ", " + thread_text(g_sched.threads[g_sched.current].index);
  return text;
}

// Ends the running fiber's block with a fault; never returns to the fiber.
[[noreturn]] inline void fault_in_fiber(cudaError_t code, const std::string& message) {
  report(message);
  g_sched.fault = true;
  g_sched.fault_code = code;
  g_sched.current = -1;
  setcontext(&g_sched.scheduler_context);
  std::abort();  // unreachable
}

// Gives control back to the scheduler until this fiber is runnable again.
__attribute__((noinline)) inline void suspend() {
  Thread& self = g_sched.threads[g_sched.current];
  swapcontext(&self.context, &g_sched.scheduler_context);
}

inline bool in_kernel() { return g_sched.current >= 0; }

inline void require_in_kernel(const char* what) {
  if (!in_kernel()) {
    std::fprintf(stderr, "msda_emu: %s called outside a kernel\n", what);
    std::abort();
  }
}

inline int lane_of(int linear) { return linear % 32; }

inline uint64_t warp_call(WarpOp op, unsigned mask, int width, int lane_param, uint64_t value) {
  require_in_kernel(warp_op_name(op));
  const int self_index = g_sched.current;
  Thread& self = g_sched.threads[self_index];
  const int lane = lane_of(self_index);
  if (!(mask >> lane & 1u)) {
    char text[160];
    std::snprintf(text, sizeof(text), "%s with mask 0x%08x called by lane %d, which the mask leaves out", warp_op_name(op),
                  mask, lane);
    fault_in_fiber(cudaErrorLaunchFailure, "msda_emu: " + std::string(text) + " (" + where() + ")");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fault_in_fiber(cudaErrorLaunchFailure, "msda_emu: " + std::string(warp_op_name(op)) + " with width " +
                                               std::to_string(width) + " (not a power of two <= 32) (" + where() + ")");
  }
  self.wait = Wait::kWarp;
  self.op = op;
  self.mask = mask;
  self.width = width;
  self.lane_param = lane_param;
  self.value = value;
  suspend();
  return self.result;
}

__attribute__((noinline)) inline void syncthreads_at(const void* site) {
  require_in_kernel("__syncthreads");
  Thread& self = g_sched.threads[g_sched.current];
  self.wait = Wait::kSyncThreads;
  self.site = site;
  suspend();
}

// --------------------------------------------------------------- faults ----
inline std::string time_limit_text() {
  char text[160];
  std::snprintf(text, sizeof(text), "msda_emu: the launch ran past its time limit of %g CPU seconds (an endless loop?)",
                g_sched.time_limit_seconds);
  return text;
}

inline void signal_handler(int signal, siginfo_t* info, void*) {
  // The process may have other threads (torch's pools). ITIMER_VIRTUAL's
  // signal is process-directed and can land on any of them: pass it on to the
  // launch's thread. A fault on another thread is not the kernel's.
  const bool on_launch_thread = in_kernel() && pthread_equal(pthread_self(), g_sched.launch_thread);
  if (signal == SIGVTALRM && in_kernel() && !on_launch_thread) {
    pthread_kill(g_sched.launch_thread, SIGVTALRM);
    return;
  }
  if (signal == SIGVTALRM) {
    g_sched.timed_out = 1;  // the scheduler checks it between fibers
    if (in_kernel()) fault_in_fiber(cudaErrorLaunchTimeout, time_limit_text() + " (" + where() + ")");
    return;
  }
  if (!on_launch_thread) {
    // Not a kernel's fault: restore the previous handler and let the
    // faulting instruction run again under it.
    const int which = signal == SIGSEGV ? 0 : signal == SIGBUS ? 1 : 2;  // (SIGVTALRM returned above)
    sigaction(signal, &g_sched.previous[which], nullptr);
    return;
  }
  const Thread& self = g_sched.threads[g_sched.current];
  const char* addr = static_cast<const char*>(info->si_addr);
  char text[200];
  if (signal == SIGSEGV && addr >= self.stack && addr < self.stack + kGuardBytes) {
    std::snprintf(text, sizeof(text), "stack overflow of a thread (%zu KiB per thread)", (kStackBytes - kGuardBytes) / 1024);
  } else {
    std::snprintf(text, sizeof(text), "%s at address %p", signal == SIGFPE ? "arithmetic exception" : "illegal memory access",
                  info->si_addr);
  }
  fault_in_fiber(signal == SIGFPE ? cudaErrorLaunchFailure : cudaErrorIllegalAddress,
                 "msda_emu: " + std::string(text) + " (" + where() + ")");
}

// ------------------------------------------------------------ scheduling ---
inline void fiber_main() {
  g_sched.launch->invoke(g_sched.launch->closure);
  g_sched.threads[g_sched.current].wait = Wait::kExited;
  swapcontext(&g_sched.threads[g_sched.current].context, &g_sched.scheduler_context);
  std::abort();  // an exited fiber is never resumed
}

inline void prepare_threads(int count) {
  if (!g_sched.threads) g_sched.threads = new Thread[kMaxThreads];
  for (; g_sched.allocated_stacks < count; ++g_sched.allocated_stacks) {
    Thread& t = g_sched.threads[g_sched.allocated_stacks];
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) {
      std::fprintf(stderr, "msda_emu: cannot map a thread stack\n");
      std::abort();
    }
    mprotect(stack, kGuardBytes, PROT_NONE);
    t.stack = static_cast<char*>(stack);
    getcontext(&t.context);
  }
}

inline std::string lanes_text(const std::vector<int>& lanes) {
  std::string text;
  for (size_t i = 0; i < lanes.size();) {
    size_t j = i;
    while (j + 1 < lanes.size() && lanes[j + 1] == lanes[j] + 1) ++j;
    if (!text.empty()) text += ",";
    text += std::to_string(lanes[i]);
    if (j > i) text += "-" + std::to_string(lanes[j]);
    i = j + 1;
  }
  return text;
}

inline std::string wait_text(const Thread& t) {
  char text[160];
  switch (t.wait) {
    case Wait::kRunnable: return "runnable";
    case Wait::kExited: return "exited";
    case Wait::kSyncThreads:
      std::snprintf(text, sizeof(text), "wait at __syncthreads (call site %p)", t.site);
      return text;
    case Wait::kWarp:
      std::snprintf(text, sizeof(text), "wait at %s(mask 0x%08x, width %d)", warp_op_name(t.op), t.mask, t.width);
      return text;
  }
  return "?";
}

// Describes every warp whose lanes do not all wait at the same place.
inline std::string describe_stall() {
  std::string text;
  const int warps = (g_sched.num_threads + 31) / 32;
  int described = 0;
  for (int w = 0; w < warps && described < 4; ++w) {
    const int first = w * 32, last = std::min(g_sched.num_threads, first + 32);
    std::map<std::string, std::vector<int>> groups;
    bool waiting = false;
    for (int i = first; i < last; ++i) {
      groups[wait_text(g_sched.threads[i])].push_back(i - first);
      waiting = waiting || g_sched.threads[i].wait != Wait::kExited;
    }
    if (!waiting || (groups.size() == 1 && groups.begin()->first.rfind("wait at __syncthreads", 0) == 0)) continue;
    ++described;
    text += "\n  warp " + std::to_string(w) + ":";
    for (const auto& [what, lanes] : groups) text += " lanes " + lanes_text(lanes) + " " + what + ";";
  }
  return text;
}

// Releases every warp operation whose lanes have all arrived, then a
// __syncthreads that every live thread waits at. Returns false on a stall
// (with the message reported) and on undefined behaviour.
inline bool release_waiters() {
  bool released = false;
  Thread* threads = g_sched.threads;
  const int warps = (g_sched.num_threads + 31) / 32;
  for (int w = 0; w < warps; ++w) {
    const int first = w * 32, count = std::min(g_sched.num_threads - first, 32);
    const unsigned existing = count == 32 ? 0xffffffffu : ((1u << count) - 1u);
    for (int lane = 0; lane < count; ++lane) {
      const Thread& leader = threads[first + lane];
      if (leader.wait != Wait::kWarp) continue;
      // The group: lanes waiting at the same kind of operation with the same mask.
      unsigned arrived = 0;
      for (int other = 0; other < count; ++other) {
        const Thread& t = threads[first + other];
        if (t.wait == Wait::kWarp && t.op == leader.op && t.mask == leader.mask && t.width == leader.width) {
          arrived |= 1u << other;
        }
      }
      if (arrived != (leader.mask & existing)) continue;
      // Release the group: compute every lane's result (PTX shfl.sync semantics).
      for (int other = 0; other < count; ++other) {
        if (!(arrived >> other & 1u)) continue;
        Thread& t = threads[first + other];
        if (t.op == WarpOp::kSyncWarp) {
          t.result = 0;
        } else if (t.op == WarpOp::kBallot) {
          uint64_t ballot = 0;
          for (int src = 0; src < count; ++src) {
            if ((arrived >> src & 1u) && threads[first + src].value != 0) ballot |= uint64_t(1) << src;
          }
          t.result = ballot;
        } else {
          const int segmask = (32 - t.width) & 31;
          const int cval = t.op == WarpOp::kShflUp ? 0 : 31;
          const int b = t.lane_param & 31;
          const int max_lane = (other & segmask) | (cval & ~segmask);
          const int min_lane = other & segmask;
          int j = other;
          bool in_range = true;
          switch (t.op) {
            case WarpOp::kShflUp: j = other - b; in_range = j >= max_lane; break;
            case WarpOp::kShflDown: j = other + b; in_range = j <= max_lane; break;
            case WarpOp::kShflXor: j = other ^ b; in_range = j <= max_lane; break;
            default: j = min_lane | (b & ~segmask); in_range = j <= max_lane; break;
          }
          if (!in_range) j = other;
          if (j < 0 || j >= count || !(arrived >> j & 1u)) {
            char text[200];
            std::snprintf(text, sizeof(text), "msda_emu: %s(mask 0x%08x) in lane %d reads lane %d, which is %s",
                          warp_op_name(t.op), t.mask, other, j, j >= count ? "past the end of the block" : "not in the mask");
            report(std::string(text) + " (" + kernel_name(g_sched.launch->kernel) + ", " +
                   block_text(g_sched.block_index) + ", warp " + std::to_string(w) + ")");
            return false;
          }
          t.result = threads[first + j].value;
        }
      }
      for (int other = 0; other < count; ++other) {
        if (arrived >> other & 1u) threads[first + other].wait = Wait::kRunnable;
      }
      released = true;
    }
  }
  if (released) return true;

  // __syncthreads: every live thread waits, all at the same call site.
  int live = 0, at_barrier = 0;
  const void* site = nullptr;
  bool same_site = true;
  for (int i = 0; i < g_sched.num_threads; ++i) {
    const Thread& t = threads[i];
    if (t.wait == Wait::kExited) continue;
    ++live;
    if (t.wait == Wait::kSyncThreads) {
      if (at_barrier++ == 0) site = t.site;
      same_site = same_site && t.site == site;
    }
  }
  if (live > 0 && at_barrier == live) {
    if (!same_site) {
      std::string text = "msda_emu: threads wait at different __syncthreads calls (" +
                         kernel_name(g_sched.launch->kernel) + ", " + block_text(g_sched.block_index) + ")";
      std::map<const void*, std::vector<int>> by_site;
      for (int i = 0; i < g_sched.num_threads; ++i) {
        if (threads[i].wait == Wait::kSyncThreads) by_site[threads[i].site].push_back(i);
      }
      for (const auto& [where_at, ids] : by_site) {
        char head[64];
        std::snprintf(head, sizeof(head), "\n  call site %p: threads ", where_at);
        text += head + lanes_text(ids);
      }
      report(text);
      return false;
    }
    for (int i = 0; i < g_sched.num_threads; ++i) {
      if (threads[i].wait == Wait::kSyncThreads) threads[i].wait = Wait::kRunnable;
    }
    return true;
  }
  report("msda_emu: deadlock: no thread can go on (" + kernel_name(g_sched.launch->kernel) + ", " +
         block_text(g_sched.block_index) + ")" + describe_stall());
  return false;
}

// Runs one block; false when it faulted or stalled (message reported).
inline bool run_block(uint3 block_index) {
  const Launch& launch = *g_sched.launch;
  g_sched.block_index = block_index;
  blockIdx = block_index;
  std::memset(g_dynamic_shared, 0xFF, launch.shared_bytes);
  std::memset(g_dynamic_shared + launch.shared_bytes, kCanary, kCanaryBytes);
  const int n = g_sched.num_threads;
  for (int i = 0; i < n; ++i) {
    Thread& t = g_sched.threads[i];
    t.index = uint3{static_cast<unsigned>(i % launch.block.x), static_cast<unsigned>(i / launch.block.x % launch.block.y),
                    static_cast<unsigned>(i / (launch.block.x * launch.block.y))};
    t.wait = Wait::kRunnable;
    t.context.uc_stack.ss_sp = t.stack + kGuardBytes;
    t.context.uc_stack.ss_size = kStackBytes - kGuardBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, fiber_main, 0);
  }
  std::vector<int>& order = g_sched.order;
  for (;;) {
    order.clear();
    for (int i = 0; i < n; ++i) {
      if (g_sched.threads[i].wait == Wait::kRunnable) order.push_back(i);
    }
    if (order.empty()) {
      bool all_exited = true;
      for (int i = 0; i < n; ++i) all_exited = all_exited && g_sched.threads[i].wait == Wait::kExited;
      if (all_exited) break;
      if (!release_waiters()) {
        g_sched.fault = true;
        g_sched.fault_code = cudaErrorLaunchFailure;
        return false;
      }
      continue;
    }
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
    for (const int i : order) {
      g_sched.current = i;
      threadIdx = g_sched.threads[i].index;
      swapcontext(&g_sched.scheduler_context, &g_sched.threads[i].context);
      g_sched.current = -1;
      if (g_sched.fault) return false;
      if (g_sched.timed_out) {
        report(time_limit_text() + " (" + kernel_name(launch.kernel) + ", " + block_text(block_index) + ")");
        g_sched.fault = true;
        g_sched.fault_code = cudaErrorLaunchTimeout;
        return false;
      }
    }
  }
  for (size_t i = 0; i < kCanaryBytes; ++i) {
    if (g_dynamic_shared[launch.shared_bytes + i] != kCanary) {
      report("msda_emu: a thread wrote past the end of the dynamic shared memory (" +
             std::to_string(launch.shared_bytes) + " bytes, byte " + std::to_string(launch.shared_bytes + i) + ") (" +
             kernel_name(launch.kernel) + ", " + block_text(block_index) + ")");
      g_sched.fault = true;
      g_sched.fault_code = cudaErrorIllegalAddress;
      return false;
    }
  }
  return true;
}

inline std::map<const void*, int>& max_dynamic_shared() {
  static std::map<const void*, int> limits;
  return limits;
}

inline cudaError_t launch_error(cudaError_t code, const std::string& message) {
  report("msda_emu: " + message);
  g_last_error = code;
  return code;
}

inline std::string dim_text(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline cudaError_t run_launch(const Launch& launch) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const dim3 g = launch.grid, b = launch.block;
  const std::string name = kernel_name(launch.kernel);
  g_launch_log += name + " grid=" + dim_text(g) + " block=" + dim_text(b) + " shared=" +
                  std::to_string(launch.shared_bytes) + "\n";
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024) {
    return launch_error(cudaErrorInvalidConfiguration, "invalid block size " + dim_text(b) + " for " + name);
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    return launch_error(cudaErrorInvalidConfiguration, "invalid grid size " + dim_text(g) + " for " + name);
  }
  const auto raised = max_dynamic_shared().find(launch.kernel);
  const size_t limit = raised != max_dynamic_shared().end() ? size_t(raised->second)
                                                            : std::min(kDefaultSharedPerBlock, size_t(g_device.max_shared_optin));
  if (launch.shared_bytes > limit || launch.shared_bytes > size_t(g_device.max_shared_optin)) {
    return launch_error(cudaErrorInvalidValue,
                        "dynamic shared memory of " + std::to_string(launch.shared_bytes) + " bytes for " + name +
                            " exceeds its limit of " + std::to_string(std::min(limit, size_t(g_device.max_shared_optin))) +
                            " bytes (48 KiB unless raised with cudaFuncSetAttribute"
                            "(cudaFuncAttributeMaxDynamicSharedMemorySize), at most " +
                            std::to_string(g_device.max_shared_optin) + ")");
  }
  if (g_sticky_fault != cudaSuccess) {
    return launch_error(g_sticky_fault, "launch of " + name + " after an earlier kernel fault");
  }
  prepare_threads(static_cast<int>(threads));
  // The fault handler formats its report on this stack (dladdr, the ELF
  // symbol walk, demangling): give it room, mapped on its own with an
  // inaccessible page below, so that it can never run into the heap.
  if (!g_sched.signal_stack) {
    void* map = mmap(nullptr, kSignalStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return launch_error(cudaErrorMemoryAllocation, "msda_emu: no memory for the signal stack");
    mprotect(map, kGuardBytes, PROT_NONE);
    g_sched.signal_stack = static_cast<char*>(map) + kGuardBytes;
  }
  stack_t signal_stack{}, old_signal_stack{};
  signal_stack.ss_sp = g_sched.signal_stack;
  signal_stack.ss_size = kSignalStackBytes;
  sigaltstack(&signal_stack, &old_signal_stack);
  struct sigaction action{};
  action.sa_sigaction = signal_handler;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &g_sched.previous[0]);
  sigaction(SIGBUS, &action, &g_sched.previous[1]);
  sigaction(SIGFPE, &action, &g_sched.previous[2]);
  sigaction(SIGVTALRM, &action, &g_sched.previous[3]);
  g_sched.timed_out = 0;
  itimerval timer{}, previous_timer{};
  timer.it_value.tv_sec = static_cast<time_t>(g_sched.time_limit_seconds);
  timer.it_value.tv_usec = static_cast<suseconds_t>((g_sched.time_limit_seconds - timer.it_value.tv_sec) * 1e6);
  setitimer(ITIMER_VIRTUAL, &timer, &previous_timer);

  g_sched.launch_thread = pthread_self();
  g_sched.launch = &launch;
  g_sched.num_threads = static_cast<int>(threads);
  g_sched.fault = false;
  g_sched.fault_code = cudaSuccess;
  g_sched.rng = g_sched.seed;
  gridDim = g;
  blockDim = b;
  // Blocks in a shuffled order: a random permutation of the linear block index.
  const uint64_t blocks = uint64_t(g.x) * g.y * g.z;
  std::vector<uint32_t> block_order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) block_order[i] = static_cast<uint32_t>(i);
  for (uint64_t i = blocks; i > 1; --i) std::swap(block_order[i - 1], block_order[next_random() % i]);
  for (const uint32_t linear : block_order) {
    const uint3 index{static_cast<unsigned>(linear % g.x), static_cast<unsigned>(linear / g.x % g.y),
                      static_cast<unsigned>(linear / (uint64_t(g.x) * g.y))};
    if (!run_block(index)) break;
  }

  sigaction(SIGSEGV, &g_sched.previous[0], nullptr);
  sigaction(SIGBUS, &g_sched.previous[1], nullptr);
  sigaction(SIGFPE, &g_sched.previous[2], nullptr);
  setitimer(ITIMER_VIRTUAL, &previous_timer, nullptr);
  // A SIGVTALRM still pending from this launch's timer is discarded (setting
  // SIG_IGN does that) before the previous action, often the default one,
  // which ends the process, comes back.
  struct sigaction ignore{};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  sigaction(SIGVTALRM, &ignore, nullptr);
  sigaction(SIGVTALRM, &g_sched.previous[3], nullptr);
  sigaltstack(&old_signal_stack, nullptr);
  g_sched.launch = nullptr;
  if (g_sched.fault) {
    g_sticky_fault = g_sched.fault_code;
    g_last_error = g_sched.fault_code;
    return g_sched.fault_code;
  }
  return cudaSuccess;
}

// MSDA_LAUNCH(kernel, ...) builds one of these; calling it runs the grid.
// The kernel's parameter types P... come from the kernel pointer, so the
// arguments convert as they would for a <<<>>> launch.
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;

  Launcher(void (*k)(P...), dim3 g, dim3 b, size_t shared, cudaStream_t) : kernel(k), grid(g), block(b), shared_bytes(shared) {}

  void operator()(P... args) const {
    auto call = [&]() { kernel(args...); };
    using Call = decltype(call);
    Launch launch{reinterpret_cast<const void*>(kernel), [](void* c) { (*static_cast<Call*>(c))(); }, &call, grid, block,
                  shared_bytes};
    run_launch(launch);  // the error is left for cudaGetLastError, as with <<<>>>
  }
};

// Launch configurations: negative ints must not wrap to valid sizes.
inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(long long n) { return dim3(n < 0 || n > 0xffffffffll ? 0u : static_cast<unsigned>(n)); }
inline dim3 to_dim3(unsigned long long n) { return dim3(n > 0xffffffffull ? 0u : static_cast<unsigned>(n)); }
inline dim3 to_dim3(int n) { return to_dim3(static_cast<long long>(n)); }
inline dim3 to_dim3(long n) { return to_dim3(static_cast<long long>(n)); }
inline dim3 to_dim3(unsigned n) { return dim3(n); }
inline dim3 to_dim3(unsigned long n) { return to_dim3(static_cast<unsigned long long>(n)); }

inline size_t to_shared_bytes(long long n) { return n < 0 ? ~size_t(0) : size_t(n); }
inline size_t to_shared_bytes(unsigned long long n) { return size_t(n); }
inline size_t to_shared_bytes(int n) { return to_shared_bytes(static_cast<long long>(n)); }
inline size_t to_shared_bytes(long n) { return to_shared_bytes(static_cast<long long>(n)); }
inline size_t to_shared_bytes(unsigned n) { return size_t(n); }
inline size_t to_shared_bytes(unsigned long n) { return size_t(n); }

// ------------------------------------------------------------ host API -----
inline void set_device(int sm_count, int max_shared_optin) {
  g_device.sm_count = sm_count;
  g_device.max_shared_optin = std::min<int>(max_shared_optin, static_cast<int>(kSharedCapacity));
}

inline void set_time_limit(double seconds) { g_sched.time_limit_seconds = seconds > 0 ? seconds : 300; }

inline void set_seed(uint64_t seed) { g_sched.seed = seed ^ 0x9E3779B97F4A7C15ull; }

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp operations take types of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace msda_emu

#define MSDA_LAUNCH(kernel, blocks, threads, shared_bytes, stream)                                    \
  ::msda_emu::Launcher(kernel, ::msda_emu::to_dim3(blocks), ::msda_emu::to_dim3(threads),                \
                       ::msda_emu::to_shared_bytes(shared_bytes), stream)
// A fixed address: valid at namespace scope and in every block (its content
// is poisoned at each block start).
#define MSDA_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(::msda_emu::dynamic_shared_base())

// ------------------------------------------------------- device functions --
__attribute__((noinline)) inline void __syncthreads() { msda_emu::syncthreads_at(__builtin_return_address(0)); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  msda_emu::warp_call(msda_emu::WarpOp::kSyncWarp, mask, 32, 0, 0);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return msda_emu::from_bits<T>(msda_emu::warp_call(msda_emu::WarpOp::kShflIdx, mask, width, src_lane, msda_emu::to_bits(var)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return msda_emu::from_bits<T>(
      msda_emu::warp_call(msda_emu::WarpOp::kShflUp, mask, width, static_cast<int>(delta), msda_emu::to_bits(var)));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return msda_emu::from_bits<T>(
      msda_emu::warp_call(msda_emu::WarpOp::kShflDown, mask, width, static_cast<int>(delta), msda_emu::to_bits(var)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return msda_emu::from_bits<T>(msda_emu::warp_call(msda_emu::WarpOp::kShflXor, mask, width, lane_mask, msda_emu::to_bits(var)));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(msda_emu::warp_call(msda_emu::WarpOp::kBallot, mask, 32, 0, predicate != 0));
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

inline float atomicAdd(float* address, float v) { const float old = *address; *address = old + v; return old; }
inline double atomicAdd(double* address, double v) { const double old = *address; *address = old + v; return old; }
inline int atomicAdd(int* address, int v) { const int old = *address; *address = old + v; return old; }
inline unsigned atomicAdd(unsigned* address, unsigned v) { const unsigned old = *address; *address = old + v; return old; }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long v) {
  const unsigned long long old = *address;
  *address = old + v;
  return old;
}
// float4 / float2 atomicAdd (sm_90+; the .cu calls them under
// MSDA_VECTOR_ATOMICS, which the emulator's sm_90 build defines). As on the
// GPU they need an address aligned to the vector's size
// (cudaErrorMisalignedAddress otherwise) and work on global memory only.
// g_vector_atomics counts them, so that a test can tell the branch ran.
namespace msda_emu {
inline uint64_t g_vector_atomics = 0;

template <typename V>
inline void check_vector_atomic(const V* address, const char* type) {
  require_in_kernel("a vector atomicAdd");
  const auto bytes = reinterpret_cast<uintptr_t>(address);
  if (bytes % sizeof(V) != 0) {
    char text[200];
    std::snprintf(text, sizeof(text), "msda_emu: misaligned access: %s atomicAdd at %p (needs %zu-byte alignment)", type,
                  static_cast<const void*>(address), sizeof(V));
    fault_in_fiber(cudaErrorMisalignedAddress, std::string(text) + " (" + where() + ")");
  }
  const auto shared = reinterpret_cast<uintptr_t>(g_dynamic_shared);
  if (bytes >= shared && bytes < shared + sizeof(g_dynamic_shared)) {
    fault_in_fiber(cudaErrorIllegalAddress, "msda_emu: " + std::string(type) +
                                                " atomicAdd on shared memory (vector atomics work on global memory only) (" +
                                                where() + ")");
  }
  ++g_vector_atomics;
}
}  // namespace msda_emu

inline float4 atomicAdd(float4* address, float4 v) {
  msda_emu::check_vector_atomic(address, "float4");
  const float4 old = *address;
  *address = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
  return old;
}
inline float2 atomicAdd(float2* address, float2 v) {
  msda_emu::check_vector_atomic(address, "float2");
  const float2 old = *address;
  *address = make_float2(old.x + v.x, old.y + v.y);
  return old;
}
template <typename T>
inline T atomicExch(T* address, T v) { const T old = *address; *address = v; return old; }
template <typename T>
inline T atomicMax(T* address, T v) { const T old = *address; *address = old < v ? v : old; return old; }
template <typename T>
inline T atomicMin(T* address, T v) { const T old = *address; *address = v < old ? v : old; return old; }

template <typename T>
inline T __ldg(const T* address) { return *address; }

// A failed device assert() or __trap() ends the launch (cudaErrorAssert /
// cudaErrorLaunchFailure) instead of aborting the process; assert() in host
// code still aborts.
extern "C" inline void __assert_fail(const char* assertion, const char* file, unsigned int line,
                                     const char* function) noexcept {
  if (msda_emu::in_kernel()) {
    msda_emu::fault_in_fiber(cudaErrorAssert, "msda_emu: device assertion `" + std::string(assertion) + "` failed at " +
                                                   file + ":" + std::to_string(line) + " in " + function + " (" +
                                                   msda_emu::where() + ")");
  }
  std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
  std::abort();
}

[[noreturn]] inline void __trap() {
  msda_emu::require_in_kernel("__trap");
  msda_emu::fault_in_fiber(cudaErrorLaunchFailure, "msda_emu: __trap() (" + msda_emu::where() + ")");
}

// ---------------------------------------------------------- CUDA runtime ---
// Hidden visibility (the build passes -fvisibility=hidden): a real libcudart
// in the same process can neither see nor replace these.
extern "C" {

inline cudaError_t cudaGetLastError(void) {
  const cudaError_t error = msda_emu::g_last_error;
  msda_emu::g_last_error = msda_emu::g_sticky_fault;
  return error;
}

inline cudaError_t cudaPeekAtLastError(void) { return msda_emu::g_last_error; }

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorAssert: return "cudaErrorAssert";
    default: return "cudaError (other)";
  }
}

inline const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) {
    msda_emu::report("msda_emu: cudaDeviceGetAttribute for device " + std::to_string(device) + " (only device 0 exists)");
    return msda_emu::g_last_error = cudaErrorInvalidDevice;
  }
  const msda_emu::Device& d = msda_emu::g_device;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.max_shared_optin; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.max_shared_optin + 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = std::min(static_cast<int>(msda_emu::kDefaultSharedPerBlock), d.max_shared_optin);
      break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = 65536; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    default:
      msda_emu::report("msda_emu: cudaDeviceGetAttribute(" + std::to_string(static_cast<int>(attr)) +
                       ") is not emulated; add it to msda_emu.h");
      return msda_emu::g_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || value > msda_emu::g_device.max_shared_optin) {
        msda_emu::report("msda_emu: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(value) +
                         ") for " + msda_emu::kernel_name(func) + " exceeds the opt-in maximum of " +
                         std::to_string(msda_emu::g_device.max_shared_optin) + " bytes");
        return msda_emu::g_last_error = cudaErrorInvalidValue;
      }
      msda_emu::max_dynamic_shared()[func] = value;
      return cudaSuccess;
    case cudaFuncAttributePreferredSharedMemoryCarveout:
      if (value < -1 || value > 100) return msda_emu::g_last_error = cudaErrorInvalidValue;
      return cudaSuccess;
    default:
      msda_emu::report("msda_emu: cudaFuncSetAttribute(" + std::to_string(static_cast<int>(attr)) +
                       ") is not emulated; add it to msda_emu.h");
      return msda_emu::g_last_error = cudaErrorInvalidValue;
  }
}

}  // extern "C"

// The C++ overload nvcc's cuda_runtime.h declares (only under __CUDACC__):
// cudaFuncSetAttribute(kernel, ...) with a kernel pointer.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

extern "C" {

// -fsanitize=alignment calls this for a misaligned typed access.
struct MsdaUbsanSourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct MsdaUbsanTypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct MsdaUbsanTypeMismatchData {
  MsdaUbsanSourceLocation location;
  const MsdaUbsanTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char type_check_kind;
};

// Not inline: the compiler emits the calls, so the definition must exist.
void __ubsan_handle_type_mismatch_v1(void* raw, void* pointer) {
  const auto* data = static_cast<const MsdaUbsanTypeMismatchData*>(raw);
  char text[512];
  std::snprintf(text, sizeof(text), "msda_emu: misaligned access: %s of %zu-byte aligned type %s at %p, %s:%u",
                data->type_check_kind == 0 ? "load" : data->type_check_kind == 1 ? "store" : "access",
                size_t(1) << data->log_alignment, data->type ? data->type->name : "?", pointer,
                data->location.file ? data->location.file : "?", data->location.line);
  if (msda_emu::in_kernel()) msda_emu::fault_in_fiber(cudaErrorMisalignedAddress, std::string(text) + " (" + msda_emu::where() + ")");
  msda_emu::report(std::string(text) + " (host code)");
}

}  // extern "C"
