// CUDA kernels of multi-scale deformable attention (no torch headers).
//
// Thread mapping, forward and backward: a "row" is one (batch, query, head).
// A row's C channels are split into vectors of VEC channels (16-byte loads
// when C and the pointers allow: 4 x fp32, 8 x fp16/bf16, 2 x fp64), and a
// group of `lanes` consecutive threads (a power of two <= 32, the smallest
// that covers the row's vectors, or 32 with each lane looping when C is
// large) handles the row. For the default C=32 that is 8 fp32 lanes or 4
// fp16/bf16 lanes per head: one warp covers 4 or 8 heads of a query.
//
// Each lane computes the per-sample coordinates and weights itself (the same
// BilinearSample code the CPU kernel runs), once per sample, and uses them
// for its whole channel vector.
//
// Corner loads are branch-free: every sample loads its 4 corners
// unconditionally (read-only path, __ldg) from a clamped in-level position
// (an off-map corner, offset -1, reads position 0 of its level) and then
// SELECTS zero bits for the off-map ones, before any arithmetic: a NaN or Inf
// stored at the clamped position never reaches a result, because the
// reference never reads it. The point loop is unrolled (kernels templated on
// P = 4 and 8, with a runtime-P variant), so that 4*P independent 16-byte
// loads per lane can be in flight.
//
// Forward sums the L*P samples in registers in the accumulation type and
// writes its output vector once (no output memset).
//
// Backward: the per-sample corner dot products <grad_out, v_i> are reduced
// over the row's lanes with warp shuffles (an xor butterfly: every lane ends
// with the same bits), so grad_locations / grad_attention have one writer
// each and are deterministic. grad_value (a zeroed accumulation-type buffer)
// is a scatter, with three strategies (GradValueStrategy):
//   kGlobalAtomics       backward_atomic_kernel: every contribution is an
//                        atomic add to global memory (float4 / float2 vector
//                        atomics on sm_90, scalar before).
//   kSharedAggregation   backward_shared_kernel: head-major persistent blocks.
//                        A block serves one (batch, head) and a slice of its
//                        queries; the levels that fit the block's dynamic
//                        shared memory (decided on the device from
//                        spatial_shapes, coarsest first) are accumulated in a
//                        shared accumulator and flushed to global memory once
//                        per block; the other levels go straight to global
//                        memory as in kGlobalAtomics. The coarse levels carry
//                        most of the atomic contention (every value position
//                        of the 13x21 level is hit ~1300 times per image).
// The trade-off is for a GPU to measure (benchmarks/bench_msda.py, backends
// cuda and cuda-shared): a global reduction is one fire-and-forget REDG per
// 16 bytes on sm_90 but all of them queue at the L2 slices, while a shared
// float atomicAdd stays on chip but compiles to a compare-and-swap loop
// (ATOMS.CAST.SPIN, sm_80 and sm_90), several instructions per channel.
// Neither is bitwise deterministic for grad_value (float atomics). The third,
//   kDeterministic       backward_atomic_kernel with FixedPointAdd: every
//                        contribution is rounded to a 64-bit integer with a
//                        power-of-two scale bounded on the device (two
//                        max_abs_kernel passes first) and added with integer
//                        atomics, so the order cannot change the sum; then
//                        fixed_point_to_acc_kernel converts back.
//
// All offsets are 64-bit; any batch size works (no im2col_step); grids are
// capped and the kernels stride over the remaining work. No host sync: the
// level geometry is only read on the device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "cuda/ms_deform_attn_cuda.h"

namespace detr_cuda {
namespace {

// Every launch goes through MSDA_LAUNCH and every dynamic shared-memory array
// through MSDA_DYNAMIC_SHARED, so that tests/cuda_emulation can compile this
// file as plain C++ and run the kernels on the CPU (it defines both first).
#ifndef MSDA_LAUNCH
#define MSDA_LAUNCH(kernel, blocks, threads, shared_bytes, stream) kernel<<<blocks, threads, shared_bytes, stream>>>
#endif
#ifndef MSDA_DYNAMIC_SHARED
#define MSDA_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
// float4 / float2 atomicAdd to global memory exist from sm_90 on. The
// emulator defines MSDA_VECTOR_ATOMICS=1 in its sm_90 build to run that branch.
#ifndef MSDA_VECTOR_ATOMICS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MSDA_VECTOR_ATOMICS 1
#else
#define MSDA_VECTOR_ATOMICS 0
#endif
#endif

constexpr int kThreadsPerBlock = 256;
// The shared-aggregation kernel runs one big block per SM (its accumulator
// takes most of the SM's shared memory), so the block is larger.
constexpr int kSharedThreadsPerBlock = 512;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;
// Dynamic shared memory a launch may use without cudaFuncSetAttribute.
constexpr int kDefaultSharedBytes = 48 * 1024;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store_acc(float& out, float v) { out = v; }
__device__ __forceinline__ void store_acc(double& out, double v) { out = v; }
__device__ __forceinline__ void store_acc(__half& out, float v) { out = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16& out, float v) { out = __float2bfloat16_rn(v); }

// VEC channels moved as one aligned load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) ChannelVector {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ ChannelVector<T, VEC> load_vector(const T* __restrict__ ptr) {
  return *reinterpret_cast<const ChannelVector<T, VEC>*>(ptr);
}

// VEC channels of value at ptr through the read-only cache, as raw bits
// (one 16/8/4/2-byte load); when in_map is false the bits are replaced by
// zeros (+0.0 in every float format) after the load, so whatever is stored at
// ptr never reaches the caller.
template <typename T, int VEC>
__device__ __forceinline__ ChannelVector<T, VEC> load_corner(const T* ptr, bool in_map) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * VEC;
  static_assert(kBytes == 16 || kBytes == 8 || kBytes == 4 || kBytes == 2, "unsupported vector size");
  ChannelVector<T, VEC> out;
  if constexpr (kBytes == 16) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(ptr));
    raw.x = in_map ? raw.x : 0u;
    raw.y = in_map ? raw.y : 0u;
    raw.z = in_map ? raw.z : 0u;
    raw.w = in_map ? raw.w : 0u;
    memcpy(&out, &raw, kBytes);
  } else if constexpr (kBytes == 8) {
    uint2 raw = __ldg(reinterpret_cast<const uint2*>(ptr));
    raw.x = in_map ? raw.x : 0u;
    raw.y = in_map ? raw.y : 0u;
    memcpy(&out, &raw, kBytes);
  } else if constexpr (kBytes == 4) {
    unsigned int raw = __ldg(reinterpret_cast<const unsigned int*>(ptr));
    raw = in_map ? raw : 0u;
    memcpy(&out, &raw, kBytes);
  } else {
    unsigned short raw = __ldg(reinterpret_cast<const unsigned short*>(ptr));
    raw = in_map ? raw : static_cast<unsigned short>(0);
    memcpy(&out, &raw, kBytes);
  }
  return out;
}

