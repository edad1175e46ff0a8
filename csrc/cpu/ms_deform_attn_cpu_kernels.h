// Bodies of the CPU kernels of multi-scale deformable attention.
//
// ms_deform_attn_cpu.cpp includes this file once per instruction set, each
// time inside its own namespace (MSDA_CPU_ISA) and, for AVX2 and AVX-512,
// under `#pragma GCC target`: the same code is compiled for each vector
// width and the widest one the CPU runs is chosen at run time. So:
// no include guard, nothing here but inline code in that namespace, and no
// header may be first included here (it would be compiled for the wider
// instruction set and could be shared with code that runs on any CPU).
//
// Sampling convention (the original Deformable DETR kernel, equal to
// grid_sample(align_corners=False, padding_mode="zeros"), as in
// ms_deform_attn_sampling.h): pixel x = loc_x * W - 0.5; a sample counts only
// if -1 < x < W and -1 < y < H; corners off the map read as zero.
//
// Why the kernels look the way they do (each point was a cost in the
// instruction counts of the kernel before them):
// - A row (b, q, h) first computes the corner table of all its samples in
//   one loop the compiler vectorises across samples (int32 positions,
//   branch-free floor and bounds), instead of per-sample scalar set-up with
//   int64 index math, a libm floor call and a branch per corner.
// - A corner that is off the map points at a row of zeros (reads) and, in
//   the backward, at a spare row (writes), so the channel loops have no
//   branches on the bounds.
// - Channels go in chunks of 128 bytes whose accumulators are explicit
//   vectors that stay in registers over all samples of the row (a local
//   array in plain loops stays in memory); channels left over after the full
//   chunks go through plain loops.
// - The backward adds float32 / float64 gradients straight into grad_value.
//   float16 / bfloat16: it sums each (batch, head) pair's grad_value in a
//   thread-private float32 scratch that stays in cache and writes it out
//   once, converted; there is no float32 copy of grad_value to cast.
namespace detr_cuda {
namespace MSDA_CPU_ISA {

// Samples whose corner table is on the stack at once (L * P is 16 by default;
// larger rows are processed in groups).
constexpr int kGroup = 64;

template <typename acc_t>
struct CornerTable {
  // Position of each corner in value (level start + y * W + x, within one
  // batch item), or the sentinel S when the corner is off the map.
  int32_t pos[4][kGroup];
  // attention weight * bilinear weight, 0 off the map. Corner order
  // (y0, x0), (y0, x1), (y1, x0), (y1, x1).
  acc_t weight[4][kGroup];
  // Distance past the low corner (x - x0, y - y0); 0 for a sample outside
  // the window, so every gradient term stays finite.
  acc_t lx[kGroup];
  acc_t ly[kGroup];
};

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
// bfloat16 is the top half of a float: a shift, which vectorises (c10's
// conversion goes through a union the vectoriser may not see through).
inline float to_acc(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float to_acc(c10::Half v) { return static_cast<float>(v); }

// Corner table of samples [k0, k0 + n) of one row; n <= kGroup. The loop
// vectorises across samples only because setup.py builds with
// -fno-trapping-math: otherwise GCC keeps the float compares and selects
// below as branches.
template <typename acc_t>
inline void locate_corners(const acc_t* __restrict loc, const acc_t* __restrict attn, const SampleLevels<acc_t>& lv,
                           int64_t k0, int n, int32_t sentinel, CornerTable<acc_t>& t) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const int64_t k = k0 + j;
    const acc_t width = lv.width_f[k], height = lv.height_f[k];
    const acc_t x = loc[2 * k] * width - acc_t(0.5);
    const acc_t y = loc[2 * k + 1] * height - acc_t(0.5);
    // Written so that NaN locations fail the test and sample nothing.
    const bool active = (x > acc_t(-1)) & (y > acc_t(-1)) & (x < width) & (y < height);
    const acc_t xa = active ? x : acc_t(0);
    const acc_t ya = active ? y : acc_t(0);
    // floor() of a number in (-1, W): truncate, then step down below zero.
    int32_t x0 = static_cast<int32_t>(xa);
    int32_t y0 = static_cast<int32_t>(ya);
    x0 -= xa < static_cast<acc_t>(x0) ? 1 : 0;
    y0 -= ya < static_cast<acc_t>(y0) ? 1 : 0;
    const acc_t lx = xa - static_cast<acc_t>(x0), ly = ya - static_cast<acc_t>(y0);
    const acc_t hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const int32_t w = lv.width[k];
    const bool x0_in = active & (x0 >= 0), x1_in = active & (x0 + 1 < w);
    const bool y0_in = y0 >= 0, y1_in = y0 + 1 < lv.height[k];
    const bool in00 = y0_in & x0_in, in01 = y0_in & x1_in, in10 = y1_in & x0_in, in11 = y1_in & x1_in;
    const int32_t p00 = lv.start[k] + y0 * w + x0;
    const acc_t a = attn[k];
    t.pos[0][j] = in00 ? p00 : sentinel;
    t.pos[1][j] = in01 ? p00 + 1 : sentinel;
    t.pos[2][j] = in10 ? p00 + w : sentinel;
    t.pos[3][j] = in11 ? p00 + w + 1 : sentinel;
    const acc_t w00 = a * (hy * hx), w01 = a * (hy * lx), w10 = a * (ly * hx), w11 = a * (ly * lx);
    t.weight[0][j] = in00 ? w00 : acc_t(0);
    t.weight[1][j] = in01 ? w01 : acc_t(0);
    t.weight[2][j] = in10 ? w10 : acc_t(0);
    t.weight[3][j] = in11 ? w11 : acc_t(0);
    t.lx[j] = lx;
    t.ly[j] = ly;
  }
}

// Where one batch item and head of value (and of its gradient) live.
template <typename scalar_t>
struct HeadView {
  const scalar_t* value;     // value[b, 0, h, 0]
  int64_t row_stride;        // H * C: from one position to the next
  const scalar_t* zero_row;  // C zeros, read for corners off the map
  int32_t sentinel;          // S

