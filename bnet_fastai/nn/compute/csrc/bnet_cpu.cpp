// BNET2d on CPU tensors (float32): the normalisation fused into the depthwise k x k conv, forward and backward,
// with BatchNorm's passes over each map (see bnet_fastai/nn/compute/cpp_bnet.py for the whole design):
//
//   forward (training)  1. statistics: read x                         -> per-channel mean, invstd
//                       2. y = b + sum_taps W * xhat, normalised on load: read x, write y
//   forward (eval)      2. only, with the running statistics
//   backward            3. sums: db = sum dy, dW[t] = sum dy * xhat(shifted by tap t), and S[t] = the sum of dy
//                          over the positions where tap t sees the map: read dy, x
//                       4. dx = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), with
//                          dxhat = the conv of dy with the flipped kernel, sum dxhat = sum_t W[t] S[t] and
//                          sum dxhat * xhat = sum_t W[t] dW[t] (so dxhat is never stored): read dy, x, write dx
//
// channels_last maps: a task's rows are normalised (or copied, for dy) once into a zero-padded buffer of about
// 128 KiB that every tap reads, vectorised over channels (k = 1 needs no buffer). Contiguous (NCHW) maps: a ring of
// k rows per (n, c) plane, vectorised over columns. Tasks run in parallel through at::parallel_for (torch's own
// thread pool). The reductions write one slot per task, tasks depend on the shape alone, and slots combine in
// task order in double: results are bit-identical whatever the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using at::Tensor;
#ifdef __AVX512F__
constexpr int VL = 16;  // channels per vector step (channels_last): one AVX-512 register
#else
constexpr int VL = 8;
#endif

struct Shape {
  int64_t N, C, H, W;
};

Shape shape_of(const Tensor& x) { return {x.size(0), x.size(1), x.size(2), x.size(3)}; }

// ------------------------------------------------------------------------------------------------------------
// channels_last: x[n][h][w][c], vectorised over channels
// ------------------------------------------------------------------------------------------------------------

// A task is a run of rows of the whole batch ((n, h) flattened) whose padded copy takes about 128 KiB (it stays in
// the core's cache while every tap reads it). A function of the shape alone, so that the reductions' partition (one
// slot per task) never depends on the number of threads.
struct Tasks {
  int64_t count, rows;
};

Tasks row_tasks(const Shape& s, int64_t k) {
  const int64_t total = s.N * s.H;
  const int64_t bytes = total * (s.W + k - 1) * s.C * int64_t(sizeof(float));
  const int64_t count = std::min(total, std::max<int64_t>(1, (bytes + (1 << 17) - 1) >> 17));
  const int64_t rows = (total + count - 1) / count;
  return {(total + rows - 1) / rows, rows};
}

// Rows h0 .. h1 - 1 of image n, and where row h0 - P of its padded copy starts in the task's buffer.
struct Segment {
  int64_t n, h0, h1;
  const float* base;
};

// A task's rows copied with their halo into a zero-padded buffer ((rows + 2P) x (W + 2P) x C per image segment),
// normalised on the way when `mean` is given (x -> xhat), copied as they are otherwise (dy): every tap reads it.
template <int K>
struct Padded {
  static constexpr int P = K / 2;
  std::vector<float> data;
  std::vector<Segment> segments;
  int64_t row = 0;  // floats per padded row

  void fill(const Shape& s, int64_t r0, int64_t r1, const float* src, const float* mean, const float* invstd) {
    const int64_t C = s.C, W = s.W;
    row = (W + 2 * P) * C;
    segments.clear();
    int64_t rows = 0;
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / s.H, h0 = r % s.H, h1 = std::min(s.H, h0 + (r1 - r));
      segments.push_back({n, h0, h1, nullptr});
      rows += h1 - h0 + 2 * P;
      r += h1 - h0;
    }
    if (int64_t(data.size()) < rows * row) data.resize(rows * row);
    float* p = data.data();
    for (Segment& g : segments) {
      g.base = p;
      for (int64_t q = g.h0 - P; q < g.h1 + P; ++q, p += row) {
        if (q < 0 || q >= s.H) {
          std::fill(p, p + row, 0.f);
          continue;
        }
        std::fill(p, p + P * C, 0.f);
        std::fill(p + (W + P) * C, p + row, 0.f);
        const float* in = src + (g.n * s.H + q) * W * C;
        float* out = p + P * C;
        if (mean == nullptr) {
          std::copy(in, in + W * C, out);
          continue;
        }
        for (int64_t w = 0; w < W; ++w) {
          const float* __restrict__ a = in + w * C;
          float* __restrict__ b = out + w * C;
          for (int64_t c = 0; c < C; ++c) b[c] = (a[c] - mean[c]) * invstd[c];
        }
      }
    }
  }
};