// Adds VEC contiguous accumulator values to global memory. On sm_90 a
// float4 / float2 atomic adds 16 / 8 bytes in one instruction; dst is aligned
// for it (the host picks VEC so that grad_value_acc + corner + c0, a multiple
// of VEC floats from a base aligned to min(16, 4 * VEC) bytes, is).
template <int VEC>
__device__ __forceinline__ void atomic_add_global(float* dst, const float (&v)[VEC]) {
#if MSDA_VECTOR_ATOMICS
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]));
    }
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(dst), make_float2(v[0], v[1]));
  } else {
    atomicAdd(dst, v[0]);
  }
#else
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, v[j]);
#endif
}

// No vector atomics for double.
template <int VEC>
__device__ __forceinline__ void atomic_add_global(double* dst, const double (&v)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, v[j]);
}

// Where the backward's global grad_value contributions go. Each kernel
// copies its GlobalAdd, calls prepare() once, then add() per contribution
// (VEC channels starting at element `index` of grad_value).

// kGlobalAtomics / kSharedAggregation: float (or double) atomics into the
// accumulation-type grad_value.
template <typename acc_t>
struct FloatAtomicAdd {
  acc_t* grad_value;

  __device__ __forceinline__ void prepare() {}

  template <int VEC>
  __device__ __forceinline__ void add(int64_t index, const acc_t (&v)[VEC]) const {
    atomic_add_global<VEC>(grad_value + index, v);
  }
};

// A max-abs bound kept as the bit pattern of a non-negative acc_t, so that
// unsigned integer order is value order (and +Inf, which stands for NaN too,
// is the largest).
template <typename acc_t>
__device__ __forceinline__ double decode_bound(unsigned long long bits) {
  if constexpr (sizeof(acc_t) == 4) {
    const unsigned int narrow = static_cast<unsigned int>(bits);
    float value;
    memcpy(&value, &narrow, sizeof(value));
    return value;
  } else {
    double value;
    memcpy(&value, &bits, sizeof(value));
    return value;
  }
}

// The fixed-point scale of kDeterministic, a power of two: every partial sum
// of one grad_value element, scaled, stays below 2^62 in magnitude. An
// element receives at most `count` = Q * P contributions (the samples of its
// level and head; one sample's 4 corners are different elements), each at
// most max|grad_output| * max|attention| (bilinear weights are <= 1).
// Returns 0 when that bound is not finite (a NaN or Inf among the inputs).
template <typename acc_t>
__device__ __forceinline__ double fixed_point_scale(const unsigned long long* bounds, int64_t count) {
  const double total = decode_bound<acc_t>(bounds[0]) * decode_bound<acc_t>(bounds[1]) * static_cast<double>(count);
  if (!(total <= 1.7976931348623157e308)) return 0.0;
  if (total == 0.0) return 1.0;
  int exponent = 0;
  frexp(total, &exponent);  // total < 2^exponent
  return ldexp(1.0, 62 - exponent < 1000 ? 62 - exponent : 1000);
}

// kDeterministic: each contribution is rounded to a 64-bit integer (value *
// scale) and added with an integer atomic. Integer addition is associative,
// so the sums are the same bits whatever order the atomics run in; the
// rounding error is at most 2^-63 * count * bound per contribution.
template <typename acc_t>
struct FixedPointAdd {
  unsigned long long* sums;            // [B*S*H*C], zeroed
  const unsigned long long* bounds;    // [2]: max|grad_output|, max|attention|
  int64_t count;                       // Q * P
  double scale;                        // set by prepare()

  __device__ __forceinline__ void prepare() { scale = fixed_point_scale<acc_t>(bounds, count); }

  template <int VEC>
  __device__ __forceinline__ void add(int64_t index, const acc_t (&v)[VEC]) const {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const long long fixed = llrint(static_cast<double>(v[j]) * scale);
      atomicAdd(sums + index + j, static_cast<unsigned long long>(fixed));
    }
  }
};

// The level geometry lives in device memory, so the host cannot check it
// without a copy (the Python wrapper does, once per spatial_shapes tensor). A
// level that would reach past S is skipped, so that even a direct op call with
// inconsistent shapes never reads or writes out of bounds.
__device__ __forceinline__ bool level_fits(const MsdaSizes& sz, int64_t height, int64_t width, int64_t start) {
  return height > 0 && width > 0 && height <= sz.num_values && width <= sz.num_values && start >= 0 &&
         start + height * width <= sz.num_values;
}

// Position of corner i of s inside its level, clamped into the level: an
// off-map corner (offset -1) reads position 0, and its value is then selected
// away (load_corner with in_map false).
template <typename acc_t>
__device__ __forceinline__ int64_t clamped_position(const BilinearSample<acc_t>& s, int i) {
  return s.offset[i] > 0 ? s.offset[i] : int64_t(0);
}

