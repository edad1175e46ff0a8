// CPU kernels of multi-scale deformable attention.
//
// Forward: at::parallel_for over the B*Q*H (batch, query, head) rows; each row
// accumulates its L*P samples into a C-vector in the accumulation type and
// writes its slice of the output once. No (B*H, C, Q, L*P) intermediate.
//
// Backward: at::parallel_for over the B*H (batch, head) pairs. grad_value is
// a scatter (many queries add into the same value position), and the
// positions a (b, h) pair writes are exactly grad_value[b, :, h, :], which no
// other pair touches. So there are no races, no atomics and no per-thread
// copies of grad_value, and each task walks its queries in order: the result
// is bitwise identical from run to run and for any thread count. B*H is 16
// for the usual B=2, H=8, enough tasks for a CPU's cores.
//
// float16 / bfloat16 value: every sum is taken in float32 (grad_value in a
// float32 buffer, cast once at the end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace detr_cuda {
namespace {

struct LevelGeometry {
  int64_t height, width, start;
};

std::vector<LevelGeometry> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  std::vector<LevelGeometry> levels(spatial_shapes.size(0));
  for (size_t l = 0; l < levels.size(); ++l) levels[l] = {shapes[2 * l], shapes[2 * l + 1], starts[l]};
  return levels;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* value, const std::vector<LevelGeometry>& levels, const acc_t* locations,
                    const acc_t* attention, scalar_t* output, const MsdaSizes& sz) {
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  const int64_t samples_per_row = sz.num_levels * sz.num_points;
  const int64_t work_per_row = std::max<int64_t>(1, samples_per_row * sz.channels * 4);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(sz.channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t head = row % sz.num_heads;
      const int64_t b = row / (sz.num_queries * sz.num_heads);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const acc_t* loc = locations + row * samples_per_row * 2;
      const acc_t* attn = attention + row * samples_per_row;
      for (int64_t l = 0; l < sz.num_levels; ++l) {
        const LevelGeometry& level = levels[l];
        for (int64_t p = 0; p < sz.num_points; ++p) {
          const int64_t k = l * sz.num_points + p;
          const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], level.height,
                                                                      level.width);
          if (!s.active) continue;
          for (int i = 0; i < 4; ++i) {
            if (s.offset[i] < 0) continue;
            const acc_t w = attn[k] * s.weight[i];
            const scalar_t* v = value + value_row(sz, b, level.start, s.offset[i], head);
            acc_t* out_acc = acc.data();
#pragma omp simd
            for (int64_t c = 0; c < sz.channels; ++c) out_acc[c] += w * static_cast<acc_t>(v[c]);
          }
        }
      }
      scalar_t* out = output + row * sz.channels;
      for (int64_t c = 0; c < sz.channels; ++c) out[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const std::vector<LevelGeometry>& levels,
                     const acc_t* locations, const acc_t* attention, acc_t* grad_value, acc_t* grad_locations,
                     acc_t* grad_attention, const MsdaSizes& sz) {
  const int64_t samples_per_row = sz.num_levels * sz.num_points;
  at::parallel_for(0, sz.batch * sz.num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_out(sz.channels);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / sz.num_heads;
      const int64_t head = pair % sz.num_heads;
      for (int64_t q = 0; q < sz.num_queries; ++q) {
        const int64_t row = (b * sz.num_queries + q) * sz.num_heads + head;
        const scalar_t* g = grad_output + row * sz.channels;
        for (int64_t c = 0; c < sz.channels; ++c) grad_out[c] = static_cast<acc_t>(g[c]);
        const acc_t* loc = locations + row * samples_per_row * 2;
        const acc_t* attn = attention + row * samples_per_row;
        acc_t* grad_loc = grad_locations + row * samples_per_row * 2;
        acc_t* grad_attn = grad_attention + row * samples_per_row;
        for (int64_t l = 0; l < sz.num_levels; ++l) {
          const LevelGeometry& level = levels[l];
          for (int64_t p = 0; p < sz.num_points; ++p) {
            const int64_t k = l * sz.num_points + p;
            const BilinearSample<acc_t> s = make_bilinear_sample<acc_t>(loc[2 * k], loc[2 * k + 1], level.height,
                                                                        level.width);
            acc_t dots[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
            for (int i = 0; i < 4; ++i) {
              if (s.offset[i] < 0) continue;
              const int64_t corner = value_row(sz, b, level.start, s.offset[i], head);
              const scalar_t* v = value + corner;
              acc_t* gv = grad_value + corner;
              const acc_t coef = attn[k] * s.weight[i];
              const acc_t* grad = grad_out.data();
              acc_t dot = acc_t(0);
              // A vectorised reduction: its summation order is fixed at compile
              // time, so results stay bitwise reproducible.
#pragma omp simd reduction(+ : dot)
              for (int64_t c = 0; c < sz.channels; ++c) {
                dot += grad[c] * static_cast<acc_t>(v[c]);
                gv[c] += coef * grad[c];
              }
              dots[i] = dot;
            }
            const SampleGradients<acc_t> grads = sample_gradients<acc_t>(s, attn[k], dots, level.height, level.width);
            grad_attn[k] = grads.attn;
            grad_loc[2 * k] = grads.loc_x;
            grad_loc[2 * k + 1] = grads.loc_y;
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  at::Tensor output = at::empty({sz.batch, sz.num_queries, sz.num_heads * sz.channels}, value.options());
  if (output.numel() == 0) return output;
  const auto levels = read_levels(spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(value.data_ptr<scalar_t>(), levels, sampling_locations.data_ptr<acc_t>(),
                                    attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), sz);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const BackwardBuffers buffers = start_ms_deform_attn_backward(grad_output, value, sampling_locations,
                                                                attention_weights, sz);
  if (buffers.has_work) {
    const auto levels = read_levels(spatial_shapes, level_start_index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), levels,
                                       sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(),
                                       buffers.grad_value_acc.data_ptr<acc_t>(),
                                       buffers.grad_locations.data_ptr<acc_t>(),
                                       buffers.grad_attention.data_ptr<acc_t>(), sz);
    });
  }
  return buffers.finish(value.scalar_type());
}

}  // namespace detr_cuda