// Runs body(task, r0, r1, padded) for every task, each thread with its own buffer.
template <int K, class Body>
void for_each_task_cl(const Shape& s, const float* src, const float* mean, const float* invstd, Body body) {
  const Tasks t = row_tasks(s, K);
  at::parallel_for(0, t.count, 1, [&](int64_t begin, int64_t end) {
    Padded<K> padded;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r0 = task * t.rows, r1 = std::min(s.N * s.H, r0 + t.rows);
      padded.fill(s, r0, r1, src, mean, invstd);
      body(task, r0, r1, padded);
    }
  });
}

// Vector types: `vec` holds VL channels (GCC/Clang vector extension: kept in registers, FMA where the CPU has it),
// `float` the channels left over; loads and stores are unaligned.
typedef float vec __attribute__((vector_size(VL * sizeof(float))));

template <class T>
inline T load(const float* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <class T>
inline void store(float* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

template <class T>
inline void add_to(double* p, T v) {
  float f[sizeof(T) / sizeof(float)];
  std::memcpy(f, &v, sizeof(T));
  for (size_t i = 0; i < sizeof(T) / sizeof(float); ++i) p[i] += f[i];
}

// Channels c0 .. c0 + |T| - 1 of y[position] = bias + sum_taps wt[tap] * xhat[position + tap] over a task's rows,
// the weights held in registers. wt: (K*K, C).
template <int K, class T>
inline void forward_block_cl(const Padded<K>& in, const float* __restrict__ wt, const float* __restrict__ bias,
                             float* __restrict__ y, const Shape& s, int64_t c0) {
  const int64_t C = s.C, W = s.W;
  T wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = load<T>(wt + t * C + c0);
  const T bv = load<T>(bias + c0);
  for (const Segment& g : in.segments)
    for (int64_t h = g.h0; h < g.h1; ++h) {
      const float* rows = g.base + (h - g.h0) * in.row + c0;
      float* out = y + ((g.n * s.H + h) * W) * C + c0;
      for (int64_t w = 0; w < W; ++w) {
        T acc = bv;
        for (int i = 0; i < K; ++i) {
          const float* p = rows + i * in.row + w * C;
          for (int j = 0; j < K; ++j) acc += wv[i * K + j] * load<T>(p + j * C);
        }
        store(out + w * C, acc);
      }
    }
}

template <int K>
void forward_cl(const float* x, float* y, const Shape& s, const float* mean, const float* invstd, const float* wt,
                const float* bias) {
  for_each_task_cl<K>(s, x, mean, invstd, [&](int64_t, int64_t, int64_t, const Padded<K>& padded) {
    int64_t c0 = 0;
    for (; c0 + VL <= s.C; c0 += VL) forward_block_cl<K, vec>(padded, wt, bias, y, s, c0);
    for (; c0 < s.C; ++c0) forward_block_cl<K, float>(padded, wt, bias, y, s, c0);
  });
}

constexpr int64_t FLUSH = 256;  // positions summed in float before the sums go to the task's double slot

// A task's db, dW[t] (sum dy * xhat shifted by tap t) and S[t] (sum dy where tap t sees the map) for channels
// c0 .. c0 + |T| - 1, into its slot [1 + 2KK][C] (double).
template <int K, class T>
inline void sums_block_cl(const Padded<K>& xhat, const float* __restrict__ dy, double* __restrict__ slot,
                          const Shape& s, int64_t c0) {
  constexpr int P = K / 2, KK = K * K;
  const int64_t C = s.C, W = s.W;
  T acc[KK], sums[KK], tot = T{};
  for (int t = 0; t < KK; ++t) acc[t] = sums[t] = T{};
  int64_t since = 0;
  auto flush = [&]() {
    add_to(slot + c0, tot);
    tot = T{};
    for (int t = 0; t < KK; ++t) {
      add_to(slot + (1 + t) * C + c0, acc[t]);
      add_to(slot + (1 + KK + t) * C + c0, sums[t]);
      acc[t] = sums[t] = T{};
    }
    since = 0;
  };
  for (const Segment& g : xhat.segments)
    for (int64_t h = g.h0; h < g.h1; ++h) {
      const float* rows = g.base + (h - g.h0) * xhat.row + c0;
      const float* d = dy + ((g.n * s.H + h) * W) * C + c0;
      T rowsum = T{};
      for (int64_t w = 0; w < W; ++w) {
        const T dv = load<T>(d + w * C);
        rowsum += dv;
        for (int i = 0; i < K; ++i) {
          const float* p = rows + i * xhat.row + w * C;
          for (int j = 0; j < K; ++j) acc[i * K + j] += dv * load<T>(p + j * C);
        }
      }
      tot += rowsum;
      for (int j = 0; j < K; ++j) {  // the columns tap j never sees: the last dj (dj > 0) or the first -dj
        const int64_t dj = j - P;
        const int64_t lo = dj > 0 ? std::max<int64_t>(0, W - dj) : 0;
        const int64_t hi = dj > 0 ? W : std::min<int64_t>(W, -dj);
        T col = rowsum;
        for (int64_t w = lo; w < hi; ++w) col -= load<T>(d + w * C);
        for (int i = 0; i < K; ++i) {
          const int64_t r = h + i - P;
          if (r >= 0 && r < s.H) sums[i * K + j] += col;
        }
      }
      since += W;
      if (since >= FLUSH) flush();
    }
  flush();
}

template <int K>
void sums_cl(const float* dy, const float* x, const Shape& s, const float* mean, const float* invstd,
             std::vector<double>& part, int64_t width) {
  for_each_task_cl<K>(s, x, mean, invstd, [&](int64_t task, int64_t, int64_t, const Padded<K>& xhat) {
    double* slot = part.data() + task * width;
    int64_t c0 = 0;
    for (; c0 + VL <= s.C; c0 += VL) sums_block_cl<K, vec>(xhat, dy, slot, s, c0);
    for (; c0 < s.C; ++c0) sums_block_cl<K, float>(xhat, dy, slot, s, c0);
  });
}

// dx = invstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = sum_taps wflip[tap] * dy[position + tap]
template <int K, class T>
inline void dx_block_cl(const Padded<K>& dyp, const float* __restrict__ x, float* __restrict__ dx,
                        const float* __restrict__ wflip, const float* __restrict__ mean,
                        const float* __restrict__ invstd, const float* __restrict__ mdx,
                        const float* __restrict__ mdxx, const Shape& s, int64_t c0) {
  const int64_t C = s.C, W = s.W;
  T wv[K * K];
  for (int t = 0; t < K * K; ++t) wv[t] = load<T>(wflip + t * C + c0);
  const T m = load<T>(mean + c0), is = load<T>(invstd + c0), a = load<T>(mdx + c0), b = load<T>(mdxx + c0);
  for (const Segment& g : dyp.segments)
    for (int64_t h = g.h0; h < g.h1; ++h) {
      const float* rows = g.base + (h - g.h0) * dyp.row + c0;
      const int64_t at = ((g.n * s.H + h) * W) * C + c0;
      for (int64_t w = 0; w < W; ++w) {
        T acc = T{};
        for (int i = 0; i < K; ++i) {
          const float* p = rows + i * dyp.row + w * C;
          for (int j = 0; j < K; ++j) acc += wv[i * K + j] * load<T>(p + j * C);
        }
        const T xhat = (load<T>(x + at + w * C) - m) * is;
        store(dx + at + w * C, is * (acc - a - xhat * b));
      }
    }
}

template <int K>
void dx_cl(const float* dy, const float* x, float* dx, const Shape& s, const float* mean, const float* invstd,
           const float* wflip, const float* mdx, const float* mdxx) {
  for_each_task_cl<K>(s, dy, nullptr, nullptr, [&](int64_t, int64_t, int64_t, const Padded<K>& dyp) {
    int64_t c0 = 0;
    for (; c0 + VL <= s.C; c0 += VL) dx_block_cl<K, vec>(dyp, x, dx, wflip, mean, invstd, mdx, mdxx, s, c0);
    for (; c0 < s.C; ++c0) dx_block_cl<K, float>(dyp, x, dx, wflip, mean, invstd, mdx, mdxx, s, c0);
  });
}

// k = 1 (BN itself, and a 1x1 map's centre tap): no neighbourhood, so no padded copy; x̂ is formed in registers.
template <class F>
void for_each_position_task(const Shape& s, F f) {
  const Tasks t = row_tasks(s, 1);
  at::parallel_for(0, t.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      f(task, task * t.rows * s.W, std::min(s.N * s.H, (task + 1) * t.rows) * s.W);
  });
}

template <class T>
inline void forward_block_1(const float* __restrict__ x, float* __restrict__ y, const float* mean,
                            const float* invstd, const float* wt, const float* bias, int64_t C, int64_t first,
                            int64_t last, int64_t c0) {
  const T m = load<T>(mean + c0), is = load<T>(invstd + c0), w = load<T>(wt + c0), b = load<T>(bias + c0);
  for (int64_t q = first; q < last; ++q) store(y + q * C + c0, b + w * ((load<T>(x + q * C + c0) - m) * is));
}

void forward_cl1(const float* x, float* y, const Shape& s, const float* mean, const float* invstd, const float* wt,
                 const float* bias) {
  for_each_position_task(s, [&](int64_t, int64_t first, int64_t last) {
    int64_t c0 = 0;
    for (; c0 + VL <= s.C; c0 += VL) forward_block_1<vec>(x, y, mean, invstd, wt, bias, s.C, first, last, c0);
    for (; c0 < s.C; ++c0) forward_block_1<float>(x, y, mean, invstd, wt, bias, s.C, first, last, c0);
  });
}

// slot [3][C]: db, dW = Σ dy·x̂, S = db (the one tap sees every position)
template <class T>
inline void sums_block_1(const float* __restrict__ dy, const float* __restrict__ x, const float* mean,
                         const float* invstd, double* __restrict__ slot, int64_t C, int64_t first, int64_t last,
                         int64_t c0) {
  const T m = load<T>(mean + c0), is = load<T>(invstd + c0);
  for (int64_t q0 = first; q0 < last; q0 += FLUSH) {
    T db = T{}, dw = T{};
    for (int64_t q = q0; q < std::min(last, q0 + FLUSH); ++q) {
      const T d = load<T>(dy + q * C + c0);
      db += d;
      dw += d * ((load<T>(x + q * C + c0) - m) * is);
    }
    add_to(slot + c0, db);
    add_to(slot + C + c0, dw);
    add_to(slot + 2 * C + c0, db);
  }
}

void sums_cl1(const float* dy, const float* x, const Shape& s, const float* mean, const float* invstd,
              std::vector<double>& part) {
  for_each_position_task(s, [&](int64_t task, int64_t first, int64_t last) {
    double* slot = part.data() + task * 3 * s.C;
    int64_t c0 = 0;
    for (; c0 + VL <= s.C; c0 += VL) sums_block_1<vec>(dy, x, mean, invstd, slot, s.C, first, last, c0);
    for (; c0 < s.C; ++c0) sums_block_1<float>(dy, x, mean, invstd, slot, s.C, first, last, c0);
  });
}

template <class T>
inline void dx_block_1(const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
                       const float* wt, const float* mean, const float* invstd, const float* mdx, const float* mdxx,
                       int64_t C, int64_t first, int64_t last, int64_t c0) {
  const T w = load<T>(wt + c0), m = load<T>(mean + c0), is = load<T>(invstd + c0), a = load<T>(mdx + c0),
          b = load<T>(mdxx + c0);
  for (int64_t q = first; q < last; ++q) {
    const T xhat = (load<T>(x + q * C + c0) - m) * is;
    store(dx + q * C + c0, is * (w * load<T>(dy + q * C + c0) - a - xhat * b));
  }
}

void dx_cl1(const float* dy, const float* x, float* dx, const Shape& s, const float* mean, const float* invstd,
            const float* wt, const float* mdx, const float* mdxx) {
  for_each_position_task(s, [&](int64_t, int64_t first, int64_t last) {
    int64_t c0 = 0;
    for (; c0 + VL <= s.C; c0 += VL) dx_block_1<vec>(dy, x, dx, wt, mean, invstd, mdx, mdxx, s.C, first, last, c0);
    for (; c0 < s.C; ++c0) dx_block_1<float>(dy, x, dx, wt, mean, invstd, mdx, mdxx, s.C, first, last, c0);
  });
}

// Statistics: per task, per channel, sums of (x - shift) and its square, accumulated in double (this pass reads x
// once and is bound by memory, not by the wider arithmetic).
template <int V>
inline void stats_block_cl(const float* __restrict__ x, const float* __restrict__ shift, double* __restrict__ slot,
                           int64_t C, int64_t first, int64_t last, int64_t c0) {
  double a1[V] = {}, a2[V] = {};
  float sh[V];
  for (int v = 0; v < V; ++v) sh[v] = shift[c0 + v];
  for (int64_t q = first; q < last; ++q) {
    const float* __restrict__ in = x + q * C + c0;
    for (int v = 0; v < V; ++v) {
      const double d = double(in[v] - sh[v]);
      a1[v] += d;
      a2[v] += d * d;
    }
  }
  for (int v = 0; v < V; ++v) {
    slot[c0 + v] += a1[v];
    slot[C + c0 + v] += a2[v];
  }
}

void stats_cl(const float* x, const Shape& s, const float* shift, std::vector<double>& part) {
  const Tasks t = row_tasks(s, 1);
  at::parallel_for(0, t.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first = task * t.rows * s.W, last = std::min(s.N * s.H, (task + 1) * t.rows) * s.W;
      double* slot = part.data() + task * 2 * s.C;
      int64_t c0 = 0;
      for (; c0 + VL <= s.C; c0 += VL) stats_block_cl<VL>(x, shift, slot, s.C, first, last, c0);
      for (; c0 < s.C; ++c0) stats_block_cl<1>(x, shift, slot, s.C, first, last, c0);
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// contiguous (NCHW): x[n][c][h][w], one task per (n, c) plane, vectorised over columns
// ------------------------------------------------------------------------------------------------------------

template <int K, class Body>
void for_each_plane(const Shape& s, const float* src, const float* mean, const float* invstd, Body body) {
  constexpr int P = K / 2;
  const int64_t row = s.W + 2 * P;
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ring(K * row, 0.f);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % s.C;
      const float* in = src + plane * s.H * s.W;
      const float m = mean ? mean[c] : 0.f, is = invstd ? invstd[c] : 1.f;
      auto load = [&](int64_t r) {
        float* __restrict__ out = ring.data() + ((r + P) % K) * row + P;
        if (r < 0 || r >= s.H) {
          std::fill(out, out + s.W, 0.f);
        } else if (mean == nullptr) {
          std::copy(in + r * s.W, in + (r + 1) * s.W, out);
        } else {
          const float* __restrict__ a = in + r * s.W;
          for (int64_t w = 0; w < s.W; ++w) out[w] = (a[w] - m) * is;
        }
      };
      for (int64_t r = -P; r < P; ++r) load(r);
      auto rows = [&](int64_t h, const float** rp) {
        load(h + P);
        for (int i = 0; i < K; ++i) rp[i] = ring.data() + ((h + i) % K) * row;
      };
      body(plane, c, rows);
    }
  });
}