// Samples whose corner loads the forward issues together: 4 (16 loads in
// flight per lane), or 1 when P is a runtime value. For P = 8 with lanes
// holding 8 fp32 accumulators (8 x fp16/bf16 channels) or 2 fp64 ones it is
// 2: with 4 those variants spill under the 128-register bound (two blocks
// per SM). No variant spills (checked with -Xptxas -v).
template <typename acc_t, int VEC, int kPoints>
constexpr int forward_chunk() {
  return kPoints <= 0   ? 1
         : kPoints < 4  ? kPoints
         : (kPoints > 4 && (VEC * sizeof(acc_t) > 16 || (sizeof(acc_t) == 8 && VEC == 2))) ? 2
                        : 4;
}

// Forward. Grid-stride over B*Q*H rows x `lanes` lanes; each lane writes its
// channel vector(s) of the row's output, out[b, q, head*C + c0 .. c0+VEC).
// kPoints > 0: P is the template constant, walked in chunks of
// forward_chunk samples (each chunk unrolled, its 4*chunk corner loads issued
// before its arithmetic); kPoints == 0: P is sz.num_points, one sample at a
// time.
template <typename scalar_t, typename acc_t, int VEC, int kPoints>
__global__ void __launch_bounds__(kThreadsPerBlock, 2)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                   const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ locations,
                   const acc_t* __restrict__ attention, scalar_t* __restrict__ output, const MsdaSizes sz,
                   const int lanes_log2, const int64_t total_threads) {
  constexpr int kChunk = forward_chunk<acc_t, VEC, kPoints>();
  static_assert(kPoints % kChunk == 0, "the chunk must divide P");
  const int64_t num_points = kPoints > 0 ? kPoints : sz.num_points;
  const int64_t lanes = int64_t(1) << lanes_log2;
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  const int64_t vectors = sz.channels / VEC;
  const int64_t samples_per_row = sz.num_levels * num_points;
  const int64_t position_stride = sz.num_heads * sz.channels;  // elements from one position to the next
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total_threads; t += stride) {
    const int64_t row = t >> lanes_log2;
    if (row >= rows) continue;
    const int64_t lane = t & (lanes - 1);
    const int64_t head = row % sz.num_heads;
    const int64_t b = row / (sz.num_queries * sz.num_heads);
    const acc_t* loc = locations + row * samples_per_row * 2;
    const acc_t* attn = attention + row * samples_per_row;
    for (int64_t vec = lane; vec < vectors; vec += lanes) {
      const int64_t c0 = vec * VEC;
      acc_t acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
      for (int64_t l = 0; l < sz.num_levels; ++l) {
        const int64_t height = spatial_shapes[2 * l];
        const int64_t width = spatial_shapes[2 * l + 1];
        const int64_t start = level_start_index[l];
        if (!level_fits(sz, height, width, start)) continue;
        const scalar_t* level_value = value + value_row(sz, b, start, 0, head) + c0;
        // Rolled on purpose: unrolled, the next chunk's loads are hoisted
        // above this chunk's arithmetic and the P=8 variants spill.
#pragma unroll 1
        for (int64_t p0 = 0; p0 < num_points; p0 += kChunk) {
          // All loads of the chunk first, then the arithmetic.
          ChannelVector<scalar_t, VEC> corner[kChunk][4];
          acc_t weight[kChunk][4];
#pragma unroll
          for (int n = 0; n < kChunk; ++n) {
            const int64_t k = l * num_points + p0 + n;
            const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], height, width);
            const acc_t a = attn[k];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const bool in_map = s.offset[i] >= 0;  // false for every corner of an inactive sample
              corner[n][i] = load_corner<scalar_t, VEC>(level_value + clamped_position(s, i) * position_stride, in_map);
              weight[n][i] = in_map ? a * s.weight[i] : acc_t(0);
            }
          }
          // Same order of additions as one sample at a time: bitwise equal.
#pragma unroll
          for (int n = 0; n < kChunk; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) acc[j] += weight[n][i] * to_acc(corner[n][i].v[j]);
            }
          }
        }
      }
      ChannelVector<scalar_t, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) store_acc(out.v[j], acc[j]);
      *reinterpret_cast<ChannelVector<scalar_t, VEC>*>(output + row * sz.channels + c0) = out;
    }
  }
}

// Where the shared-aggregation kernel keeps a level: the level's first
// element in the block's shared accumulator, or -1 (global atomics). Inside a
// position's C channels the shared layout is transposed, element j of vector
// `vec` at j * (C / VEC) + vec, so that the lanes of a row, which hold
// consecutive vectors, add to consecutive 4-byte banks.
struct SharedLevels {
  const int* level_offset;  // [L], in accumulator elements, or -1
};

