// Registers the ms_deform_attn operator with the PyTorch dispatcher (the one
// file that does so) and holds the input checks shared by both backends.
// The Python side (detr_cuda/ops/functional.py) adds the fake (meta)
// implementation and the autograd formula.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace detr_cuda {

at::ScalarType ms_deform_attn_acc_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

MsdaSizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, H, C), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (B, Q, H, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be (B, Q, H, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must be (L,), got ",
              level_start_index.sizes());
  MsdaSizes sz;
  sz.batch = value.size(0);
  sz.num_values = value.size(1);
  sz.num_heads = value.size(2);
  sz.channels = value.size(3);
  sz.num_queries = sampling_locations.size(1);
  sz.num_levels = spatial_shapes.size(0);
  sz.num_points = sampling_locations.size(4);
  const std::vector<int64_t> loc_expected = {sz.batch, sz.num_queries, sz.num_heads, sz.num_levels, sz.num_points, 2};
  const std::vector<int64_t> attn_expected = {sz.batch, sz.num_queries, sz.num_heads, sz.num_levels, sz.num_points};
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(loc_expected), "ms_deform_attn: sampling_locations ",
              sampling_locations.sizes(), " disagrees with value/spatial_shapes, expected ", loc_expected);
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(attn_expected), "ms_deform_attn: attention_weights ",
              attention_weights.sizes(), " disagrees, expected ", attn_expected);
  TORCH_CHECK(level_start_index.size(0) == sz.num_levels, "ms_deform_attn: level_start_index has ",
              level_start_index.size(0), " entries for ", sz.num_levels, " levels");

  const auto value_type = value.scalar_type();
  TORCH_CHECK(value_type == at::kFloat || value_type == at::kDouble || value_type == at::kHalf ||
                  value_type == at::kBFloat16,
              "ms_deform_attn: value dtype must be float32, float64, float16 or bfloat16, got ", value_type);
  const auto acc_type = ms_deform_attn_acc_type(value_type);
  TORCH_CHECK(sampling_locations.scalar_type() == acc_type && attention_weights.scalar_type() == acc_type,
              "ms_deform_attn: sampling_locations and attention_weights must be ", acc_type, " for ", value_type,
              " value, got ", sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");

  const auto device = value.device();
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == device, "ms_deform_attn: all inputs must be on ", device, ", got one on ",
                t->device());
  }
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: inputs must be contiguous (the Python wrapper makes them so)");
  }
  // Level geometry against S: cheap on the CPU; on a GPU it would need a
  // device-to-host copy, so there the Python wrapper checks it (once per
  // spatial_shapes tensor) before the call.
  if (spatial_shapes.device().is_cpu()) {
    const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
    const int64_t* starts = level_start_index.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < sz.num_levels; ++l) {
      TORCH_CHECK(shapes[2 * l] > 0 && shapes[2 * l + 1] > 0, "ms_deform_attn: level ", l, " has size ",
                  shapes[2 * l], "x", shapes[2 * l + 1]);
      TORCH_CHECK(starts[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", starts[l],
                  " but the levels before it hold ", total, " positions");
      total += shapes[2 * l] * shapes[2 * l + 1];
    }
    TORCH_CHECK(total == sz.num_values, "ms_deform_attn: value has S=", sz.num_values,
                " positions but spatial_shapes sum to ", total);
  }
  return sz;
}

BackwardBuffers start_ms_deform_attn_backward(const at::Tensor& grad_output, const at::Tensor& value,
                                              const at::Tensor& sampling_locations,
                                              const at::Tensor& attention_weights, const MsdaSizes& sz,
                                              bool zero_grad_value, bool grad_value_in_value_dtype) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({sz.batch, sz.num_queries, sz.num_heads * sz.channels}),
              "ms_deform_attn backward: grad_output ", grad_output.sizes(), " does not match the output shape");
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device() &&
                  grad_output.is_contiguous(),
              "ms_deform_attn backward: grad_output must be a contiguous ", value.scalar_type(), " tensor on ",
              value.device());
  BackwardBuffers buffers;
  buffers.has_work = grad_output.numel() > 0 && value.numel() > 0;
  const auto grad_value_options = value.options().dtype(
      grad_value_in_value_dtype ? value.scalar_type() : ms_deform_attn_acc_type(value.scalar_type()));
  buffers.grad_value_acc = zero_grad_value || !buffers.has_work ? at::zeros(value.sizes(), grad_value_options)
                                                                : at::empty(value.sizes(), grad_value_options);
  buffers.grad_locations =
      buffers.has_work ? at::empty_like(sampling_locations) : at::zeros_like(sampling_locations);
  buffers.grad_attention = buffers.has_work ? at::empty_like(attention_weights) : at::zeros_like(attention_weights);
  return buffers;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> BackwardBuffers::finish(at::ScalarType value_type) const {
  at::Tensor grad_value = grad_value_acc.scalar_type() == value_type ? grad_value_acc : grad_value_acc.to(value_type);
  return {grad_value, grad_locations, grad_attention};
}

}  // namespace detr_cuda

TORCH_LIBRARY(detr_cuda, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(detr_cuda, CPU, m) {
  m.impl("ms_deform_attn_forward", &detr_cuda::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &detr_cuda::ms_deform_attn_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(detr_cuda, CUDA, m) {
  m.impl("ms_deform_attn_forward", &detr_cuda::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &detr_cuda::ms_deform_attn_backward_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "detr_cuda compiled operators; the ops live in torch.ops.detr_cuda";
  module.def("cpu_kernel_isa", &detr_cuda::ms_deform_attn_cpu_isa,
             "Instruction set of the CPU kernels on this machine: avx512, avx2 or baseline");
#ifdef WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
