// CPU kernels of multi-scale deformable attention: torch glue and the choice
// of instruction set. The kernel bodies are in ms_deform_attn_cpu_kernels.h.
//
// Forward: at::parallel_for over the B*Q*H (batch, query, head) rows; each row
// accumulates its L*P samples into C accumulators in the accumulation type and
// writes its slice of the output once. No (B*H, C, Q, L*P) intermediate.
//
// Backward: at::parallel_for over the B*H (batch, head) pairs. grad_value is
// a scatter (many queries add into the same value position), and the
// positions a (b, h) pair writes are exactly grad_value[b, :, h, :], which no
// other pair touches. So there are no races, no atomics and no per-thread
// copies of grad_value, and each task walks its queries in order: the result
// is bitwise identical from run to run and for any thread count.
//
// float16 / bfloat16 value: every sum is taken in float32.
//
// Instruction sets: the extension is built without -march flags (it must run
// on any CPU of a cluster), so the kernels are compiled three times on x86-64
// with GCC: for the baseline, and under `#pragma GCC target` for AVX2+FMA and
// for AVX-512. At run time the widest one that torch's own CPU capability
// allows is used (torch.backends.cpu.get_cpu_capability(); the
// ATEN_CPU_CAPABILITY environment variable lowers it, for torch and for this
// kernel alike). Results differ between instruction sets in the last bits
// (summation order, fused multiply-adds), never between runs or thread counts.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MSDA_CPU_X86_VARIANTS 1
#else
#define MSDA_CPU_X86_VARIANTS 0
#endif

namespace detr_cuda {

// Level geometry per sample index k = l * P + p of a row, so the per-sample
// set-up reads it with the same index as the locations.
template <typename acc_t>
struct SampleLevels {
  const acc_t* width_f;
  const acc_t* height_f;
  const int32_t* width;
  const int32_t* height;
  const int32_t* start;
};

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  MsdaSizes sz;
  SampleLevels<acc_t> levels;
  const scalar_t* value;
  const scalar_t* zero_row;  // C zeros
  const acc_t* locations;
  const acc_t* attention;
  scalar_t* output;
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  MsdaSizes sz;
  SampleLevels<acc_t> levels;
  const scalar_t* grad_output;
  const scalar_t* value;
  const scalar_t* zero_row;  // C zeros
  const acc_t* locations;
  const acc_t* attention;
  scalar_t* grad_value;  // every element is written
  acc_t* grad_locations;
  acc_t* grad_attention;
};

}  // namespace detr_cuda

// Vector extensions (explicit vectors for the full channel chunks) exist in
// GCC and clang; elsewhere the kernels use plain loops only.
#if defined(__GNUC__)
#define MSDA_CPU_VECTOR_BYTES 16
#else
#define MSDA_CPU_VECTOR_BYTES 0
#endif
#define MSDA_CPU_ISA baseline
#include "ms_deform_attn_cpu_kernels.h"
#undef MSDA_CPU_ISA
#undef MSDA_CPU_VECTOR_BYTES

#if MSDA_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MSDA_CPU_ISA avx2
#define MSDA_CPU_VECTOR_BYTES 32
#include "ms_deform_attn_cpu_kernels.h"
#undef MSDA_CPU_ISA
#undef MSDA_CPU_VECTOR_BYTES
#pragma GCC pop_options

#pragma GCC push_options
// GCC's generic tuning would otherwise keep to 256-bit vectors.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#define MSDA_CPU_ISA avx512
#define MSDA_CPU_VECTOR_BYTES 64
#include "ms_deform_attn_cpu_kernels.h"
#undef MSDA_CPU_ISA
#undef MSDA_CPU_VECTOR_BYTES
#pragma GCC pop_options
#endif

