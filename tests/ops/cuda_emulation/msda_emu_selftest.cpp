// Kernels that test the emulator itself (tests/ops/test_ms_deform_attn_cuda_emulated.py):
// correct ones whose results are known, and deliberately broken ones that a
// real GPU would run into undefined behaviour with, which the emulator must
// report as launch errors. Each msda_emu_selftest_* function launches one
// kernel and returns the launch's cudaError_t.
#include "msda_emu.h"

#include "msda_emu_api.h"

#define SELFTEST extern "C" __attribute__((visibility("default")))

namespace {

#ifndef MSDA_LAUNCH
#error "msda_emu.h defines MSDA_LAUNCH"
#endif

cudaError_t finish() { return cudaGetLastError(); }

// ----------------------------------------------------------- correct -----
// Per thread (blockDim.x threads, one block): out[8 * t + k] =
//   0: sum over the warp of lane ids (xor butterfly)     1: __shfl_sync from lane 3
//   2: __shfl_down_sync by 1, width 8                      3: __shfl_up_sync by 2, width 16
//   4: __ballot_sync(lane is odd) as float                 5: atomicAdd's old value order check
//   6: shared-memory neighbour after __syncthreads         7: x + 100 y + 10000 z of threadIdx
__global__ void semantics_kernel(float* out, int* counter) {
  MSDA_DYNAMIC_SHARED(float, shared);
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int lane = t % 32;
  float sum = static_cast<float>(lane);
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  out[8 * t + 0] = sum;
  out[8 * t + 1] = __shfl_sync(0xffffffffu, static_cast<float>(lane), 3);
  out[8 * t + 2] = __shfl_down_sync(0xffffffffu, static_cast<float>(lane), 1, 8);
  out[8 * t + 3] = __shfl_up_sync(0xffffffffu, static_cast<float>(lane), 2, 16);
  out[8 * t + 4] = static_cast<float>(__ballot_sync(0xffffffffu, lane & 1) == 0xAAAAAAAAu);
  const int old = atomicAdd(counter, 1);
  out[8 * t + 5] = static_cast<float>(old >= 0 && old < static_cast<int>(blockDim.x * blockDim.y * blockDim.z));
  shared[t] = static_cast<float>(t);
  __syncthreads();
  const int n = blockDim.x * blockDim.y * blockDim.z;
  out[8 * t + 6] = shared[(t + 1) % n];
  out[8 * t + 7] = static_cast<float>(threadIdx.x + 100 * threadIdx.y + 10000 * threadIdx.z);
}

// Sums over groups of 8 lanes in a block of 40 threads (warp 1 has 8 lanes):
// a full-mask shuffle in a partial last warp waits for the lanes that exist.
__global__ void partial_warp_kernel(double* out) {
  double v = 1.0;
  for (int offset = 4; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

// BROKEN: a whole-warp sum in a partial last warp reads lanes that do not exist.
__global__ void partial_warp_full_sum_kernel(double* out) {
  double v = 1.0;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

// Reads dynamic shared memory it never wrote: must see the 0xFF poison.
__global__ void unwritten_shared_kernel(float* out) {
  MSDA_DYNAMIC_SHARED(float, shared);
  out[threadIdx.x] = shared[threadIdx.x];
}

// Writes smem[t] then reads smem[t + 1] WITHOUT a barrier: the shuffled
// thread order makes some reads see the poison.
__global__ void missing_barrier_kernel(float* out) {
  MSDA_DYNAMIC_SHARED(float, shared);
  shared[threadIdx.x] = 1.0f;
  out[threadIdx.x] = shared[(threadIdx.x + 1) % blockDim.x];
}

__global__ void noop_kernel(float*) {}

__global__ void block_order_kernel(int* out, int* counter) {
  if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(counter, 1);
}

// ------------------------------------------------------------ broken -----
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v += __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void exited_lane_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void lonely_syncthreads_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();  // no partner: every other thread waits at the next one
  }
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_reads_outside_mask_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 20);
}

__global__ void syncthreads_vs_shuffle_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

__global__ void shared_kernel(float* out) {
  MSDA_DYNAMIC_SHARED(float, shared);
  shared[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = shared[threadIdx.x];
}

__global__ void shared_overrun_kernel(float* out, int floats) {
  MSDA_DYNAMIC_SHARED(float, shared);
  shared[floats + threadIdx.x] = 1.0f;  // past the end
  out[threadIdx.x] = 0.0f;
}

struct alignas(16) Vector4 {
  float v[4];
};

__global__ void misaligned_vector_kernel(const float* in, float* out) {
  const Vector4 v = *reinterpret_cast<const Vector4*>(in + 1);
  out[threadIdx.x] = v.v[0];
}

// Each thread adds (1, 2, 3, 4) to the float4 at out + 4 * (threadIdx.x % 2)
// + offset, and (5, 6) to the float2 at out + 8 + 2 * (threadIdx.x % 2) + offset.
__global__ void vector_atomics_kernel(float* out, int offset) {
  atomicAdd(reinterpret_cast<float4*>(out + 4 * (threadIdx.x % 2) + offset), make_float4(1.0f, 2.0f, 3.0f, 4.0f));
  atomicAdd(reinterpret_cast<float2*>(out + 8 + 2 * (threadIdx.x % 2) + offset), make_float2(5.0f, 6.0f));
}

__global__ void shared_vector_atomic_kernel(float* out) {
  MSDA_DYNAMIC_SHARED(float, shared);
  if (threadIdx.x < 4) shared[threadIdx.x] = 0.0f;
  __syncthreads();
  atomicAdd(reinterpret_cast<float4*>(shared), make_float4(1.0f, 1.0f, 1.0f, 1.0f));
  out[threadIdx.x] = 0.0f;
}

__global__ void illegal_address_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x]; }