// Backward of one row (batch, query, head) for one lane of its lane group:
// the lane's grad_value contributions (global atomics, or the block's shared
// accumulator for the levels that have a shared offset when kShared) and, once
// per sample after the shuffle reduction, grad_locations / grad_attention
// written by one lane of the group.
//
// Every lane of the warp must call this with the same sizes (padding lanes
// with valid == false, which add and write nothing): the loops around the
// shuffles depend only on sz, so all lanes reach every shuffle.
// kChunk samples are processed together (their 4*kChunk corner loads issued
// first); kChunk divides P.
template <typename scalar_t, typename acc_t, int VEC, int kChunk, bool kShared, typename GlobalAdd>
__device__ __forceinline__ void backward_row(
    const MsdaSizes& sz, const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
    const acc_t* __restrict__ locations, const acc_t* __restrict__ attention, const GlobalAdd& global_add,
    acc_t* __restrict__ grad_locations, acc_t* __restrict__ grad_attention, const int64_t row, const bool valid,
    const int lane, const int lanes_log2, acc_t* shared_acc, SharedLevels shared_levels) {
  const int lanes = 1 << lanes_log2;
  const int64_t vectors = sz.channels / VEC;
  const int64_t samples_per_row = sz.num_levels * sz.num_points;
  const int64_t position_stride = sz.num_heads * sz.channels;
  const int64_t head = row % sz.num_heads;
  const int64_t b = row / (sz.num_queries * sz.num_heads);
  const acc_t* loc = locations + row * samples_per_row * 2;
  const acc_t* attn = attention + row * samples_per_row;
  const scalar_t* grad_out = grad_output + row * sz.channels;
  for (int64_t l = 0; l < sz.num_levels; ++l) {
    const int64_t height = spatial_shapes[2 * l];
    const int64_t width = spatial_shapes[2 * l + 1];
    const int64_t start = level_start_index[l];
    const bool level_ok = level_fits(sz, height, width, start);
    const int64_t level_row = value_row(sz, b, start, 0, head);  // value[b, start, head, 0]
    int shared_offset = -1;
    if constexpr (kShared) shared_offset = shared_levels.level_offset[l];
    for (int64_t p0 = 0; p0 < sz.num_points; p0 += kChunk) {
      acc_t dots[kChunk][4];
#pragma unroll
      for (int n = 0; n < kChunk; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dots[n][i] = acc_t(0);
      }
      if (valid && level_ok) {
        // Per sample: clamped corner positions, in-map flags and attn * weight.
        int64_t position[kChunk][4];
        bool in_map[kChunk][4];
        acc_t coef[kChunk][4];
#pragma unroll
        for (int n = 0; n < kChunk; ++n) {
          const int64_t k = l * sz.num_points + p0 + n;
          const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], height, width);
          const acc_t a = attn[k];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            in_map[n][i] = s.offset[i] >= 0;
            position[n][i] = clamped_position(s, i);
            coef[n][i] = a * s.weight[i];
          }
        }
        for (int64_t vec = lane; vec < vectors; vec += lanes) {
          const int64_t c0 = vec * VEC;
          const ChannelVector<scalar_t, VEC> g_raw = load_vector<scalar_t, VEC>(grad_out + c0);
          acc_t g[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) g[j] = to_acc(g_raw.v[j]);
          ChannelVector<scalar_t, VEC> corner[kChunk][4];
#pragma unroll
          for (int n = 0; n < kChunk; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              corner[n][i] = load_corner<scalar_t, VEC>(value + level_row + position[n][i] * position_stride + c0,
                                                        in_map[n][i]);
            }
          }
#pragma unroll
          for (int n = 0; n < kChunk; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) dots[n][i] += g[j] * to_acc(corner[n][i].v[j]);
              if (!in_map[n][i] || coef[n][i] == acc_t(0)) continue;
              acc_t contribution[VEC];
#pragma unroll
              for (int j = 0; j < VEC; ++j) contribution[j] = coef[n][i] * g[j];
              if (kShared && shared_offset >= 0) {
                // Transposed layout (see SharedLevels); 32-bit shared indices.
                acc_t* dst = shared_acc + shared_offset + static_cast<int>(position[n][i]) * static_cast<int>(sz.channels) +
                             static_cast<int>(vec);
#pragma unroll
                for (int j = 0; j < VEC; ++j) atomicAdd(dst + j * static_cast<int>(vectors), contribution[j]);
              } else {
                global_add.template add<VEC>(level_row + position[n][i] * position_stride + c0, contribution);
              }
            }
          }
        }
      }
      // Sum the dot products over the row's lanes; every lane ends with the
      // same totals (xor butterfly, float addition is commutative).
      for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
#pragma unroll
        for (int n = 0; n < kChunk; ++n) {
#pragma unroll
          for (int i = 0; i < 4; ++i) dots[n][i] += __shfl_xor_sync(0xffffffffu, dots[n][i], offset);
        }
      }
      // Lane n of the group writes sample n of the chunk (lane n mod lanes
      // when the group is smaller than the chunk). The sample's weights are
      // recomputed rather than kept live across the loads.
      if (valid) {
        for (int n0 = 0; n0 < kChunk; n0 += lanes) {
          const int mine = n0 + lane;
          if (mine >= kChunk) continue;
          acc_t my_dots[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) my_dots[i] = dots[0][i];
#pragma unroll
          for (int n = 1; n < kChunk; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) my_dots[i] = mine == n ? dots[n][i] : my_dots[i];
          }
          const int64_t k = l * sz.num_points + p0 + mine;
          const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], height, width);
          const SampleGradients<acc_t> grads = sample_gradients<acc_t>(s, attn[k], my_dots, height, width);
          const int64_t sample = row * samples_per_row + k;
          grad_attention[sample] = grads.attn;
          grad_locations[2 * sample] = grads.loc_x;
          grad_locations[2 * sample + 1] = grads.loc_y;
        }
      }
    }
  }
}

// Backward, global-atomic strategy. Grid-stride over B*Q*H rows x `lanes`
// lanes in row order (batch-major, so one image's value and grad_value stay
// L2-resident together). At least two blocks per SM (<= 128 registers).
// GlobalAdd: FloatAtomicAdd (kGlobalAtomics) or FixedPointAdd (kDeterministic).
template <typename scalar_t, typename acc_t, int VEC, int kChunk, typename GlobalAdd>
__global__ void __launch_bounds__(kThreadsPerBlock, 2)
    backward_atomic_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                           const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                           const acc_t* __restrict__ locations, const acc_t* __restrict__ attention,
                           const GlobalAdd grad_value_add, acc_t* __restrict__ grad_locations,
                           acc_t* __restrict__ grad_attention, const MsdaSizes sz, const int lanes_log2,
                           const int64_t total_threads) {
  GlobalAdd global_add = grad_value_add;
  global_add.prepare();
  const int lanes = 1 << lanes_log2;
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // total_threads and stride are multiples of 32, so all lanes of a warp run
  // the loop equally often and reach each shuffle together. Threads past the
  // last row take part in the shuffles with zeros and write nothing.
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total_threads; t += stride) {
    const int64_t row_or_pad = t >> lanes_log2;
    const bool valid = row_or_pad < rows;
    backward_row<scalar_t, acc_t, VEC, kChunk, false>(
        sz, grad_output, value, spatial_shapes, level_start_index, locations, attention, global_add, grad_locations,
        grad_attention, valid ? row_or_pad : 0, valid, static_cast<int>(t & (lanes - 1)), lanes_log2, nullptr,
        SharedLevels{nullptr});
  }
}