// weight: (C, K*K)
template <int K>
void forward_nchw(const float* x, float* y, const Shape& s, const float* mean, const float* invstd,
                  const float* weight, const float* bias) {
  for_each_plane<K>(s, x, mean, invstd, [&](int64_t plane, int64_t c, auto& rows) {
    const float* rp[K];
    const float* wk = weight + c * K * K;
    for (int64_t h = 0; h < s.H; ++h) {
      rows(h, rp);
      float* __restrict__ out = y + (plane * s.H + h) * s.W;
      std::fill(out, out + s.W, bias[c]);
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          const float wt = wk[i * K + j];
          const float* __restrict__ in = rp[i] + j;
          for (int64_t w = 0; w < s.W; ++w) out[w] += wt * in[w];
        }
    }
  });
}

template <int K>
void sums_nchw(const float* dy, const float* x, const Shape& s, const float* mean, const float* invstd,
               std::vector<double>& part, int64_t width) {
  constexpr int P = K / 2;
  for_each_plane<K>(s, x, mean, invstd, [&](int64_t plane, int64_t, auto& rows) {
    const float* rp[K];
    double* slot = part.data() + plane * width;  // db, dW[KK], S[KK]
    for (int64_t h = 0; h < s.H; ++h) {
      rows(h, rp);
      const float* __restrict__ d = dy + (plane * s.H + h) * s.W;
      float tot = 0.f;
#pragma omp simd reduction(+ : tot)
      for (int64_t w = 0; w < s.W; ++w) tot += d[w];
      slot[0] += tot;
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          const float* __restrict__ in = rp[i] + j;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t w = 0; w < s.W; ++w) acc += d[w] * in[w];
          slot[1 + i * K + j] += acc;
        }
      for (int j = 0; j < K; ++j) {
        const int64_t dj = j - P;
        const int64_t lo = dj > 0 ? std::max<int64_t>(0, s.W - dj) : 0;
        const int64_t hi = dj > 0 ? s.W : std::min<int64_t>(s.W, -dj);
        float col = tot;
        for (int64_t w = lo; w < hi; ++w) col -= d[w];
        for (int i = 0; i < K; ++i) {
          const int64_t r = h + i - P;
          if (r >= 0 && r < s.H) slot[1 + K * K + i * K + j] += col;
        }
      }
    }
  });
}