namespace detr_cuda {
namespace {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

CpuIsa detect_cpu_isa() {
#if MSDA_CPU_X86_VARIANTS
  // torch's capability already checks the CPU (and honours
  // ATEN_CPU_CAPABILITY); the CPU is asked again for the extra features the
  // target pragmas above enable.
  const std::string capability = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (capability == "AVX512" && avx512) return CpuIsa::kAvx512;
  if ((capability == "AVX512" || capability == "AVX2") && avx2) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

// Per-sample copies of the level geometry (see SampleLevels).
template <typename acc_t>
struct LevelTables {
  std::vector<acc_t> width_f, height_f;
  std::vector<int32_t> width, height, start;

  LevelTables(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const MsdaSizes& sz) {
    // Positions are int32 inside the kernels, with S as the off-map
    // sentinel and room for a corner one row past the last level.
    TORCH_CHECK(sz.num_values <= (int64_t(1) << 30), "ms_deform_attn (cpu): at most 2^30 value positions, got S=",
                sz.num_values);
    const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
    const int64_t* starts = level_start_index.data_ptr<int64_t>();
    for (int64_t l = 0; l < sz.num_levels; ++l) {
      for (int64_t p = 0; p < sz.num_points; ++p) {
        height_f.push_back(static_cast<acc_t>(shapes[2 * l]));
        width_f.push_back(static_cast<acc_t>(shapes[2 * l + 1]));
        height.push_back(static_cast<int32_t>(shapes[2 * l]));
        width.push_back(static_cast<int32_t>(shapes[2 * l + 1]));
        start.push_back(static_cast<int32_t>(starts[l]));
      }
    }
  }

  SampleLevels<acc_t> view() const {
    return {width_f.data(), height_f.data(), width.data(), height.data(), start.data()};
  }
};

template <typename scalar_t, typename acc_t>
void run_forward(const ForwardArgs<scalar_t, acc_t>& args) {
  switch (cpu_isa()) {
#if MSDA_CPU_X86_VARIANTS
    case CpuIsa::kAvx512:
      return avx512::forward(args);
    case CpuIsa::kAvx2:
      return avx2::forward(args);
#endif
    default:
      return baseline::forward(args);
  }
}

template <typename scalar_t, typename acc_t>
void run_backward(const BackwardArgs<scalar_t, acc_t>& args) {
  switch (cpu_isa()) {
#if MSDA_CPU_X86_VARIANTS
    case CpuIsa::kAvx512:
      return avx512::backward(args);
    case CpuIsa::kAvx2:
      return avx2::backward(args);
#endif
    default:
      return baseline::backward(args);
  }
}

}  // namespace

std::string ms_deform_attn_cpu_isa() {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor output = at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  if (output.numel() == 0) return output;
  const at::Tensor zero_row = at::zeros({sz.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LevelTables<acc_t> levels(spatial_shapes, level_start_index, sz);
    ForwardArgs<scalar_t, acc_t> args{sz,
                                      levels.view(),
                                      value.data_ptr<scalar_t>(),
                                      zero_row.data_ptr<scalar_t>(),
                                      sampling_locations.data_ptr<acc_t>(),
                                      attention_weights.data_ptr<acc_t>(),
                                      output.data_ptr<scalar_t>()};
    run_forward(args);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  // float32 / float64: the kernel adds into grad_value, zeroed here. float16 /
  // bfloat16: it sums in a float32 scratch and writes every grad_value
  // element in value's dtype (no float32 copy of grad_value, no cast).
  const bool half_precision = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  const BackwardBuffers buffers = start_ms_deform_attn_backward(
      grad_output, value, sampling_locations, attention_weights, sz, /*zero_grad_value=*/!half_precision,
      /*grad_value_in_value_dtype=*/half_precision);
  if (buffers.has_work) {
    const at::Tensor zero_row = at::zeros({sz.channels}, value.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const LevelTables<acc_t> levels(spatial_shapes, level_start_index, sz);
      BackwardArgs<scalar_t, acc_t> args{sz,
                                         levels.view(),
                                         grad_output.data_ptr<scalar_t>(),
                                         value.data_ptr<scalar_t>(),
                                         zero_row.data_ptr<scalar_t>(),
                                         sampling_locations.data_ptr<acc_t>(),
                                         attention_weights.data_ptr<acc_t>(),
                                         buffers.grad_value_acc.data_ptr<scalar_t>(),
                                         buffers.grad_locations.data_ptr<acc_t>(),
                                         buffers.grad_attention.data_ptr<acc_t>()};
      run_backward(args);
    });
  }
  return buffers.finish(value.scalar_type());
}

}  // namespace detr_cuda