// Backward, shared-memory aggregation strategy. Work items are (batch, head,
// query slice), item = (b * H + head) * slices + slice (batch-major); the
// grid (the resident blocks, about one per SM: see shared_launch_plan)
// strides over them; every (batch, head) has at least one item.
//
// Dynamic shared memory (shared_bytes, at most the opt-in limit):
//   int level_offset[L], int used, padded to 16 bytes | acc_t accumulator[...]
// Thread 0 walks the levels from the last (coarsest) to the first and gives a
// level a slice of the accumulator when its H*W*C elements still fit (level
// geometry read from spatial_shapes on the device); the others use global
// atomics. Per item: zero the used accumulator, run the slice's rows (all
// threads the same number of passes, padding rows invalid), flush every
// channel vector with a nonzero sum to global memory with one (vector)
// atomic add.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kSharedThreadsPerBlock, 1)
    backward_shared_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                           const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                           const acc_t* __restrict__ locations, const acc_t* __restrict__ attention,
                           acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_locations,
                           acc_t* __restrict__ grad_attention, const MsdaSizes sz, const int lanes_log2,
                           const int64_t slices, const int shared_bytes) {
  MSDA_DYNAMIC_SHARED(unsigned char, msda_shared);
  int* level_offset = reinterpret_cast<int*>(msda_shared);
  int* shared_used = level_offset + sz.num_levels;  // accumulator elements in use
  const int table_bytes = static_cast<int>(((sz.num_levels + 1) * sizeof(int) + 15) / 16 * 16);
  acc_t* shared_acc = reinterpret_cast<acc_t*>(msda_shared + table_bytes);

  if (threadIdx.x == 0) {
    int64_t capacity = (shared_bytes - table_bytes) / static_cast<int64_t>(sizeof(acc_t));
    int64_t used = 0;
    for (int64_t l = sz.num_levels - 1; l >= 0; --l) {
      const int64_t height = spatial_shapes[2 * l];
      const int64_t width = spatial_shapes[2 * l + 1];
      const int64_t elements = level_fits(sz, height, width, level_start_index[l]) ? height * width * sz.channels : -1;
      if (elements > 0 && elements <= capacity - used) {
        level_offset[l] = static_cast<int>(used);
        used += elements;
      } else {
        level_offset[l] = -1;
      }
    }
    *shared_used = static_cast<int>(used);
  }
  __syncthreads();
  const int used = *shared_used;

  const int lanes = 1 << lanes_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const int rows_per_pass = blockDim.x >> lanes_log2;
  // Shared float atomicAdd compiles to a compare-and-swap loop (SASS
  // ATOMS.CAST.SPIN on sm_80 and sm_90): lanes of one warp that hit the same
  // address retry one after another. Neighbouring queries sample the same
  // coarse pixels, so the lane groups of a warp take queries `warps` apart
  // (row = group * warps + warp) rather than consecutive ones.
  const int warps = static_cast<int>(blockDim.x / 32);
  const int local_row = ((threadIdx.x & 31) >> lanes_log2) * warps + static_cast<int>(threadIdx.x / 32);
  const int vectors = static_cast<int>(sz.channels / VEC);
  const int64_t items = sz.batch * sz.num_heads * slices;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t pair = item / slices;  // b * H + head
    const int64_t slice = item % slices;
    const int64_t b = pair / sz.num_heads;
    const int64_t head = pair % sz.num_heads;
    const int64_t q_begin = slice * sz.num_queries / slices;
    const int64_t q_end = (slice + 1) * sz.num_queries / slices;

    for (int e = threadIdx.x; e < used; e += blockDim.x) shared_acc[e] = acc_t(0);
    __syncthreads();

    for (int64_t q0 = q_begin; q0 < q_end; q0 += rows_per_pass) {
      const int64_t q = q0 + local_row;
      const bool valid = q < q_end;
      const int64_t row = valid ? (b * sz.num_queries + q) * sz.num_heads + head : 0;
      backward_row<scalar_t, acc_t, VEC, 1, true>(sz, grad_output, value, spatial_shapes, level_start_index,
                                                       locations, attention, FloatAtomicAdd<acc_t>{grad_value},
                                                       grad_locations, grad_attention, row, valid, lane, lanes_log2,
                                                       shared_acc, SharedLevels{level_offset});
    }
    __syncthreads();

    // Flush, one channel vector (position, vec) per thread and step: its VEC
    // sums sit at position * C + j * vectors + vec (transposed layout) and go
    // to global memory as one vector atomic (sm_90), unless all are zero.
    for (int64_t l = 0; l < sz.num_levels; ++l) {
      const int offset = level_offset[l];
      if (offset < 0) continue;
      const int level_vectors = static_cast<int>(spatial_shapes[2 * l] * spatial_shapes[2 * l + 1]) * vectors;
      const int64_t level_row = value_row(sz, b, level_start_index[l], 0, head);
      for (int e = threadIdx.x; e < level_vectors; e += blockDim.x) {
        const int position = e / vectors;
        const int vec = e - position * vectors;
        const acc_t* src = shared_acc + offset + position * static_cast<int>(sz.channels) + vec;
        acc_t sums[VEC];
        bool any = false;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sums[j] = src[j * vectors];
          any = any || sums[j] != acc_t(0);
        }
        if (!any) continue;
        atomic_add_global<VEC>(grad_value + level_row + int64_t(position) * sz.num_heads * sz.channels + vec * VEC,
                               sums);
      }
    }
    __syncthreads();  // the next item zeroes the accumulator
  }
}