template <int K>
void dx_nchw(const float* dy, const float* x, float* dx, const Shape& s, const float* mean, const float* invstd,
             const float* wflip, const float* mdx, const float* mdxx) {
  for_each_plane<K>(s, dy, nullptr, nullptr, [&](int64_t plane, int64_t c, auto& rows) {
    const float* rp[K];
    const float* wk = wflip + c * K * K;
    const float m = mean[c], is = invstd[c], a = mdx[c], b = mdxx[c];
    std::vector<float> acc(s.W);
    for (int64_t h = 0; h < s.H; ++h) {
      rows(h, rp);
      float* __restrict__ sum = acc.data();
      std::fill(sum, sum + s.W, 0.f);
      for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
          const float wt = wk[i * K + j];
          const float* __restrict__ in = rp[i] + j;
          for (int64_t w = 0; w < s.W; ++w) sum[w] += wt * in[w];
        }
      const float* __restrict__ xr = x + (plane * s.H + h) * s.W;
      float* __restrict__ out = dx + (plane * s.H + h) * s.W;
      for (int64_t w = 0; w < s.W; ++w) out[w] = is * (sum[w] - a - (xr[w] - m) * is * b);
    }
  });
}

void stats_nchw(const float* x, const Shape& s, const float* shift, std::vector<double>& part) {
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const float m = shift[plane % s.C];
      double p1 = 0, p2 = 0;  // in double, as the channels_last statistics
      const float* __restrict__ in = x + plane * s.H * s.W;
#pragma omp simd reduction(+ : p1, p2)
      for (int64_t q = 0; q < s.H * s.W; ++q) {
        const double d = double(in[q] - m);
        p1 += d;
        p2 += d * d;
      }
      part[plane * 2] = p1;
      part[plane * 2 + 1] = p2;
    }
  });
}

