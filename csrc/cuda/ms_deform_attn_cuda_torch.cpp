// Torch glue for the CUDA kernels (compiled only WITH_CUDA): device guard,
// current stream, output allocation, and every launch's error raised.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

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
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({sz.batch, sz.num_queries, sz.num_heads * sz.channels}),
              "ms_deform_attn backward: grad_output ", grad_output.sizes(), " does not match the output shape");
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device() &&
                  grad_output.is_contiguous(),
              "ms_deform_attn backward: grad_output must be a contiguous ", value.scalar_type(), " tensor on ",
              value.device());
  const c10::cuda::CUDAGuard device_guard(value.device());
  const auto acc_type = ms_deform_attn_acc_type(value.scalar_type());
  // Atomics need a zeroed accumulation-type buffer; the other two grads have
  // one writer per element and start uninitialised.
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_attention = at::empty_like(attention_weights);
  if (grad_output.numel() > 0 && value.numel() > 0) {
    check_launch(ms_deform_attn_backward_cuda_launch(
                     cuda_value_type(value.scalar_type()), sz, grad_output.data_ptr(), value.data_ptr(),
                     spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                     sampling_locations.data_ptr(), attention_weights.data_ptr(), grad_value_acc.data_ptr(),
                     grad_locations.data_ptr(), grad_attention.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
                 "backward");
  } else {
    grad_locations.zero_();
    grad_attention.zero_();
  }
  at::Tensor grad_value = grad_value_acc.scalar_type() == value.scalar_type() ? grad_value_acc
                                                                               : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_locations, grad_attention};
}

}  // namespace detr_cuda
