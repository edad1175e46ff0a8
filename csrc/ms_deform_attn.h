// Torch-side entry points of the ms_deform_attn operator (registered in
// ms_deform_attn_op.cpp). The Python wrapper validates inputs with clear
// ValueError/TypeError messages first; the checks here are the last line of
// defence so that a direct torch.ops call can never read out of bounds.
//
// Dtype contract (both backends):
//   value, output, grad_output, grad_value: float32, float64, float16, bfloat16
//   sampling_locations, attention_weights and their grads: the accumulation
//   type, float64 for float64 value and float32 otherwise
//   spatial_shapes, level_start_index: int64 on the device of value
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "ms_deform_attn_sampling.h"

namespace detr_cuda {

// Checks ranks, sizes, dtypes, devices and contiguity; returns the sizes.
MsdaSizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// The accumulation dtype that sampling locations / attention weights must have.
at::ScalarType ms_deform_attn_acc_type(at::ScalarType value_type);

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights);
#endif

}  // namespace detr_cuda
