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
// BilinearSample code the CPU kernel runs) and reads only in-map corners.
// Forward sums the L*P samples in registers in the accumulation type and
// writes its output vector once (no output memset). Backward adds into the
// zeroed accumulation-type grad_value with atomics (not bitwise
// deterministic), and reduces the per-sample corner dot products over the
// row's lanes with warp shuffles, so grad_locations / grad_attention have one
// writer each and are deterministic.
//
// All offsets are 64-bit; any batch size works (no im2col_step); the grid is
// capped and the kernels stride over the remaining rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
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

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

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

// The level geometry lives in device memory, so the host cannot check it
// without a copy (the Python wrapper does, once per spatial_shapes tensor). A
// level that would reach past S is skipped, so that even a direct op call with
// inconsistent shapes never reads or writes out of bounds.
__device__ __forceinline__ bool level_fits(const MsdaSizes& sz, int64_t height, int64_t width, int64_t start) {
  return height > 0 && width > 0 && height <= sz.num_values && width <= sz.num_values && start >= 0 &&
         start + height * width <= sz.num_values;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                   const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ locations,
                   const acc_t* __restrict__ attention, scalar_t* __restrict__ output, const MsdaSizes sz,
                   const int lanes_log2, const int64_t total_threads) {
  const int64_t lanes = int64_t(1) << lanes_log2;
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  const int64_t vectors = sz.channels / VEC;
  const int64_t samples_per_row = sz.num_levels * sz.num_points;
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
        for (int64_t p = 0; p < sz.num_points; ++p) {
          const int64_t k = l * sz.num_points + p;
          const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], height, width);
          if (!s.active) continue;
          const acc_t a = attn[k];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if (s.offset[i] < 0) continue;
            const acc_t w = a * s.weight[i];
            const ChannelVector<scalar_t, VEC> v =
                load_vector<scalar_t, VEC>(value + value_row(sz, b, start, s.offset[i], head) + c0);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += w * to_acc(v.v[j]);
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

// At least two blocks per SM (<= 128 registers): without the bound the
// 8-channel variants use ~230 registers and run one block per SM.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock, 2)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
                    const acc_t* __restrict__ locations, const acc_t* __restrict__ attention,
                    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_locations,
                    acc_t* __restrict__ grad_attention, const MsdaSizes sz, const int lanes_log2,
                    const int64_t total_threads) {
  const int lanes = 1 << lanes_log2;
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  const int64_t vectors = sz.channels / VEC;
  const int64_t samples_per_row = sz.num_levels * sz.num_points;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  // total_threads and stride are multiples of 32, so all lanes of a warp run
  // every loop below equally often and reach each shuffle together. Threads
  // past the last row take part in the shuffles with zeros and write nothing.
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total_threads; t += stride) {
    const int64_t row_or_pad = t >> lanes_log2;
    const bool valid = row_or_pad < rows;
    const int64_t row = valid ? row_or_pad : 0;
    const int lane = static_cast<int>(t & (lanes - 1));
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
      for (int64_t p = 0; p < sz.num_points; ++p) {
        const int64_t k = l * sz.num_points + p;
        const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], height, width);
        const acc_t a = attn[k];
        acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        if (valid && level_ok && s.active) {
          for (int64_t vec = lane; vec < vectors; vec += lanes) {
            const int64_t c0 = vec * VEC;
            const ChannelVector<scalar_t, VEC> g_raw = load_vector<scalar_t, VEC>(grad_out + c0);
            acc_t g[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) g[j] = to_acc(g_raw.v[j]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              if (s.offset[i] < 0) continue;
              const int64_t corner = value_row(sz, b, start, s.offset[i], head) + c0;
              const ChannelVector<scalar_t, VEC> v = load_vector<scalar_t, VEC>(value + corner);
#pragma unroll
              for (int j = 0; j < VEC; ++j) dots[i] += g[j] * to_acc(v.v[j]);
              const acc_t coef = a * s.weight[i];
              if (coef != acc_t(0)) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) atomicAdd(grad_value + corner + j, coef * g[j]);
              }
            }
          }
        }
        for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
#pragma unroll
          for (int i = 0; i < 4; ++i) dots[i] += __shfl_xor_sync(0xffffffffu, dots[i], offset);
        }
        if (valid && lane == 0) {
          const SampleGradients<acc_t> grads = sample_gradients<acc_t>(s, a, dots, height, width);
          const int64_t sample = row * samples_per_row + k;
          grad_attention[sample] = grads.attn;
          grad_locations[2 * sample] = grads.loc_x;
          grad_locations[2 * sample + 1] = grads.loc_y;
        }
      }
    }
  }
}