  const scalar_t* row(int32_t pos) const {
    return pos != sentinel ? value + static_cast<int64_t>(pos) * row_stride : zero_row;
  }
};

// Where the backward adds one (batch, head) pair's grad_value: straight into
// grad_value when it has the accumulation type, else into a float32 scratch
// of S x C that is written out, converted, at the end of the pair.
template <typename acc_t>
struct GradRows {
  acc_t* base;        // row of position 0
  int64_t stride;     // H * C (grad_value) or C (scratch)
  acc_t* sink;        // C spare accumulators: off-map corners add 0 there
  int32_t sentinel;   // S

  acc_t* row(int32_t pos) const { return pos != sentinel ? base + static_cast<int64_t>(pos) * stride : sink; }
};

// Channels per chunk: 128 bytes of the accumulation type (32 float, 16 double).
template <typename acc_t>
constexpr int kChunk = 128 / static_cast<int>(sizeof(acc_t));

#if MSDA_CPU_VECTOR_BYTES
// Full chunks use explicit vectors (GCC/clang vector extensions, lowered to
// the registers of this file's instruction set): plain loops over a local
// accumulator array leave it in memory, a load and a store per corner.
template <typename T, int kBytes>
struct VectorOf {
  typedef T type __attribute__((vector_size(kBytes)));
};
template <typename acc_t>
using Vec = typename VectorOf<acc_t, MSDA_CPU_VECTOR_BYTES>::type;
template <typename acc_t>
constexpr int kLanes = MSDA_CPU_VECTOR_BYTES / static_cast<int>(sizeof(acc_t));

template <typename acc_t>
constexpr int kVecs = kChunk<acc_t> / kLanes<acc_t>;

template <typename acc_t>
inline Vec<acc_t> load_vec(const acc_t* p) {
  Vec<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename acc_t>
inline void store_vec(acc_t* p, const Vec<acc_t>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// One chunk of value, grad_output, the output or the backward's scratch as
// kVecs vectors of the accumulation type. For bfloat16 the lanes hold the
// channels out of order: vector 2h has the even channels of
// [2hL, 2(h+1)L), vector 2h + 1 the odd ones, so that two bfloat16 in one
// 32-bit word become two floats with one shift and one mask (a widening
// load and a shift per vector otherwise: bfloat16 took more instructions
// than float32). Every chunk of one call uses the same order, and the
// output is written back in memory order.
typedef uint32_t Bits __attribute__((vector_size(MSDA_CPU_VECTOR_BYTES)));

inline void load_chunk(const float* p, Vec<float> (&x)[kVecs<float>]) {
  for (int m = 0; m < kVecs<float>; ++m) x[m] = load_vec(p + m * kLanes<float>);
}
inline void load_chunk(const double* p, Vec<double> (&x)[kVecs<double>]) {
  for (int m = 0; m < kVecs<double>; ++m) x[m] = load_vec(p + m * kLanes<double>);
}
inline void load_chunk(const c10::BFloat16* p, Vec<float> (&x)[kVecs<float>]) {
  for (int h = 0; h < kVecs<float> / 2; ++h) {
    Bits pairs;
    std::memcpy(&pairs, p + 2 * h * kLanes<float>, sizeof(pairs));
    const Bits even = pairs << 16, odd = pairs & 0xFFFF0000u;
    std::memcpy(&x[2 * h], &even, sizeof(even));
    std::memcpy(&x[2 * h + 1], &odd, sizeof(odd));
  }
}
inline void load_chunk(const c10::Half* p, Vec<float> (&x)[kVecs<float>]) {
  float lanes[kChunk<float>];
  for (int c = 0; c < kChunk<float>; ++c) lanes[c] = static_cast<float>(p[c]);
  std::memcpy(x, lanes, sizeof(lanes));
}

inline void store_chunk(float* p, const Vec<float> (&x)[kVecs<float>]) { std::memcpy(p, x, sizeof(x)); }
inline void store_chunk(double* p, const Vec<double> (&x)[kVecs<double>]) { std::memcpy(p, x, sizeof(x)); }
// Rounded to nearest even, NaN to 0x7FC0, as c10::BFloat16(float).
inline Bits round_to_bfloat16(const Vec<float>& v) {
  Bits bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const Bits rounded = bits + (0x7FFFu + ((bits >> 16) & 1u));
  const Bits nan = (Bits)(v != v);  // all ones in NaN lanes
  return (rounded & ~nan) | ((Bits{} + 0x7FC00000u) & nan);
}
inline void store_chunk(c10::BFloat16* p, const Vec<float> (&x)[kVecs<float>]) {
  for (int h = 0; h < kVecs<float> / 2; ++h) {
    const Bits pairs = (round_to_bfloat16(x[2 * h]) >> 16) | (round_to_bfloat16(x[2 * h + 1]) & 0xFFFF0000u);
    std::memcpy(p + 2 * h * kLanes<float>, &pairs, sizeof(pairs));
  }
}
inline void store_chunk(c10::Half* p, const Vec<float> (&x)[kVecs<float>]) {
  float lanes[kChunk<float>];
  std::memcpy(lanes, x, sizeof(lanes));
  for (int c = 0; c < kChunk<float>; ++c) p[c] = static_cast<c10::Half>(lanes[c]);
}

// Lane permutations for the reduction below: lane i of the result is lane
// at(i) of the concatenation of two vectors of L lanes.
template <int L>
struct FirstHalves {  // first halves of a and of b
  static constexpr int at(int i) { return i < L / 2 ? i : L + i - L / 2; }
};
template <int L>
struct SecondHalves {
  static constexpr int at(int i) { return FirstHalves<L>::at(i) + L / 2; }
};
template <int L>
struct FirstQuarters {  // first halves of the two groups of L / 2 lanes of a, then of b
  static constexpr int at(int i) { return (i / (L / 4) / 2) * L + (i / (L / 4) % 2) * (L / 2) + i % (L / 4); }
};
template <int L>
struct SecondQuarters {
  static constexpr int at(int i) { return FirstQuarters<L>::at(i) + L / 4; }
};
template <int kStride>
struct SwapLanes {  // a with lanes i and i ^ kStride swapped
  static constexpr int at(int i) { return i ^ kStride; }
};

template <typename Pattern, typename acc_t, int... I>
inline Vec<acc_t> permute(const Vec<acc_t>& a, const Vec<acc_t>& b, std::integer_sequence<int, I...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, Pattern::at(I)...);
#else
  typedef std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t> Index;
  typedef Index Mask __attribute__((vector_size(MSDA_CPU_VECTOR_BYTES)));
  return __builtin_shuffle(a, b, Mask{Pattern::at(I)...});
#endif
}
template <typename Pattern, typename acc_t>
inline Vec<acc_t> permute(const Vec<acc_t>& a, const Vec<acc_t>& b) {
  return permute<Pattern, acc_t>(a, b, std::make_integer_sequence<int, kLanes<acc_t>>{});
}

// The lane sums of four vectors (one per corner), in a fixed order: halves
// of pairs, then quarters of the four, are added across vectors before the
// last steps inside one vector, which costs a quarter of four separate
// horizontal sums.
template <typename acc_t>
inline void sum_lanes4(const Vec<acc_t> (&p)[4], acc_t (&sums)[4]) {
  constexpr int L = kLanes<acc_t>;
  const Vec<acc_t> x = permute<FirstHalves<L>, acc_t>(p[0], p[1]) + permute<SecondHalves<L>, acc_t>(p[0], p[1]);
  const Vec<acc_t> y = permute<FirstHalves<L>, acc_t>(p[2], p[3]) + permute<SecondHalves<L>, acc_t>(p[2], p[3]);
  if constexpr (L == 2) {  // x = (sum p0, sum p1), y = (sum p2, sum p3)
    sums[0] = x[0], sums[1] = x[1], sums[2] = y[0], sums[3] = y[1];
  } else {
    // Four groups of L / 4 lanes, one per vector.
    Vec<acc_t> z = permute<FirstQuarters<L>, acc_t>(x, y) + permute<SecondQuarters<L>, acc_t>(x, y);
    if constexpr (L >= 16) z += permute<SwapLanes<2>, acc_t>(z, z);
    if constexpr (L >= 8) z += permute<SwapLanes<1>, acc_t>(z, z);
    for (int i = 0; i < 4; ++i) sums[i] = z[i * (L / 4)];
  }
}

// Output channels [c0, c0 + kChunk) of one row. The corners are spread over
// kSets sets of accumulators so that about 8 independent chains of
// multiply-adds are in flight (one set of 2 AVX-512 vectors would wait on
// the latency of each multiply-add); the sets are added in a fixed order.
template <typename scalar_t, typename acc_t>
inline void forward_vector_chunk(const ForwardArgs<scalar_t, acc_t>& a, const HeadView<scalar_t>& view, int64_t row,
                                 CornerTable<acc_t>& t, bool table_ready, int64_t c0) {
  constexpr int kSets = kVecs<acc_t> >= 8 ? 1 : kVecs<acc_t> >= 4 ? 2 : 4;
  Vec<acc_t> acc[kSets][kVecs<acc_t>] = {};
  const int64_t samples = a.sz.num_levels * a.sz.num_points;
  for (int64_t k0 = 0; k0 < samples; k0 += kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(kGroup, samples - k0));
    if (!table_ready) {
      locate_corners(a.locations + row * samples * 2, a.attention + row * samples, a.levels, k0, n, view.sentinel, t);
    }
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < 4; ++i) {
        Vec<acc_t> x[kVecs<acc_t>];
        load_chunk(view.row(t.pos[i][j]) + c0, x);
        const acc_t w = t.weight[i][j];
        for (int m = 0; m < kVecs<acc_t>; ++m) acc[i % kSets][m] += w * x[m];
      }
    }
  }
  for (int step = 1; step < kSets; step *= 2) {
    for (int set = 0; set + step < kSets; set += 2 * step) {
      for (int m = 0; m < kVecs<acc_t>; ++m) acc[set][m] += acc[set + step][m];
    }
  }
  store_chunk(a.output + row * a.sz.channels + c0, acc[0]);
}