// kDeterministic, first pass: *bound = max over i of |x[i]| (in acc_t, as
// its bit pattern; NaN counts as +Inf). Grid-stride, then a warp max and one
// integer atomicMax per warp: the result does not depend on the order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    max_abs_kernel(const scalar_t* __restrict__ x, const int64_t n, unsigned long long* __restrict__ bound) {
  acc_t largest = acc_t(0);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t v = to_acc(x[i]);
    const acc_t magnitude = v < acc_t(0) ? -v : v;
    if (!(magnitude <= largest)) largest = magnitude == magnitude ? magnitude : acc_t(INFINITY);
  }
  unsigned long long bits = 0;
  if constexpr (sizeof(acc_t) == 4) {
    unsigned int narrow = 0;
    memcpy(&narrow, &largest, sizeof(narrow));
    bits = narrow;
  } else {
    memcpy(&bits, &largest, sizeof(bits));
  }
  // blockDim.x is a multiple of 32 and every thread gets here.
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(0xffffffffu, bits, offset);
    bits = other > bits ? other : bits;
  }
  if ((threadIdx.x & 31) == 0 && bits != 0) atomicMax(bound, bits);
}

// kDeterministic, last pass: grad_value[i] = sums[i] / scale in acc_t, or
// NaN everywhere when the bound was not finite.
template <typename acc_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    fixed_point_to_acc_kernel(const unsigned long long* __restrict__ sums, const unsigned long long* __restrict__ bounds,
                              const int64_t count, acc_t* __restrict__ grad_value, const int64_t n) {
  const double scale = fixed_point_scale<acc_t>(bounds, count);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const long long fixed = static_cast<long long>(sums[i]);
    grad_value[i] = scale > 0.0 ? static_cast<acc_t>(static_cast<double>(fixed) / scale) : static_cast<acc_t>(NAN);
  }
}

// Blocks of kThreadsPerBlock threads for a grid-stride pass over n elements.
unsigned int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks > 4096 ? 4096 : blocks);
}

// Widest vector (at most 16 bytes) that divides C and keeps every pointer
// aligned; acc_pointer (the grad_value accumulator, or null) must be aligned
// for the vector atomics, min(16, width * sizeof(acc_t)) bytes.
template <typename scalar_t, typename acc_t>
int pick_vector_width(int64_t channels, std::initializer_list<const void*> pointers, const void* acc_pointer) {
  int width = 16 / static_cast<int>(sizeof(scalar_t));
  for (; width > 1; width /= 2) {
    bool fits = channels % width == 0;
    for (const void* ptr : pointers) {
      fits = fits && reinterpret_cast<uintptr_t>(ptr) % (width * sizeof(scalar_t)) == 0;
    }
    const uintptr_t acc_alignment = width * sizeof(acc_t) < 16 ? width * sizeof(acc_t) : 16;
    fits = fits && reinterpret_cast<uintptr_t>(acc_pointer) % acc_alignment == 0;
    if (fits) break;
  }
  return width;
}

template <typename scalar_t, typename Launch>
cudaError_t with_vector_width(int width, Launch&& launch) {
  if constexpr (sizeof(scalar_t) <= 2) {
    if (width == 8) return launch(std::integral_constant<int, 8>());
  }
  if constexpr (sizeof(scalar_t) <= 4) {
    if (width == 4) return launch(std::integral_constant<int, 4>());
  }
  if (width == 2) return launch(std::integral_constant<int, 2>());
  return launch(std::integral_constant<int, 1>());
}

struct LaunchShape {
  int lanes_log2;
  int64_t total_threads;  // a multiple of 32
  int64_t blocks;
};

int lanes_log2_for(const MsdaSizes& sz, int vec) {
  const int64_t vectors = sz.channels / vec;
  int lanes_log2 = 0;
  while ((int64_t(1) << lanes_log2) < vectors && lanes_log2 < 5) ++lanes_log2;
  return lanes_log2;
}

LaunchShape launch_shape(const MsdaSizes& sz, int vec) {
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  LaunchShape shape;
  shape.lanes_log2 = lanes_log2_for(sz, vec);
  shape.total_threads = ((rows << shape.lanes_log2) + 31) / 32 * 32;
  shape.blocks = (shape.total_threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  if (shape.blocks > kMaxBlocks) shape.blocks = kMaxBlocks;
  return shape;
}

// P as a template constant where a specialisation exists (4 and 8), else 0
// (runtime P).
template <typename Launch>
cudaError_t with_points(int64_t num_points, Launch&& launch) {
  if (num_points == 4) return launch(std::integral_constant<int, 4>());
  if (num_points == 8) return launch(std::integral_constant<int, 8>());
  return launch(std::integral_constant<int, 0>());
}

// Samples the global-atomic backward processes together: 2 (8 corner loads
// in flight per lane) when P is even and a lane's vector is at most 4 float32
// values, else 1. Wider vectors (8 x fp16/bf16, 2 x fp64) need the registers:
// with 2 they would spill under the 128-register bound. The shared kernel
// always takes 1 (its accumulator addressing needs registers too).
template <typename acc_t, int VEC, typename Launch>
cudaError_t with_backward_chunk(int64_t num_points, Launch&& launch) {
  if constexpr (sizeof(acc_t) == 4 && VEC <= 4) {
    if (num_points % 2 == 0) return launch(std::integral_constant<int, 2>());
  }
  return launch(std::integral_constant<int, 1>());
}

// Per-device numbers for the shared-aggregation launch, read once per device.
struct DeviceLimits {
  int sm_count;
  int shared_per_block_optin;
  int shared_per_sm;
  int threads_per_sm;
  int registers_per_sm;
};

constexpr int kMaxCachedDevices = 64;

cudaError_t query_device_limits(int device, DeviceLimits* limits) {
  cudaError_t error = cudaDeviceGetAttribute(&limits->sm_count, cudaDevAttrMultiProcessorCount, device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits->shared_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits->shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits->threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits->registers_per_sm, cudaDevAttrMaxRegistersPerMultiprocessor, device);
  }
  return error;
}

