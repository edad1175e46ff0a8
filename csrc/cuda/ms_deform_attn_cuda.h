// Launchers of the CUDA kernels of multi-scale deformable attention. Raw
// pointers, 64-bit sizes and a stream in, a cudaError_t out: no torch headers,
// so the .cu compiles with plain nvcc (`make test-cuda-compile`). The torch
// glue is ms_deform_attn_cuda_torch.cpp.
//
// Dtype contract:
//   value / output / grad_output: float32, float64, float16 or bfloat16
//   (ValueType); sampling_locations, attention_weights, grad_locations and
//   grad_attention are float64 for float64 value and float32 otherwise;
//   grad_value_acc is a buffer of that same accumulation type (the caller
//   casts it to the value dtype), ZEROED for kGlobalAtomics and
//   kSharedAggregation (they add into it); kDeterministic writes every
//   element. All sums are taken in the
//   accumulation type.
//
// spatial_shapes (L, 2) and level_start_index (L,) are int64 device pointers.
// All tensors are contiguous in the layouts of MsdaSizes.
#pragma once

#include <cuda_runtime_api.h>

#include "ms_deform_attn_sampling.h"

namespace detr_cuda {

enum class ValueType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// How the backward accumulates grad_value (the torch glue reads it from
// $DETR_CUDA_MSDA_GRAD_VALUE: "atomic", the default, "shared" or
// "deterministic"; with torch.use_deterministic_algorithms(True) and the
// variable unset it picks "deterministic").
//   kGlobalAtomics      every contribution is an atomic add to global memory
//                       (float4 / float2 vector atomics on sm_90).
//   kSharedAggregation  head-major persistent blocks, one (batch, head) and a
//                       slice of queries each, accumulate the coarsest levels
//                       that fit their dynamic shared memory on chip and
//                       flush them once per block; the other levels use
//                       global atomics. Falls back to kGlobalAtomics when not
//                       even the per-level table fits (thousands of levels).
//   kDeterministic      bitwise reproducible grad_value: every contribution
//                       is rounded to a 64-bit fixed-point integer (scaled by
//                       a power of two chosen on the device from
//                       max|grad_output| * max|attention| * Q * P, so no sum
//                       can overflow) and added with integer atomics, whose
//                       result does not depend on their order; then converted
//                       back. Absolute error per contribution <= 2^-62 * Q * P
//                       * max|grad_output| * max|attention| (finer than
//                       float32 rounding for all but the tiniest elements);
//                       a NaN or Inf in grad_output or attention_weights makes
//                       all of grad_value NaN. Needs deterministic_workspace:
//                       a ZEROED int64 buffer of B*S*H*C + 2 elements.
// All give the same grad_value up to float summation order (kDeterministic:
// up to its rounding); grad_locations and grad_attention are bitwise
// identical between them.
enum class GradValueStrategy { kGlobalAtomics, kSharedAggregation, kDeterministic };

cudaError_t ms_deform_attn_forward_cuda_launch(ValueType value_type, const MsdaSizes& sizes, const void* value,
                                               const int64_t* spatial_shapes, const int64_t* level_start_index,
                                               const void* sampling_locations, const void* attention_weights,
                                               void* output, cudaStream_t stream);

// grad_value_acc accumulates with float atomics under kGlobalAtomics and
// kSharedAggregation: its last bits can differ from run to run (grad_locations
// and grad_attention never do; kDeterministic makes grad_value reproducible
// too). deterministic_workspace is used by kDeterministic only (else null).
// The shared strategy queries the device's SM count and shared-memory limits
// once per device (cudaDeviceGetAttribute) and may raise the kernel's dynamic
// shared-memory limit (cudaFuncSetAttribute); neither syncs with the device.
cudaError_t ms_deform_attn_backward_cuda_launch(ValueType value_type, const MsdaSizes& sizes,
                                                const void* grad_output, const void* value,
                                                const int64_t* spatial_shapes, const int64_t* level_start_index,
                                                const void* sampling_locations, const void* attention_weights,
                                                void* grad_value_acc, void* grad_locations, void* grad_attention,
                                                GradValueStrategy strategy, void* deterministic_workspace,
                                                cudaStream_t stream);

}  // namespace detr_cuda