// Widest vector (at most 16 bytes) that divides C and keeps every pointer aligned.
template <typename scalar_t>
int pick_vector_width(int64_t channels, std::initializer_list<const void*> pointers) {
  int width = 16 / static_cast<int>(sizeof(scalar_t));
  for (; width > 1; width /= 2) {
    bool fits = channels % width == 0;
    for (const void* ptr : pointers) {
      fits = fits && reinterpret_cast<uintptr_t>(ptr) % (width * sizeof(scalar_t)) == 0;
    }
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

LaunchShape launch_shape(const MsdaSizes& sz, int vec) {
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  const int64_t vectors = sz.channels / vec;
  int lanes_log2 = 0;
  while ((int64_t(1) << lanes_log2) < vectors && lanes_log2 < 5) ++lanes_log2;
  LaunchShape shape;
  shape.lanes_log2 = lanes_log2;
  shape.total_threads = ((rows << lanes_log2) + 31) / 32 * 32;
  shape.blocks = (shape.total_threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  if (shape.blocks > kMaxBlocks) shape.blocks = kMaxBlocks;
  return shape;
}

template <typename scalar_t, typename acc_t>
cudaError_t forward_typed(const MsdaSizes& sz, const void* value, const int64_t* spatial_shapes,
                          const int64_t* level_start_index, const void* locations, const void* attention,
                          void* output, cudaStream_t stream) {
  const int width = pick_vector_width<scalar_t>(sz.channels, {value, output});
  return with_vector_width<scalar_t>(width, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const LaunchShape shape = launch_shape(sz, VEC);
    if (shape.total_threads == 0) return cudaSuccess;
    const auto kernel = forward_kernel<scalar_t, acc_t, VEC>;
    MSDA_LAUNCH(kernel, static_cast<unsigned int>(shape.blocks), kThreadsPerBlock, 0, stream)(
        static_cast<const scalar_t*>(value), spatial_shapes, level_start_index,
        static_cast<const acc_t*>(locations), static_cast<const acc_t*>(attention), static_cast<scalar_t*>(output),
        sz, shape.lanes_log2, shape.total_threads);
    return cudaGetLastError();
  });
}

template <typename scalar_t, typename acc_t>
cudaError_t backward_typed(const MsdaSizes& sz, const void* grad_output, const void* value,
                           const int64_t* spatial_shapes, const int64_t* level_start_index, const void* locations,
                           const void* attention, void* grad_value, void* grad_locations, void* grad_attention,
                           cudaStream_t stream) {
  const int width = pick_vector_width<scalar_t>(sz.channels, {value, grad_output});
  return with_vector_width<scalar_t>(width, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    const LaunchShape shape = launch_shape(sz, VEC);
    if (shape.total_threads == 0) return cudaSuccess;
    const auto kernel = backward_kernel<scalar_t, acc_t, VEC>;
    MSDA_LAUNCH(kernel, static_cast<unsigned int>(shape.blocks), kThreadsPerBlock, 0, stream)(
        static_cast<const scalar_t*>(grad_output), static_cast<const scalar_t*>(value), spatial_shapes,
        level_start_index, static_cast<const acc_t*>(locations), static_cast<const acc_t*>(attention),
        static_cast<acc_t*>(grad_value), static_cast<acc_t*>(grad_locations), static_cast<acc_t*>(grad_attention),
        sz, shape.lanes_log2, shape.total_threads);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t ms_deform_attn_forward_cuda_launch(ValueType value_type, const MsdaSizes& sizes, const void* value,
                                               const int64_t* spatial_shapes, const int64_t* level_start_index,
                                               const void* sampling_locations, const void* attention_weights,
                                               void* output, cudaStream_t stream) {
  switch (value_type) {
    case ValueType::kFloat32:
      return forward_typed<float, float>(sizes, value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights, output, stream);
    case ValueType::kFloat64:
      return forward_typed<double, double>(sizes, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, output, stream);
    case ValueType::kFloat16:
      return forward_typed<__half, float>(sizes, value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights, output, stream);
    case ValueType::kBFloat16:
      return forward_typed<__nv_bfloat16, float>(sizes, value, spatial_shapes, level_start_index,
                                                 sampling_locations, attention_weights, output, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ms_deform_attn_backward_cuda_launch(ValueType value_type, const MsdaSizes& sizes,
                                                const void* grad_output, const void* value,
                                                const int64_t* spatial_shapes, const int64_t* level_start_index,
                                                const void* sampling_locations, const void* attention_weights,
                                                void* grad_value_acc, void* grad_locations, void* grad_attention,
                                                cudaStream_t stream) {
  switch (value_type) {
    case ValueType::kFloat32:
      return backward_typed<float, float>(sizes, grad_output, value, spatial_shapes, level_start_index,
                                          sampling_locations, attention_weights, grad_value_acc, grad_locations,
                                          grad_attention, stream);
    case ValueType::kFloat64:
      return backward_typed<double, double>(sizes, grad_output, value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights, grad_value_acc, grad_locations,
                                            grad_attention, stream);
    case ValueType::kFloat16:
      return backward_typed<__half, float>(sizes, grad_output, value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, grad_value_acc, grad_locations,
                                           grad_attention, stream);
    case ValueType::kBFloat16:
      return backward_typed<__nv_bfloat16, float>(sizes, grad_output, value, spatial_shapes, level_start_index,
                                                  sampling_locations, attention_weights, grad_value_acc,
                                                  grad_locations, grad_attention, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace detr_cuda