cudaError_t device_limits(DeviceLimits* limits) {
  // Filled at most once per device (a race only repeats the same queries).
  static DeviceLimits cache[kMaxCachedDevices];
  static std::atomic<bool> cached[kMaxCachedDevices];
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  if (device < 0 || device >= kMaxCachedDevices) return query_device_limits(device, limits);
  if (!cached[device].load(std::memory_order_acquire)) {
    DeviceLimits fresh;
    error = query_device_limits(device, &fresh);
    if (error != cudaSuccess) return error;
    cache[device] = fresh;
    cached[device].store(true, std::memory_order_release);
  }
  *limits = cache[device];
  return cudaSuccess;
}

// Grid and shared-memory budget of the shared-aggregation kernel.
struct SharedLaunchPlan {
  bool usable;       // false: fall back to global atomics (no room for a level table)
  int shared_bytes;  // the dynamic shared memory of the launch
  int64_t slices;    // query slices per (batch, head)
  int64_t blocks;
};

SharedLaunchPlan shared_launch_plan(const MsdaSizes& sz, const DeviceLimits& limits, int lanes_log2, int acc_bytes) {
  SharedLaunchPlan plan{false, 0, 1, 1};
  const int64_t table_bytes = ((sz.num_levels + 1) * int64_t(sizeof(int)) + 15) / 16 * 16;
  // All levels together hold S*C elements per head: never ask for more.
  const int64_t wanted = table_bytes + (sz.num_values * sz.channels * acc_bytes + 15) / 16 * 16;
  const int64_t budget = wanted < limits.shared_per_block_optin ? wanted : limits.shared_per_block_optin;
  if (budget < table_bytes + 16) return plan;
  plan.usable = true;
  plan.shared_bytes = static_cast<int>(budget);
  // Resident blocks per SM, from threads, registers (the launch bound lets
  // the kernel use up to 128 per thread; it uses 95-128, see -Xptxas -v) and
  // shared memory (the runtime reserves 1 KiB per block). In practice one.
  int64_t per_sm = limits.threads_per_sm / kSharedThreadsPerBlock;
  const int64_t by_registers = limits.registers_per_sm / (kSharedThreadsPerBlock * 128);
  if (by_registers < per_sm) per_sm = by_registers;
  const int64_t by_shared = limits.shared_per_sm / (budget + 1024);
  if (by_shared < per_sm) per_sm = by_shared;
  if (per_sm < 1) per_sm = 1;
  const int64_t target_blocks = per_sm * (limits.sm_count > 0 ? limits.sm_count : 1);
  const int64_t pairs = sz.batch * sz.num_heads;
  const int64_t rows_per_pass = kSharedThreadsPerBlock >> lanes_log2;
  const int64_t max_slices = (sz.num_queries + rows_per_pass - 1) / rows_per_pass;  // >= one full pass each
  // Rounded down, so that the items fit the resident blocks in one wave (a
  // second, partial wave would double the time); with more (batch, head)
  // pairs than resident blocks each block loops over several items.
  int64_t slices = target_blocks / pairs;
  if (slices > max_slices) slices = max_slices;
  if (slices < 1) slices = 1;
  plan.slices = slices;
  const int64_t items = pairs * slices;
  int64_t blocks = items < target_blocks ? items : target_blocks;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  plan.blocks = blocks;
  return plan;
}

template <typename scalar_t, typename acc_t>
cudaError_t forward_typed(const MsdaSizes& sz, const void* value, const int64_t* spatial_shapes,
                          const int64_t* level_start_index, const void* locations, const void* attention,
                          void* output, cudaStream_t stream) {
  const int width = pick_vector_width<scalar_t, acc_t>(sz.channels, {value, output}, nullptr);
  return with_vector_width<scalar_t>(width, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const LaunchShape shape = launch_shape(sz, VEC);
    if (shape.total_threads == 0) return cudaSuccess;
    return with_points(sz.num_points, [&](auto points_constant) {
      constexpr int kPoints = decltype(points_constant)::value;
      const auto kernel = forward_kernel<scalar_t, acc_t, VEC, kPoints>;
      MSDA_LAUNCH(kernel, static_cast<unsigned int>(shape.blocks), kThreadsPerBlock, 0, stream)(
          static_cast<const scalar_t*>(value), spatial_shapes, level_start_index,
          static_cast<const acc_t*>(locations), static_cast<const acc_t*>(attention),
          static_cast<scalar_t*>(output), sz, shape.lanes_log2, shape.total_threads);
      return cudaGetLastError();
    });
  });
}

