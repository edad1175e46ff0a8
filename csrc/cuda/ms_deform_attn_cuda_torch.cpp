// Torch glue for the CUDA kernels (compiled only WITH_CUDA): device guard,
// current stream, output allocation, the backward's grad_value strategy
// ($DETR_CUDA_MSDA_GRAD_VALUE), and every launch's error raised.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <cstring>

#include "cuda/ms_deform_attn_cuda.h"
#include "ms_deform_attn.h"

namespace detr_cuda {
namespace {

ValueType cuda_value_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return ValueType::kFloat32;
    case at::kDouble:
      return ValueType::kFloat64;
    case at::kHalf:
      return ValueType::kFloat16;
    case at::kBFloat16:
      return ValueType::kBFloat16;
    default:
      TORCH_CHECK(false, "ms_deform_attn (cuda): unsupported value dtype ", type);
  }
}

// $DETR_CUDA_MSDA_GRAD_VALUE, read on every backward call (cheap next to a
// launch, and a benchmark or test can switch it between calls).
constexpr const char* kGradValueEnvVar = "DETR_CUDA_MSDA_GRAD_VALUE";

// Unset or empty: "deterministic" under torch.use_deterministic_algorithms(True),
// else "atomic".
GradValueStrategy grad_value_strategy_from_env() {
  const char* setting = std::getenv(kGradValueEnvVar);
  if (setting == nullptr || setting[0] == '\0') {
    return at::globalContext().deterministicAlgorithms() ? GradValueStrategy::kDeterministic
                                                         : GradValueStrategy::kGlobalAtomics;
  }
  if (std::strcmp(setting, "atomic") == 0) return GradValueStrategy::kGlobalAtomics;
  if (std::strcmp(setting, "shared") == 0) return GradValueStrategy::kSharedAggregation;
  if (std::strcmp(setting, "deterministic") == 0) return GradValueStrategy::kDeterministic;
  TORCH_CHECK(false, "ms_deform_attn (cuda): $", kGradValueEnvVar, " must be 'atomic' (global atomics, the default), "
              "'shared' (shared-memory aggregation of the coarse levels) or 'deterministic' (bitwise reproducible "
              "grad_value, fixed-point atomics), got '", setting, "'");
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "ms_deform_attn (cuda): ", what, " kernel launch failed: ",
              cudaGetErrorString(error));
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output = at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  if (output.numel() == 0) return output;
  check_launch(ms_deform_attn_forward_cuda_launch(
                   cuda_value_type(value.scalar_type()), sz, value.data_ptr(), spatial_shapes.data_ptr<int64_t>(),
                   level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr(),
                   attention_weights.data_ptr(), output.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "forward");
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard device_guard(value.device());
  const GradValueStrategy strategy = grad_value_strategy_from_env();
  // The deterministic strategy converts its fixed-point sums into every grad_value element.
  const BackwardBuffers buffers = start_ms_deform_attn_backward(
      grad_output, value, sampling_locations, attention_weights, sz,
      /*zero_grad_value=*/strategy != GradValueStrategy::kDeterministic);
  if (buffers.has_work) {
    // kDeterministic's fixed-point sums and two bounds (int64, zeroed).
    const at::Tensor workspace = strategy == GradValueStrategy::kDeterministic
                                     ? at::zeros({value.numel() + 2}, value.options().dtype(at::kLong))
                                     : at::Tensor();
    check_launch(ms_deform_attn_backward_cuda_launch(
                     cuda_value_type(value.scalar_type()), sz, grad_output.data_ptr(), value.data_ptr(),
                     spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                     sampling_locations.data_ptr(), attention_weights.data_ptr(),
                     buffers.grad_value_acc.data_ptr(), buffers.grad_locations.data_ptr(),
                     buffers.grad_attention.data_ptr(), strategy,
                     workspace.defined() ? workspace.data_ptr() : nullptr,
                     c10::cuda::getCurrentCUDAStream().stream()),
                 "backward");
  }
  return buffers.finish(value.scalar_type());
}

}  // namespace detr_cuda
