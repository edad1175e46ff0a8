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

#include <string>
#include <tuple>

#include "ms_deform_attn_sampling.h"

namespace detr_cuda {

// Checks ranks, sizes, dtypes, devices and contiguity; returns the sizes.
MsdaSizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// The accumulation dtype that sampling locations / attention weights must have.
at::ScalarType ms_deform_attn_acc_type(at::ScalarType value_type);

// The gradient buffers of one backward call, the same for every backend:
// grad_value accumulates in the accumulation dtype and starts at zero (each
// sampled corner adds into it) unless start_ms_deform_attn_backward was told
// otherwise; the location and weight grads have one writer per element, so
// they start uninitialised unless there is nothing to compute.
struct BackwardBuffers {
  at::Tensor grad_value_acc;  // accumulation dtype, or value's (grad_value_in_value_dtype)
  at::Tensor grad_locations;
  at::Tensor grad_attention;
  bool has_work;  // false: empty batch, queries or values; the grads are zeros

  // (grad_value in value's dtype, grad_locations, grad_attention).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(at::ScalarType value_type) const;
};

// Checks grad_output against the output shape, dtype and device of the call
// and allocates the buffers (on the current device: take the guard first).
// zero_grad_value false: the backend writes every grad_value element itself
// (the CUDA deterministic strategy, the CPU kernel), so the buffer starts
// uninitialised unless there is nothing to compute.
// grad_value_in_value_dtype: the backend accumulates elsewhere and writes
// grad_value in value's dtype (the CPU kernel), so grad_value_acc gets that
// dtype instead of the accumulation dtype.
BackwardBuffers start_ms_deform_attn_backward(const at::Tensor& grad_output, const at::Tensor& value,
                                              const at::Tensor& sampling_locations,
                                              const at::Tensor& attention_weights, const MsdaSizes& sz,
                                              bool zero_grad_value = true, bool grad_value_in_value_dtype = false);

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights);

// The instruction set the CPU kernels run with on this machine: "avx512",
// "avx2" or "baseline" (see csrc/cpu/ms_deform_attn_cpu.cpp).
std::string ms_deform_attn_cpu_isa();

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