// ------------------------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------------------------

// The layout a map is computed in: channels_last when x is that (1x1 maps are both), else contiguous (NCHW).
bool channels_last(const Tensor& x) { return x.is_contiguous(at::MemoryFormat::ChannelsLast); }

at::MemoryFormat format_of(bool cl) { return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }

void check(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "bnet_cpu: a 4-D float32 CPU tensor is needed, got ", x.scalar_type(), " ", x.sizes());
  const int64_t k = weight.size(-1);
  TORCH_CHECK(k == 1 || k == 3 || k == 5 || k == 7, "bnet_cpu: kernel sizes 1, 3, 5, 7 are compiled, got ", k);
}

template <class F>
void with_k(int64_t k, F f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    default: f(std::integral_constant<int, 7>()); break;
  }
}

// total[i] = the sum over slots t, in slot order, of part[t * len + i]: deterministic, parallel over i
std::vector<double> combine(const std::vector<double>& part, int64_t slots, int64_t len) {
  std::vector<double> total(len, 0.0);
  at::parallel_for(0, len, 512, [&](int64_t begin, int64_t end) {
    double* __restrict__ out = total.data();
    for (int64_t t = 0; t < slots; ++t) {
      const double* __restrict__ in = part.data() + t * len;
      for (int64_t i = begin; i < end; ++i) out[i] += in[i];
    }
  });
  return total;
}