// Channels [c0, c0 + kChunk) of one row's samples: dots[i][j] += <grad_out,
// value at corner i of sample j> and scratch[corner] += weight * grad_out.
template <typename scalar_t, typename acc_t>
inline void scatter_vector_chunk(const CornerTable<acc_t>& t, int n, const HeadView<scalar_t>& view,
                                 const GradRows<acc_t>& grads, const scalar_t* grad_out_row, int64_t c0,
                                 acc_t (*dots)[kGroup]) {
  constexpr int kL = kLanes<acc_t>;
  Vec<acc_t> g[kVecs<acc_t>];
  load_chunk(grad_out_row + c0, g);
  for (int j = 0; j < n; ++j) {
    Vec<acc_t> products[4];
    for (int i = 0; i < 4; ++i) {
      const int32_t pos = t.pos[i][j];
      Vec<acc_t> x[kVecs<acc_t>];
      load_chunk(view.row(pos) + c0, x);
      // In the chunk order of load_chunk (grad_value's own rows have it).
      acc_t* s = grads.row(pos) + c0;
      const acc_t w = t.weight[i][j];
      products[i] = g[0] * x[0];
      for (int m = 1; m < kVecs<acc_t>; ++m) products[i] += g[m] * x[m];
      for (int m = 0; m < kVecs<acc_t>; ++m) store_vec(s + m * kL, load_vec(s + m * kL) + w * g[m]);
    }
    acc_t sums[4];
    sum_lanes4(products, sums);
    for (int i = 0; i < 4; ++i) dots[i][j] += sums[i];
  }
}
#endif  // MSDA_CPU_VECTOR_BYTES