template <typename scalar_t, typename acc_t>
cudaError_t backward_typed(const MsdaSizes& sz, const void* grad_output, const void* value,
                           const int64_t* spatial_shapes, const int64_t* level_start_index, const void* locations,
                           const void* attention, void* grad_value, void* grad_locations, void* grad_attention,
                           GradValueStrategy strategy, void* deterministic_workspace, cudaStream_t stream) {
  const int width = pick_vector_width<scalar_t, acc_t>(sz.channels, {value, grad_output}, grad_value);
  return with_vector_width<scalar_t>(width, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const LaunchShape shape = launch_shape(sz, VEC);
    if (shape.total_threads == 0) return cudaSuccess;
    if (strategy == GradValueStrategy::kSharedAggregation) {
      DeviceLimits limits;
      const cudaError_t error = device_limits(&limits);
      if (error != cudaSuccess) return error;
      const SharedLaunchPlan plan = shared_launch_plan(sz, limits, shape.lanes_log2, sizeof(acc_t));
      if (plan.usable) {
        const auto kernel = backward_shared_kernel<scalar_t, acc_t, VEC>;
        if (plan.shared_bytes > kDefaultSharedBytes) {
          const cudaError_t attribute_error = cudaFuncSetAttribute(
              reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, plan.shared_bytes);
          if (attribute_error != cudaSuccess) return attribute_error;
        }
        MSDA_LAUNCH(kernel, static_cast<unsigned int>(plan.blocks), kSharedThreadsPerBlock, plan.shared_bytes,
                    stream)(
            static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value), spatial_shapes,
            level_start_index, static_cast<const acc_t*>(locations), static_cast<const acc_t*>(attention),
            static_cast<acc_t*>(grad_value), static_cast<acc_t*>(grad_locations),
            static_cast<acc_t*>(grad_attention), sz, shape.lanes_log2, plan.slices, plan.shared_bytes);
        return cudaGetLastError();
      }
      // No room even for the level table (thousands of levels): global atomics.
    }
    // Global atomics, float or (kDeterministic) fixed point.
    const auto launch_atomic = [&](auto global_add) {
      using GlobalAdd = decltype(global_add);
      return with_backward_chunk<acc_t, VEC>(sz.num_points, [&](auto chunk_constant) {
        constexpr int kChunk = decltype(chunk_constant)::value;
        const auto kernel = backward_atomic_kernel<scalar_t, acc_t, VEC, kChunk, GlobalAdd>;
        MSDA_LAUNCH(kernel, static_cast<unsigned int>(shape.blocks), kThreadsPerBlock, 0, stream)(
            static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value), spatial_shapes,
            level_start_index, static_cast<const acc_t*>(locations), static_cast<const acc_t*>(attention), global_add,
            static_cast<acc_t*>(grad_locations), static_cast<acc_t*>(grad_attention), sz, shape.lanes_log2,
            shape.total_threads);
        return cudaGetLastError();
      });
    };
    if (strategy != GradValueStrategy::kDeterministic) {
      return launch_atomic(FloatAtomicAdd<acc_t>{static_cast<acc_t*>(grad_value)});
    }
    // kDeterministic: bounds, fixed-point sums, conversion; four launches in
    // stream order, no host sync.
    if (deterministic_workspace == nullptr) return cudaErrorInvalidValue;
    const int64_t value_elements = sz.batch * sz.num_values * sz.num_heads * sz.channels;
    const int64_t output_elements = sz.batch * sz.num_queries * sz.num_heads * sz.channels;
    const int64_t attention_elements = sz.batch * sz.num_queries * sz.num_heads * sz.num_levels * sz.num_points;
    auto* sums = static_cast<unsigned long long*>(deterministic_workspace);
    unsigned long long* bounds = sums + value_elements;
    const auto grad_output_max = max_abs_kernel<scalar_t, acc_t>;
    MSDA_LAUNCH(grad_output_max, elementwise_blocks(output_elements), kThreadsPerBlock, 0, stream)(
        static_cast<const scalar_t*>(grad_output), output_elements, bounds);
    cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
    const auto attention_max = max_abs_kernel<acc_t, acc_t>;
    MSDA_LAUNCH(attention_max, elementwise_blocks(attention_elements), kThreadsPerBlock, 0, stream)(
        static_cast<const acc_t*>(attention), attention_elements, bounds + 1);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
    const int64_t count = sz.num_queries * sz.num_points;
    error = launch_atomic(FixedPointAdd<acc_t>{sums, bounds, count, 0.0});
    if (error != cudaSuccess) return error;
    const auto convert = fixed_point_to_acc_kernel<acc_t>;
    MSDA_LAUNCH(convert, elementwise_blocks(value_elements), kThreadsPerBlock, 0, stream)(
        sums, bounds, count, static_cast<acc_t*>(grad_value), value_elements);
    return cudaGetLastError();
  });
}

// Calls launch(scalar_t{}, acc_t{}) with the storage and accumulation types
// of value_type.
template <typename Launch>
cudaError_t with_value_type(ValueType value_type, Launch&& launch) {
  switch (value_type) {
    case ValueType::kFloat32:
      return launch(float(), float());
    case ValueType::kFloat64:
      return launch(double(), double());
    case ValueType::kFloat16:
      return launch(__half(), float());
    case ValueType::kBFloat16:
      return launch(__nv_bfloat16(), float());
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t ms_deform_attn_forward_cuda_launch(ValueType value_type, const MsdaSizes& sizes, const void* value,
                                               const int64_t* spatial_shapes, const int64_t* level_start_index,
                                               const void* sampling_locations, const void* attention_weights,
                                               void* output, cudaStream_t stream) {
  return with_value_type(value_type, [&](auto scalar, auto acc) {
    return forward_typed<decltype(scalar), decltype(acc)>(sizes, value, spatial_shapes, level_start_index,
                                                          sampling_locations, attention_weights, output, stream);
  });
}

cudaError_t ms_deform_attn_backward_cuda_launch(ValueType value_type, const MsdaSizes& sizes,
                                                const void* grad_output, const void* value,
                                                const int64_t* spatial_shapes, const int64_t* level_start_index,
                                                const void* sampling_locations, const void* attention_weights,
                                                void* grad_value_acc, void* grad_locations, void* grad_attention,
                                                GradValueStrategy strategy, void* deterministic_workspace,
                                                cudaStream_t stream) {
  return with_value_type(value_type, [&](auto scalar, auto acc) {
    return backward_typed<decltype(scalar), decltype(acc)>(
        sizes, grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        grad_value_acc, grad_locations, grad_attention, strategy, deterministic_workspace, stream);
  });
}

}  // namespace detr_cuda