__global__ void stack_overflow_kernel(float* out, int index) {
  volatile float big[1 << 17];  // 512 KiB: more than a thread's stack
  big[index] = 1.0f;
  out[threadIdx.x] = big[index];
}

__global__ void endless_loop_kernel(float* out) {
  volatile int spin = 1;
  while (spin) {
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void assert_kernel(float* out) {
  assert(threadIdx.x != 7 && "thread 7 must not get here");
  out[threadIdx.x] = 1.0f;
}

}  // namespace

SELFTEST int msda_emu_selftest_endless_loop(float* out) {
  const auto kernel = endless_loop_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_assert(float* out) {
  const auto kernel = assert_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_semantics(float* out, int* counter, int x, int y, int z) {
  const auto kernel = semantics_kernel;
  MSDA_LAUNCH(kernel, 1, dim3(x, y, z), x * y * z * sizeof(float), nullptr)(out, counter);
  return finish();
}

SELFTEST int msda_emu_selftest_partial_warp(double* out) {
  const auto kernel = partial_warp_kernel;
  MSDA_LAUNCH(kernel, 1, 40, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_partial_warp_full_sum(double* out) {
  const auto kernel = partial_warp_full_sum_kernel;
  MSDA_LAUNCH(kernel, 1, 40, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_unwritten_shared(float* out, int threads) {
  const auto kernel = unwritten_shared_kernel;
  MSDA_LAUNCH(kernel, 1, threads, threads * sizeof(float), nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_missing_barrier(float* out, int threads) {
  const auto kernel = missing_barrier_kernel;
  MSDA_LAUNCH(kernel, 1, threads, threads * sizeof(float), nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_block_order(int* out, int* counter, int blocks) {
  const auto kernel = block_order_kernel;
  MSDA_LAUNCH(kernel, blocks, 32, 0, nullptr)(out, counter);
  return finish();
}

SELFTEST int msda_emu_selftest_divergent_shuffle(float* out) {
  const auto kernel = divergent_shuffle_kernel;
  MSDA_LAUNCH(kernel, 2, 64, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_exited_lane_shuffle(float* out) {
  const auto kernel = exited_lane_shuffle_kernel;
  MSDA_LAUNCH(kernel, 1, 64, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_lonely_syncthreads(float* out) {
  const auto kernel = lonely_syncthreads_kernel;
  MSDA_LAUNCH(kernel, 1, 64, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_shuffle_outside_mask(float* out) {
  const auto kernel = shuffle_reads_outside_mask_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_syncthreads_vs_shuffle(float* out) {
  const auto kernel = syncthreads_vs_shuffle_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 0, nullptr)(out);
  return finish();
}

// Launches shared_kernel with `bytes` of dynamic shared memory, after raising
// its limit to `raise_to` when that is > 0 (returns that call's error if it fails).
SELFTEST int msda_emu_selftest_shared_size(float* out, int bytes, int raise_to) {
  const auto kernel = shared_kernel;
  if (raise_to > 0) {
    const cudaError_t set = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, raise_to);
    if (set != cudaSuccess) return set;
  }
  MSDA_LAUNCH(kernel, 1, 32, bytes, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_shared_overrun(float* out) {
  const auto kernel = shared_overrun_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 64 * sizeof(float), nullptr)(out, 64);
  return finish();
}

SELFTEST int msda_emu_selftest_block_size(float* out, int x, int y, int z) {
  const auto kernel = noop_kernel;
  MSDA_LAUNCH(kernel, 1, dim3(x, y, z), 0, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_misaligned_vector(const float* in, float* out) {
  const auto kernel = misaligned_vector_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 0, nullptr)(in, out);
  return finish();
}

SELFTEST int msda_emu_selftest_vector_atomics(float* out, int threads, int offset) {
  const auto kernel = vector_atomics_kernel;
  MSDA_LAUNCH(kernel, 3, threads, 0, nullptr)(out, offset);
  return finish();
}

SELFTEST int msda_emu_selftest_shared_vector_atomic(float* out) {
  const auto kernel = shared_vector_atomic_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 64, nullptr)(out);
  return finish();
}

SELFTEST int msda_emu_selftest_illegal_address(const float* in, float* out) {
  const auto kernel = illegal_address_kernel;
  MSDA_LAUNCH(kernel, 1, 32, 0, nullptr)(in, out);
  return finish();
}

SELFTEST int msda_emu_selftest_stack_overflow(float* out) {
  const auto kernel = stack_overflow_kernel;
  MSDA_LAUNCH(kernel, 1, 2, 0, nullptr)(out, 0);
  return finish();
}

SELFTEST int msda_emu_selftest_device_attribute(int attribute, int* value) {
  return cudaDeviceGetAttribute(value, static_cast<cudaDeviceAttr>(attribute), 0);
}