// The same as the vector chunks for any width <= kChunk, in plain loops: the
// channels left over after the full chunks (and all of them where the
// compiler has no vector extensions).
template <typename scalar_t, typename acc_t>
inline void forward_plain_chunk(const ForwardArgs<scalar_t, acc_t>& a, const HeadView<scalar_t>& view, int64_t row,
                                CornerTable<acc_t>& t, bool table_ready, int64_t c0, int width) {
  acc_t acc[kChunk<acc_t>];
  for (int c = 0; c < width; ++c) acc[c] = acc_t(0);
  const int64_t samples = a.sz.num_levels * a.sz.num_points;
  for (int64_t k0 = 0; k0 < samples; k0 += kGroup) {
    const int n = static_cast<int>(std::min<int64_t>(kGroup, samples - k0));
    if (!table_ready) {
      locate_corners(a.locations + row * samples * 2, a.attention + row * samples, a.levels, k0, n, view.sentinel, t);
    }
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < 4; ++i) {
        const scalar_t* __restrict v = view.row(t.pos[i][j]) + c0;
        const acc_t w = t.weight[i][j];
#pragma omp simd
        for (int c = 0; c < width; ++c) acc[c] += w * to_acc(v[c]);
      }
    }
  }
  scalar_t* out = a.output + row * a.sz.channels + c0;
  for (int c = 0; c < width; ++c) out[c] = static_cast<scalar_t>(acc[c]);
}

