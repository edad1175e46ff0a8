// The CUDA kernels of csrc/cuda/ms_deform_attn_cuda.cu, compiled by g++ on top
// of the emulator (msda_emu.h) and exported with a C ABI for ctypes
// (tests/cuda_emulation/__init__.py). Build: g++ -std=c++20 -Icsrc
// -I$CUDA_HOME/include -shared -fPIC (see build_library there).
#include "msda_emu.h"

#include "cuda/ms_deform_attn_cuda.cu"

#include <tuple>

#define MSDA_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

detr_cuda::MsdaSizes make_sizes(int64_t batch, int64_t num_values, int64_t num_heads, int64_t channels,
                                int64_t num_queries, int64_t num_levels, int64_t num_points) {
  detr_cuda::MsdaSizes sz;
  sz.batch = batch;
  sz.num_values = num_values;
  sz.num_heads = num_heads;
  sz.channels = channels;
  sz.num_queries = num_queries;
  sz.num_levels = num_levels;
  sz.num_points = num_points;
  return sz;
}

// The launcher's own result first; then an error it left unread (a launcher
// that forgot cudaGetLastError), then a kernel fault.
int finish(cudaError_t launcher_result) {
  if (launcher_result != cudaSuccess) return launcher_result;
  if (msda_emu::g_last_error != cudaSuccess) {
    msda_emu::report("msda_emu: the launcher returned cudaSuccess but left an unread launch error");
    return msda_emu::g_last_error;
  }
  return msda_emu::g_sticky_fault;
}

// The backward launcher, called with or without an enum "strategy" argument
// before the stream (a launcher may offer several grad_value accumulation
// strategies): the int is cast to the launcher's own parameter type, so this
// file compiles against either signature without naming the enum.
template <typename... P, typename... A>
cudaError_t call_backward(cudaError_t (*launch)(P...), int strategy, A... args) {
  if constexpr (sizeof...(P) == 13) {
    using Strategy = std::tuple_element_t<11, std::tuple<P...>>;
    return launch(args..., static_cast<Strategy>(strategy), nullptr);
  } else {
    return strategy == 0 ? launch(args..., nullptr) : cudaErrorInvalidValue;
  }
}

template <typename... P>
constexpr int backward_strategy_parameter(cudaError_t (*)(P...)) {
  return sizeof...(P) == 13 ? 1 : 0;
}

}  // namespace

// value_type: 0 float32, 1 float64, 2 float16, 3 bfloat16 (detr_cuda::ValueType).
MSDA_EMU_EXPORT int msda_emu_forward(int value_type, int64_t batch, int64_t num_values, int64_t num_heads,
                                     int64_t channels, int64_t num_queries, int64_t num_levels, int64_t num_points,
                                     const void* value, const int64_t* spatial_shapes,
                                     const int64_t* level_start_index, const void* sampling_locations,
                                     const void* attention_weights, void* output) {
  msda_emu::reset_errors();
  const auto sz = make_sizes(batch, num_values, num_heads, channels, num_queries, num_levels, num_points);
  return finish(detr_cuda::ms_deform_attn_forward_cuda_launch(static_cast<detr_cuda::ValueType>(value_type), sz, value,
                                                              spatial_shapes, level_start_index, sampling_locations,
                                                              attention_weights, output, nullptr));
}

MSDA_EMU_EXPORT int msda_emu_backward(int value_type, int64_t batch, int64_t num_values, int64_t num_heads,
                                      int64_t channels, int64_t num_queries, int64_t num_levels, int64_t num_points,
                                      const void* grad_output, const void* value, const int64_t* spatial_shapes,
                                      const int64_t* level_start_index, const void* sampling_locations,
                                      const void* attention_weights, void* grad_value_acc, void* grad_locations,
                                      void* grad_attention, int strategy) {
  msda_emu::reset_errors();
  const auto sz = make_sizes(batch, num_values, num_heads, channels, num_queries, num_levels, num_points);
  return finish(call_backward(&detr_cuda::ms_deform_attn_backward_cuda_launch, strategy,
                              static_cast<detr_cuda::ValueType>(value_type), sz, grad_output, value, spatial_shapes,
                              level_start_index, sampling_locations, attention_weights, grad_value_acc,
                              grad_locations, grad_attention));
}

// 1 when the backward launcher takes a strategy argument (then msda_emu_backward
// passes `strategy` to it), 0 when it does not (then only strategy 0 exists).
MSDA_EMU_EXPORT int msda_emu_backward_has_strategy() {
  return backward_strategy_parameter(&detr_cuda::ms_deform_attn_backward_cuda_launch);
}

#include "msda_emu_api.h"