// (K*K, C) from (C, 1, K, K), flipped (the transposed conv's taps) when asked
Tensor taps(const Tensor& weight, bool flip, bool cl) {
  Tensor w = flip ? weight.flip({2, 3}) : weight;
  w = w.reshape({weight.size(0), -1});
  return (cl ? w.t() : w).contiguous();
}

// Per-channel mean and invstd of x (batch statistics, biased variance), and the running statistics updated as
// torch's BatchNorm updates them (unbiased variance; `factor` is the momentum, or 1 / batches for momentum None).
std::vector<Tensor> statistics(const Tensor& x, bool cl, const c10::optional<Tensor>& running_mean,
                               const c10::optional<Tensor>& running_var, double factor, double eps) {
  const Shape s = shape_of(x);
  const int64_t C = s.C;
  Tensor shift = x.select(0, 0).select(1, 0).select(1, 0).contiguous();  // x[0, :, 0, 0]: the sums are shifted
  std::vector<double> part, total;  // channels_last: [task][2][C]; contiguous: [n][C][2]
  if (cl) {
    const int64_t tasks = row_tasks(s, 1).count;
    part.assign(tasks * 2 * C, 0.0);
    stats_cl(x.data_ptr<float>(), s, shift.data_ptr<float>(), part);
    total = combine(part, tasks, 2 * C);
  } else {
    part.assign(s.N * C * 2, 0.0);
    stats_nchw(x.data_ptr<float>(), s, shift.data_ptr<float>(), part);
    total = combine(part, s.N, 2 * C);
  }
  const double count = double(s.N) * s.H * s.W;
  Tensor mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  float* pm = mean.data_ptr<float>();
  float* pi = invstd.data_ptr<float>();
  const float* sh = shift.data_ptr<float>();
  float* rm = running_mean ? running_mean->data_ptr<float>() : nullptr;
  float* rv = running_var ? running_var->data_ptr<float>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    const double s1 = cl ? total[c] : total[2 * c], s2 = cl ? total[C + c] : total[2 * c + 1];
    const double d = s1 / count, var = std::max(s2 / count - d * d, 0.0);
    pm[c] = float(sh[c] + d);
    pi[c] = float(1.0 / std::sqrt(var + eps));
    if (rm) rm[c] = float(factor * pm[c] + (1.0 - factor) * rm[c]);
    if (rv) rv[c] = float(factor * var * count / (count - 1) + (1.0 - factor) * rv[c]);
  }
  return {mean, invstd};
}