template <typename scalar_t, typename acc_t>
inline void scatter_plain_chunk(const CornerTable<acc_t>& t, int n, const HeadView<scalar_t>& view,
                                const GradRows<acc_t>& grads, const scalar_t* grad_out_row, int64_t c0, int width,
                                acc_t (*dots)[kGroup]) {
  acc_t g[kChunk<acc_t>];
  for (int c = 0; c < width; ++c) g[c] = to_acc(grad_out_row[c0 + c]);
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < 4; ++i) {
      const int32_t pos = t.pos[i][j];
      const scalar_t* __restrict v = view.row(pos) + c0;
      acc_t* __restrict s = grads.row(pos) + c0;
      const acc_t w = t.weight[i][j];
      acc_t dot = acc_t(0);
      // A vectorised reduction: its summation order is fixed at compile
      // time, so results stay bitwise reproducible.
#pragma omp simd reduction(+ : dot)
      for (int c = 0; c < width; ++c) {
        dot += g[c] * to_acc(v[c]);
        s[c] += w * g[c];
      }
      dots[i][j] += dot;
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward(const ForwardArgs<scalar_t, acc_t>& a) {
  const MsdaSizes& sz = a.sz;
  const int64_t samples = sz.num_levels * sz.num_points;
  const int64_t rows = sz.batch * sz.num_queries * sz.num_heads;
  constexpr int chunk = kChunk<acc_t>;
  // Rows are independent and cost the same: a static split, with enough
  // work per thread (~32k multiply-adds) to be worth waking it.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, samples * sz.channels * 4));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    CornerTable<acc_t> t;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t head = row % sz.num_heads;
      const int64_t b = row / (sz.num_queries * sz.num_heads);
      const HeadView<scalar_t> view{a.value + (b * sz.num_values * sz.num_heads + head) * sz.channels,
                                    sz.num_heads * sz.channels, a.zero_row, static_cast<int32_t>(sz.num_values)};
      // One group of samples (the usual case): the table serves every chunk.
      const bool table_ready = samples <= kGroup;
      if (table_ready) {
        locate_corners(a.locations + row * samples * 2, a.attention + row * samples, a.levels, 0,
                       static_cast<int>(samples), view.sentinel, t);
      }
      int64_t c0 = 0;
#if MSDA_CPU_VECTOR_BYTES
      for (; c0 + chunk <= sz.channels; c0 += chunk) forward_vector_chunk(a, view, row, t, table_ready, c0);
#endif
      for (; c0 < sz.channels; c0 += chunk) {
        forward_plain_chunk(a, view, row, t, table_ready, c0, static_cast<int>(std::min<int64_t>(chunk, sz.channels - c0)));
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward(const BackwardArgs<scalar_t, acc_t>& a) {
  const MsdaSizes& sz = a.sz;
  const int64_t samples = sz.num_levels * sz.num_points;
  const int64_t channels = sz.channels;
  const int64_t row_stride = sz.num_heads * channels;
  constexpr int chunk = kChunk<acc_t>;
  // float32 / float64: grad_value (zeroed by the caller) is the accumulator.
  constexpr bool kInPlace = std::is_same<scalar_t, acc_t>::value;
  // One task per (batch, head) pair: the grad_value rows it writes,
  // grad_value[b, :, h, :], are its own, and it walks its queries in order,
  // so the result is bitwise the same from run to run and for any thread
  // count, with no atomics.
  const int64_t scratch_size = kInPlace ? channels : (sz.num_values + 1) * channels;
  constexpr int64_t kAlign = 64;  // bytes: a cache line, one AVX-512 vector
  at::parallel_for(0, sz.batch * sz.num_heads, 1, [&](int64_t begin, int64_t end) {
    // The scratch starts on a cache line, so no vector of its rows straddles two lines. With
    // std::vector's own 16-byte alignment the bfloat16 backward of bench_msda's enc320 took
    // 8.3-8.7 ms where the allocation landed off a line (after the float32 rows, in every run),
    // 6.0-6.1 ms aligned.
    std::vector<acc_t> storage(scratch_size + kAlign / sizeof(acc_t));
    const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
    acc_t* const scratch = reinterpret_cast<acc_t*>((address + kAlign - 1) / kAlign * kAlign);
    CornerTable<acc_t> t;
    acc_t dots[4][kGroup];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / sz.num_heads;
      const int64_t head = pair % sz.num_heads;
      const int64_t head_offset = (b * sz.num_values * sz.num_heads + head) * channels;
      const int32_t sentinel = static_cast<int32_t>(sz.num_values);
      const HeadView<scalar_t> view{a.value + head_offset, row_stride, a.zero_row, sentinel};
      GradRows<acc_t> grads;
      if constexpr (kInPlace) {
        grads = {a.grad_value + head_offset, row_stride, scratch, sentinel};
      } else {
        std::fill(scratch, scratch + scratch_size, acc_t(0));
        grads = {scratch, channels, scratch + sz.num_values * channels, sentinel};
      }
      for (int64_t q = 0; q < sz.num_queries; ++q) {
        const int64_t row = (b * sz.num_queries + q) * sz.num_heads + head;
        const scalar_t* grad_out_row = a.grad_output + row * channels;
        const acc_t* attn = a.attention + row * samples;
        acc_t* grad_loc = a.grad_locations + row * samples * 2;
        acc_t* grad_attn = a.grad_attention + row * samples;
        for (int64_t k0 = 0; k0 < samples; k0 += kGroup) {
          const int n = static_cast<int>(std::min<int64_t>(kGroup, samples - k0));
          locate_corners(a.locations + row * samples * 2, attn, a.levels, k0, n, sentinel, t);
          for (int i = 0; i < 4; ++i) {
            for (int j = 0; j < n; ++j) dots[i][j] = acc_t(0);
          }
          int64_t c0 = 0;
#if MSDA_CPU_VECTOR_BYTES
          for (; c0 + chunk <= channels; c0 += chunk) scatter_vector_chunk(t, n, view, grads, grad_out_row, c0, dots);
#endif
          for (; c0 < channels; c0 += chunk) {
            scatter_plain_chunk(t, n, view, grads, grad_out_row, c0,
                                static_cast<int>(std::min<int64_t>(chunk, channels - c0)), dots);
          }
          // The sample's share of the loss is attn * sum_i bilinear_i * dot_i;
          // off-map corners have dot 0. Sums in the order of
          // ms_deform_attn_sampling.h's sample_gradients.
#pragma omp simd
          for (int j = 0; j < n; ++j) {
            const int64_t k = k0 + j;
            const acc_t lx = t.lx[j], ly = t.ly[j], hx = acc_t(1) - lx, hy = acc_t(1) - ly;
            const acc_t d0 = dots[0][j], d1 = dots[1][j], d2 = dots[2][j], d3 = dots[3][j];
            const acc_t interpolated = hy * hx * d0 + hy * lx * d1 + ly * hx * d2 + ly * lx * d3;
            const acc_t d_dx = -hy * d0 + hy * d1 + -ly * d2 + ly * d3;
            const acc_t d_dy = -hx * d0 + -lx * d1 + hx * d2 + lx * d3;
            grad_attn[k] = interpolated;
            grad_loc[2 * k] = attn[k] * a.levels.width_f[k] * d_dx;
            grad_loc[2 * k + 1] = attn[k] * a.levels.height_f[k] * d_dy;
          }
        }
      }
      if constexpr (!kInPlace) {
        scalar_t* out = a.grad_value + head_offset;
        for (int64_t s = 0; s < sz.num_values; ++s) {
          const acc_t* src = scratch + s * channels;
          scalar_t* dst = out + s * row_stride;
          int64_t c0 = 0;
#if MSDA_CPU_VECTOR_BYTES
          for (; c0 + chunk <= channels; c0 += chunk) {  // chunk order, see load_chunk
            Vec<acc_t> x[kVecs<acc_t>];
            for (int m = 0; m < kVecs<acc_t>; ++m) x[m] = load_vec(src + c0 + m * kLanes<acc_t>);
            store_chunk(dst + c0, x);
          }
#endif
          for (int64_t c = c0; c < channels; ++c) dst[c] = static_cast<scalar_t>(src[c]);
        }
      }
    }
  });
}

}  // namespace MSDA_CPU_ISA
}  // namespace detr_cuda
