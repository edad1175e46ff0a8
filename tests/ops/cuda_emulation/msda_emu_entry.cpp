// The CUDA kernels of csrc/cuda/ms_deform_attn_cuda.cu, compiled by g++ on top
// of the emulator (msda_emu.h) and exported with a C ABI for ctypes
// (tests/cuda_emulation/__init__.py). Build: g++ -std=c++20 -Icsrc
// -I$CUDA_HOME/include -shared -fPIC (see build_library there).
#include "msda_emu.h"

#include "cuda/ms_deform_attn_cuda.cu"

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

// strategy: detr_cuda::GradValueStrategy as an int; workspace: kDeterministic's
// zeroed int64 buffer of B*S*H*C + 2 elements (else null).
MSDA_EMU_EXPORT int msda_emu_backward(int value_type, int64_t batch, int64_t num_values, int64_t num_heads,
                                      int64_t channels, int64_t num_queries, int64_t num_levels, int64_t num_points,
                                      const void* grad_output, const void* value, const int64_t* spatial_shapes,
                                      const int64_t* level_start_index, const void* sampling_locations,
                                      const void* attention_weights, void* grad_value_acc, void* grad_locations,
                                      void* grad_attention, int strategy, void* workspace) {
  msda_emu::reset_errors();
  const auto sz = make_sizes(batch, num_values, num_heads, channels, num_queries, num_levels, num_points);
  return finish(detr_cuda::ms_deform_attn_backward_cuda_launch(
      static_cast<detr_cuda::ValueType>(value_type), sz, grad_output, value, spatial_shapes, level_start_index,
      sampling_locations, attention_weights, grad_value_acc, grad_locations, grad_attention,
      static_cast<detr_cuda::GradValueStrategy>(strategy), workspace, nullptr));
}

#include "msda_emu_api.h"