Tensor conv(const Tensor& x, bool cl, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
            const Tensor& bias) {
  const Shape s = shape_of(x);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
  Tensor w = taps(weight, false, cl), b = bias.contiguous();
  with_k(weight.size(-1), [&](auto k) {
    constexpr int K = decltype(k)::value;
    auto* run = !cl ? forward_nchw<K> : K == 1 ? forward_cl1 : forward_cl<K>;
    run(x.data_ptr<float>(), y.data_ptr<float>(), s, mean.data_ptr<float>(), invstd.data_ptr<float>(),
        w.data_ptr<float>(), b.data_ptr<float>());
  });
  return y;
}

// training forward: (y, mean, invstd), x in its own memory format (neither: made contiguous by the caller)
// The taps that can see the map: a tap further than the map's extent from the centre only ever reads padding, so
// a k x k kernel on a map of at most (k + 1) / 2 rows and columns computes as its central k' x k' part
// (k' = 2 max(H, W) - 1; a 1x1 map: the centre tap alone, as a BatchNorm).
Tensor seen_taps(const Tensor& x, const Tensor& weight) {
  const int64_t k = weight.size(-1), seen = std::min<int64_t>(k, 2 * std::max(x.size(2), x.size(3)) - 1);
  if (seen == k) return weight;
  const int64_t lo = (k - seen) / 2;
  return weight.slice(2, lo, lo + seen).slice(3, lo, lo + seen).contiguous();
}

std::vector<Tensor> forward_train(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                                  double factor, double eps) {
  check(x, weight);
  const bool cl = channels_last(x);
  auto stats = statistics(x, cl, running_mean, running_var, factor, eps);
  return {conv(x, cl, stats[0], stats[1], seen_taps(x, weight), bias), stats[0], stats[1]};
}

Tensor forward_eval(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& weight,
                    const Tensor& bias) {
  check(x, weight);
  return conv(x, channels_last(x), mean.contiguous(), invstd.contiguous(), seen_taps(x, weight), bias);
}

// (dx or an undefined tensor, dweight, dbias) of a training-mode BNET2d
std::vector<Tensor> backward_taps(const Tensor& dy_in, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                                  const Tensor& weight, bool need_dx);

std::vector<Tensor> grads_of(const Tensor& dy_in, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                             const Tensor& weight, bool need_dx) {
  check(x, weight);
  const Tensor seen = seen_taps(x, weight);
  auto grads = backward_taps(dy_in, x, mean, invstd, seen, need_dx);
  if (seen.size(-1) != weight.size(-1)) {  // the taps that never see the map have no gradient
    const int64_t k = weight.size(-1), lo = (k - seen.size(-1)) / 2;
    Tensor full = at::zeros_like(weight);
    full.slice(2, lo, lo + seen.size(-1)).slice(3, lo, lo + seen.size(-1)).copy_(grads[1]);
    grads[1] = full;
  }
  return grads;
}

