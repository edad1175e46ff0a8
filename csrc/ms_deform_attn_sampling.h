// Per-sample bilinear math of multi-scale deformable attention, shared by the
// CPU and CUDA kernels so that the CPU tests exercise the arithmetic the GPU
// runs. No torch, ATen or CUDA runtime headers: plain C++ that nvcc compiles
// for the device and any C++17 compiler compiles for the host.
//
// Sampling convention (the original Deformable DETR kernel, equal to
// grid_sample(align_corners=False, padding_mode="zeros")):
//   pixel x = loc_x * W - 0.5, pixel y = loc_y * H - 0.5 (pixel centres at
//   integers); a sample contributes only if -1 < x < W and -1 < y < H;
//   corners outside [0, W-1] x [0, H-1] read as zero.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace detr_cuda {

// Sizes of one call. value (B, S, H, C), sampling_locations (B, Q, H, L, P, 2),
// attention_weights (B, Q, H, L, P), output (B, Q, H * C); all contiguous.
struct MsdaSizes {
  int64_t batch;        // B
  int64_t num_values;   // S = sum over levels of H_l * W_l
  int64_t num_heads;    // H
  int64_t channels;     // C, channels per head
  int64_t num_queries;  // Q
  int64_t num_levels;   // L
  int64_t num_points;   // P
};

MSDA_HOST_DEVICE float msda_floor(float v) { return floorf(v); }
MSDA_HOST_DEVICE double msda_floor(double v) { return floor(v); }

// One bilinear sample on one level. Corners in the order
// (y0, x0), (y0, x1), (y1, x0), (y1, x1) with x1 = x0 + 1, y1 = y0 + 1.
template <typename acc_t>
struct BilinearSample {
  // Position of each corner inside its level (y * W + x), or -1 when the
  // corner is off the map: such a corner is never read and has all weights 0.
  int64_t offset[4];
  acc_t weight[4];      // bilinear interpolation weight
  acc_t dweight_dx[4];  // d weight / d (pixel x)
  acc_t dweight_dy[4];  // d weight / d (pixel y)
  bool active;          // false when the sample lies outside (-1, W) x (-1, H)
};

template <typename acc_t>
MSDA_HOST_DEVICE BilinearSample<acc_t> make_bilinear_sample(acc_t loc_x, acc_t loc_y, int64_t height,
                                                            int64_t width) {
  BilinearSample<acc_t> s;
  for (int i = 0; i < 4; ++i) {
    s.offset[i] = -1;
    s.weight[i] = acc_t(0);
    s.dweight_dx[i] = acc_t(0);
    s.dweight_dy[i] = acc_t(0);
  }
  const acc_t x = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Written so that NaN locations fail the test and sample nothing.
  s.active = x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) &&
             y < static_cast<acc_t>(height);
  if (!s.active) return s;
  const acc_t x0f = msda_floor(x);
  const acc_t y0f = msda_floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const acc_t lx = x - x0f, ly = y - y0f;                // distance past the low corner
  const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;    // distance to the high corner
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 <= width - 1;
  const bool y0_in = y0 >= 0, y1_in = y0 + 1 <= height - 1;
  const bool corner_in[4] = {y0_in && x0_in, y0_in && x1_in, y1_in && x0_in, y1_in && x1_in};
  const int64_t corner_offset[4] = {y0 * width + x0, y0 * width + x0 + 1, (y0 + 1) * width + x0,
                                    (y0 + 1) * width + x0 + 1};
  const acc_t weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t dweight_dx[4] = {-hy, hy, -ly, ly};
  const acc_t dweight_dy[4] = {-hx, -lx, hx, lx};
  for (int i = 0; i < 4; ++i) {
    if (!corner_in[i]) continue;
    s.offset[i] = corner_offset[i];
    s.weight[i] = weight[i];
    s.dweight_dx[i] = dweight_dx[i];
    s.dweight_dy[i] = dweight_dy[i];
  }
  return s;
}

// Gradients of one sample's contribution attn * sum_i weight_i * <grad_out, v_i>
// given dots[i] = sum over channels of grad_out[c] * v_i[c].
template <typename acc_t>
struct SampleGradients {
  acc_t attn;   // d loss / d attention weight
  acc_t loc_x;  // d loss / d sampling location x (normalised)
  acc_t loc_y;  // d loss / d sampling location y (normalised)
};

template <typename acc_t>
MSDA_HOST_DEVICE SampleGradients<acc_t> sample_gradients(const BilinearSample<acc_t>& s, acc_t attn,
                                                         const acc_t dots[4], int64_t height, int64_t width) {
  acc_t interpolated = acc_t(0), d_dx = acc_t(0), d_dy = acc_t(0);
  for (int i = 0; i < 4; ++i) {
    interpolated += s.weight[i] * dots[i];
    d_dx += s.dweight_dx[i] * dots[i];
    d_dy += s.dweight_dy[i] * dots[i];
  }
  SampleGradients<acc_t> g;
  g.attn = interpolated;
  // pixel x = loc_x * W - 0.5, so d/d loc_x = W * d/d x.
  g.loc_x = attn * static_cast<acc_t>(width) * d_dx;
  g.loc_y = attn * static_cast<acc_t>(height) * d_dy;
  return g;
}

// Element offset of value[b, level_start + position, head, 0] in a contiguous
// (B, S, H, C) tensor; 64-bit throughout.
MSDA_HOST_DEVICE int64_t value_row(const MsdaSizes& sz, int64_t b, int64_t level_start, int64_t position,
                                   int64_t head) {
  return ((b * sz.num_values + level_start + position) * sz.num_heads + head) * sz.channels;
}

}  // namespace detr_cuda