std::vector<Tensor> backward_taps(const Tensor& dy_in, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                                  const Tensor& weight, bool need_dx) {
  const bool cl = channels_last(x);
  const Tensor dy = dy_in.contiguous(format_of(cl));
  const Shape s = shape_of(x);
  const int64_t C = s.C, k = weight.size(-1), KK = k * k, width = 1 + 2 * KK;
  const float* pm = mean.data_ptr<float>();
  const float* pi = invstd.data_ptr<float>();
  std::vector<double> part, total;  // channels_last: [task][1 + 2KK][C]; contiguous: [n][C][1 + 2KK]
  with_k(k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    if (cl && K == 1) {
      const int64_t tasks = row_tasks(s, 1).count;
      part.assign(tasks * 3 * C, 0.0);
      sums_cl1(dy.data_ptr<float>(), x.data_ptr<float>(), s, pm, pi, part);
      total = combine(part, tasks, 3 * C);
    } else if (cl) {
      const int64_t tasks = row_tasks(s, K).count;
      part.assign(tasks * width * C, 0.0);
      sums_cl<K>(dy.data_ptr<float>(), x.data_ptr<float>(), s, pm, pi, part, width * C);
      total = combine(part, tasks, width * C);
    } else {
      part.assign(s.N * C * width, 0.0);
      sums_nchw<K>(dy.data_ptr<float>(), x.data_ptr<float>(), s, pm, pi, part, width);
      total = combine(part, s.N, width * C);
    }
  });
  // db, dW[t], S[t] of channel c
  auto at = [&](int64_t q, int64_t c) { return cl ? total[q * C + c] : total[c * width + q]; };
  Tensor dweight = at::empty({C, 1, k, k}, weight.options());
  Tensor dbias = at::empty({C}, weight.options());
  Tensor mdx = at::empty({C}, x.options()), mdxx = at::empty({C}, x.options());
  const float* pw = weight.contiguous().data_ptr<float>();  // (C, KK)
  const double count = double(s.N) * s.H * s.W;
  for (int64_t c = 0; c < C; ++c) {
    double sdx = 0, sdxx = 0;
    for (int64_t t = 0; t < KK; ++t) {
      const double dw = at(1 + t, c);
      dweight.data_ptr<float>()[c * KK + t] = float(dw);
      sdxx += pw[c * KK + t] * dw;
      sdx += pw[c * KK + t] * at(1 + KK + t, c);
    }
    dbias.data_ptr<float>()[c] = float(at(0, c));
    mdx.data_ptr<float>()[c] = float(sdx / count);
    mdxx.data_ptr<float>()[c] = float(sdxx / count);
  }
  Tensor dx;
  if (need_dx) {
    dx = at::empty(x.sizes(), x.options().memory_format(format_of(cl)));
    Tensor wf = taps(weight, true, cl);
    with_k(k, [&](auto kc) {
      constexpr int K = decltype(kc)::value;
      auto* run = !cl ? dx_nchw<K> : K == 1 ? dx_cl1 : dx_cl<K>;
      run(dy.data_ptr<float>(), x.data_ptr<float>(), dx.data_ptr<float>(), s, pm, pi, wf.data_ptr<float>(),
          mdx.data_ptr<float>(), mdxx.data_ptr<float>());
    });
  }
  return {dx, dweight, dbias};
}

// The training step as an autograd function in C++ (no Python in the forward's bookkeeping or in the backward):
// saves x (in the layout computed) and the two per-channel vectors. `update`: whether the running statistics
// (always passed, for autograd's argument list) are updated.
struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const Tensor& bias, const Tensor& running_mean, const Tensor& running_var, bool update,
                        double factor, double eps, const std::string& layer) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto out = forward_train(x, weight, bias, update ? c10::optional<Tensor>(running_mean) : c10::nullopt,
                             update ? c10::optional<Tensor>(running_var) : c10::nullopt, factor, eps);
    ctx->save_for_backward({x, out[1], out[2], weight});
    ctx->saved_data["layer"] = layer;
    return out[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), ctx->saved_data["layer"].toStringRef(),
                ": BNET's C++ backward is not differentiable twice (create_graph=True): use impl='torch' "
                "(`bnet_fastai.nn.layers.set_impl(model, 'torch')`)");
    auto saved = ctx->get_saved_variables();
    const bool need_dx = ctx->needs_input_grad(0);
    auto g = grads_of(grads[0], saved[0], saved[1], saved[2], saved[3], need_dx);
    return {need_dx ? g[0] : Tensor(), g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor train(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& running_mean,
             const Tensor& running_var, bool update, double factor, double eps, const std::string& layer) {
  TORCH_CHECK_VALUE(x.numel() / x.size(1) > 1, "Expected more than 1 value per channel when training, got input size ",
              x.sizes());
  return TrainFunction::apply(x, weight, bias, running_mean, running_var, update, factor, eps, layer);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_eval", &forward_eval, "BNET2d forward with given statistics (eval)");
  m.def("train", &train, "BNET2d training step with batch statistics, differentiable (autograd in C++)");
}
