// The DNC on the CPU as native kernels, forward and backward, built and wrapped in
// memctl/models/dnc/native.py:
// - dnc_access_forward / dnc_access_backward: one memory access with one write head, the
//   maths of addressing.py step by step in the order of MemoryAccess.step, as loops over
//   N slots on W batch elements at once, one in each lane of a vector (see Lanes and
//   Group; two calls instead of about four hundred small tensor ops a step);
// - dnc_sequence_forward / dnc_sequence_backward: a whole sequence of a DNC with one LSTM
//   controller stack (Controller.step without layer norm or dropout, the output clip, the
//   interface layer, that memory access), the time loop inside: one call forward and one
//   backward a sequence. The matrix products are ATen's.
//
// Shapes: B batch, N slots, M word size, R read heads; I = (R + 3) M + 5 R + 3 interface
// numbers, laid out as MemoryAccess.sizes: read keys R x M, write key M, write vector M
// (identity); read strengths R, write strength 1 (oneplus); erase M, free gates R,
// allocation gate 1, write gate 1 (sigmoid); read modes R x 3 (softmax over backward,
// forward, content).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <torch/library.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

constexpr double kEpsilon = 1e-6;  // addressing.EPSILON
constexpr double kSoftplusThreshold = 20;  // torch.nn.functional.softplus's default

// A batch of W elements in the lanes of one 32-byte vector register (W = 8 float or 4
// double): the access runs on W batch elements at once, each number of one element's
// maths a lane, so that its many short loops over slots and words are vector
// instructions with no horizontal sums (GCC's and Clang's vector extensions; elementwise
// arithmetic only). W = 1 is one element at a time, a plain number: there the compiler
// vectorises the loops along the rows, which is as good where rows are long (large N).
typedef float Float8 __attribute__((vector_size(32)));
typedef double Double4 __attribute__((vector_size(32)));

template <typename T, int W>
struct Lanes {
  static_assert(W == 1 || W * sizeof(T) == 32, "one number or one 32-byte vector");
  using Scalar = T;
  static constexpr int width = W;
  using Vector =
      std::conditional_t<W == 1, T, std::conditional_t<std::is_same_v<T, float>, Float8, Double4>>;
  Vector v;
  Lanes() = default;
  Lanes(T x) : v(Vector{} + x) {}  // every lane x
  template <typename U>
    requires(W > 1 && std::is_same_v<U, Vector>)
  Lanes(U x) : v(x) {}
  T& operator[](int lane) {
    if constexpr (W == 1) {
      return v;
    } else {
      return v[lane];
    }
  }
  T operator[](int lane) const { return const_cast<Lanes&>(*this)[lane]; }
  friend Lanes operator+(Lanes a, Lanes b) { return a.v + b.v; }
  friend Lanes operator-(Lanes a, Lanes b) { return a.v - b.v; }
  friend Lanes operator*(Lanes a, Lanes b) { return a.v * b.v; }
  friend Lanes operator/(Lanes a, Lanes b) { return a.v / b.v; }
  Lanes operator-() const { return -v; }
  Lanes& operator+=(Lanes b) { return v += b.v, *this; }
  Lanes& operator-=(Lanes b) { return v -= b.v, *this; }
  Lanes& operator*=(Lanes b) { return v *= b.v, *this; }
  Lanes& operator/=(Lanes b) { return v /= b.v, *this; }
  friend Lanes max(Lanes a, Lanes b) { return a.v > b.v ? a.v : b.v; }
  friend Lanes sqrt(Lanes a) {
    for (int k = 0; k < W; ++k) a[k] = std::sqrt(a[k]);  // -fno-math-errno: one sqrt
    return a;
  }
  friend Lanes exp(Lanes a) {
    if constexpr (W == 1) {
      return std::exp(a.v);
    } else {
      return lanes_exp(a);
    }
  }
};

// The lanes of a 32-byte vector for T.
template <typename T>
using Wide = Lanes<T, 32 / sizeof(T)>;

// exp in every lane: double by the C library lane by lane; float by a vectorised
// Cephes-style expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial in r, 2^n from
// the exponent bits), within 2 ulp of expf on [-87.3, 88.7]; below -87.3 it gives the
// smallest normal float instead of a denormal or 0 (the softmaxes' smallest terms).
inline Wide<double> lanes_exp(Wide<double> a) {
  for (int k = 0; k < Wide<double>::width; ++k) a[k] = std::exp(a[k]);
  return a;
}

inline Wide<float> lanes_exp(Wide<float> a) {
  using V = Wide<float>::Vector;
  using I = int32_t __attribute__((vector_size(32)));
  V x = a.v;
  x = x < -87.33654f ? V{} - 87.33654f : x;
  x = x > 88.72283f ? V{} + 88.72283f : x;
  const V shift = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + shift) - shift;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I exponent = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

// A vector from or to unaligned memory (with AVX, one instruction: the compiler's own
// choice for a 32-byte copy may be two halves, which the transpose then reads back whole
// through the stack).
template <typename T>
inline typename Wide<T>::Vector load(const T* from) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    return (Float8)_mm256_loadu_ps(from);
  } else {
    return (Double4)_mm256_loadu_pd(from);
  }
#else
  typename Wide<T>::Vector out;
  std::memcpy(&out, from, sizeof(out));
  return out;
#endif
}

template <typename T>
inline void store(T* to, typename Wide<T>::Vector vector) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(to, (__m256)vector);
  } else {
    _mm256_storeu_pd(to, (__m256d)vector);
  }
#else
  std::memcpy(to, &vector, sizeof(vector));
#endif
}

// Square blocks of lanes transposed: in[e][k] -> out[k][e] (W x W numbers). With AVX, in
// registers; without, number by number.
inline void transpose(Float8* rows) {
#if defined(__AVX__)
  __m256 r[8], t[8];
  for (int e = 0; e < 8; ++e) r[e] = (__m256)rows[e];
  for (int e = 0; e < 8; e += 2) {
    t[e] = _mm256_unpacklo_ps(r[e], r[e + 1]);
    t[e + 1] = _mm256_unpackhi_ps(r[e], r[e + 1]);
  }
  for (int e = 0; e < 8; e += 4) {
    r[e] = _mm256_shuffle_ps(t[e], t[e + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[e + 1] = _mm256_shuffle_ps(t[e], t[e + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[e + 2] = _mm256_shuffle_ps(t[e + 1], t[e + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[e + 3] = _mm256_shuffle_ps(t[e + 1], t[e + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int e = 0; e < 4; ++e) {
    rows[e] = (Float8)_mm256_permute2f128_ps(r[e], r[e + 4], 0x20);
    rows[e + 4] = (Float8)_mm256_permute2f128_ps(r[e], r[e + 4], 0x31);
  }
#else
  for (int i = 0; i < 8; ++i) {
    for (int j = i + 1; j < 8; ++j) std::swap(rows[i][j], rows[j][i]);
  }
#endif
}

inline void transpose(Double4* rows) {
#if defined(__AVX__)
  __m256d r[4], t[4];
  for (int e = 0; e < 4; ++e) r[e] = (__m256d)rows[e];
  t[0] = _mm256_unpacklo_pd(r[0], r[1]);
  t[1] = _mm256_unpackhi_pd(r[0], r[1]);
  t[2] = _mm256_unpacklo_pd(r[2], r[3]);
  t[3] = _mm256_unpackhi_pd(r[2], r[3]);
  rows[0] = (Double4)_mm256_permute2f128_pd(t[0], t[2], 0x20);
  rows[1] = (Double4)_mm256_permute2f128_pd(t[1], t[3], 0x20);
  rows[2] = (Double4)_mm256_permute2f128_pd(t[0], t[2], 0x31);
  rows[3] = (Double4)_mm256_permute2f128_pd(t[1], t[3], 0x31);
#else
  for (int i = 0; i < 4; ++i) {
    for (int j = i + 1; j < 4; ++j) std::swap(rows[i][j], rows[j][i]);
  }
#endif
}

struct Layout {
  int64_t read_keys, write_key, write_vector, read_strengths, write_strength, erase,
      free_gates, allocation_gate, write_gate, modes, size;
  Layout(int64_t M, int64_t R)
      : read_keys(0),
        write_key(R * M),
        write_vector((R + 1) * M),
        read_strengths((R + 2) * M),
        write_strength(read_strengths + R),
        erase(write_strength + 1),
        free_gates(erase + M),
        allocation_gate(free_gates + R),
        write_gate(allocation_gate + 1),
        modes(write_gate + 1),
        size(modes + 3 * R) {}
};

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// One element's interface activations: identity, oneplus, sigmoid, softmax over each read
// head's three modes.
template <typename T>
void activate(const Layout& layout, int64_t R, const T* raw, T* act) {
  for (int64_t k = 0; k < layout.read_strengths; ++k) act[k] = raw[k];
  for (int64_t k = layout.read_strengths; k < layout.erase; ++k) {
    act[k] = 1 + (raw[k] > kSoftplusThreshold ? raw[k] : std::log1p(std::exp(raw[k])));
  }
  for (int64_t k = layout.erase; k < layout.modes; ++k) act[k] = sigmoid(raw[k]);
  for (int64_t r = 0; r < R; ++r) {
    const T* logits = raw + layout.modes + 3 * r;
    T* modes = act + layout.modes + 3 * r;
    const T largest = std::max({logits[0], logits[1], logits[2]});
    T total = 0;
    for (int k = 0; k < 3; ++k) total += modes[k] = std::exp(logits[k] - largest);
    for (int k = 0; k < 3; ++k) modes[k] /= total;
  }
}

// Their backward: the activated interface's gradient -> the raw interface's.
template <typename T>
void activate_backward(const Layout& layout, int64_t R, const T* raw, const T* act,
                       const T* grad_act, T* g_raw) {
  for (int64_t k = 0; k < layout.read_strengths; ++k) g_raw[k] = grad_act[k];
  for (int64_t k = layout.read_strengths; k < layout.erase; ++k) {
    g_raw[k] = raw[k] > kSoftplusThreshold ? grad_act[k] : grad_act[k] * sigmoid(raw[k]);
  }
  for (int64_t k = layout.erase; k < layout.modes; ++k) g_raw[k] = grad_act[k] * act[k] * (1 - act[k]);
  for (int64_t r = 0; r < R; ++r) {
    const T* pi = act + layout.modes + 3 * r;
    const T* g = grad_act + layout.modes + 3 * r;
    const T mean = pi[0] * g[0] + pi[1] * g[1] + pi[2] * g[2];
    for (int k = 0; k < 3; ++k) g_raw[layout.modes + 3 * r + k] = pi[k] * (g[k] - mean);
  }
}

// A short dot product in independent sums (so that consecutive products do not wait on
// each other), added pairwise at the end: one element's in eight (one vector register once
// the compiler vectorises them), lanes' in four vectors.
template <typename V>
[[gnu::always_inline]] inline V dot(const V* a, const V* b, int64_t width) {
  int64_t j = 0;
  V rest = 0;
  if constexpr (V::width == 1) {
    typename V::Scalar sums[8] = {};
    for (; j + 8 <= width; j += 8) {
      for (int k = 0; k < 8; ++k) sums[k] += a[j + k].v * b[j + k].v;
    }
    for (; j < width; ++j) rest += a[j] * b[j];
    return V(((sums[0] + sums[4]) + (sums[1] + sums[5])) + ((sums[2] + sums[6]) + (sums[3] + sums[7]))) + rest;
  } else {
    V s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (; j + 4 <= width; j += 4) {
      s0 += a[j] * b[j];
      s1 += a[j + 1] * b[j + 1];
      s2 += a[j + 2] * b[j + 2];
      s3 += a[j + 3] * b[j + 3];
    }
    for (; j < width; ++j) rest += a[j] * b[j];
    return ((s0 + s1) + (s2 + s3)) + rest;
  }
}

template <typename V>
[[gnu::always_inline]] inline V inverse_norm(const V* vector, int64_t width) {
  using T = typename V::Scalar;
  return V(1) / sqrt(dot(vector, vector, width) + V(T(kEpsilon)));
}

// out[j] += sum_i coefficients[i] matrix[i, j] for a matrix [rows, width]: four rows at a
// time, so that out is loaded and stored once per four rows rather than once per row.
template <typename V>
[[gnu::always_inline]] inline void add_weighted_rows(V* out, const V* matrix, const V* coefficients,
                                                     int64_t rows, int64_t width) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const V *m0 = matrix + i * width, *m1 = m0 + width, *m2 = m1 + width, *m3 = m2 + width;
    const V c0 = coefficients[i], c1 = coefficients[i + 1], c2 = coefficients[i + 2],
            c3 = coefficients[i + 3];
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      out[j] += (c0 * m0[j] + c1 * m1[j]) + (c2 * m2[j] + c3 * m3[j]);
    }
  }
  for (; i < rows; ++i) {
    const V* m = matrix + i * width;
    const V c = coefficients[i];
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) out[j] += c * m[j];
  }
}

// Content weights: softmax_n(strength * cos(key, memory[n])), the norms as in
// addressing.inverse_norms.
template <typename V>
void content_forward(const V* memory, const V* memory_inverse, const V* key, V strength,
                     int64_t N, int64_t M, V* weights) {
  using T = typename V::Scalar;
  const V scale = strength * inverse_norm(key, M);
  V largest = -std::numeric_limits<T>::infinity();
  for (int64_t n = 0; n < N; ++n) {
    weights[n] = dot(key, memory + n * M, M) * scale * memory_inverse[n];
    largest = max(largest, weights[n]);
  }
  V total = 0;
  for (int64_t n = 0; n < N; ++n) {
    weights[n] = exp(weights[n] - largest);
    total += weights[n];
  }
  for (int64_t n = 0; n < N; ++n) weights[n] /= total;
}

// Adds the content weights' gradients (given grad on the weights) to grad_memory,
// grad_key and grad_strength; grad_dots: work space [N].
template <typename V>
void content_backward(const V* memory, const V* memory_inverse, const V* key, V strength,
                      const V* weights, const V* grad, int64_t N, int64_t M, V* grad_memory,
                      V* grad_key, V* grad_strength, V* grad_dots) {
  const V key_inverse = inverse_norm(key, M);
  const V weighted = dot(weights, grad, N);
  V by_dots = 0;  // sum_n grad_logit[n] dot[n] memory_inverse[n]
  for (int64_t n = 0; n < N; ++n) {
    const V* row = memory + n * M;
    const V grad_logit = weights[n] * (grad[n] - weighted);
    const V d = dot(key, row, M);
    const V grad_dot = grad_logit * strength * key_inverse * memory_inverse[n];
    // d/dv (|v|^2 + eps)^(-1/2) = -(inverse norm)^3 v
    const V grad_norm = grad_dot * d * memory_inverse[n] * memory_inverse[n];
    by_dots += grad_logit * d * memory_inverse[n];
    grad_dots[n] = grad_dot;
    V* grad_row = grad_memory + n * M;
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) grad_row[j] += grad_dot * key[j] - grad_norm * row[j];
  }
  add_weighted_rows(grad_key, memory, grad_dots, N, M);
  *grad_strength += key_inverse * by_dots;
  const V grad_norm = strength * by_dots * key_inverse * key_inverse * key_inverse;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) grad_key[j] -= grad_norm * key[j];
}

// A pointer to one batch element's row: of a tensor [B, ...] (index b), of step t of
// [T, B, ...] (t, b) or of layer l at step t of [T, L, B, ...] (t, l, b).
template <typename T, typename... Index>
T* row(const Tensor& tensor, Index... index) {
  int64_t offset = 0, dim = 0;
  ((offset += index * tensor.stride(dim++)), ...);
  return tensor.data_ptr<T>() + offset;
}

struct Sizes {
  int64_t N, M, R;
  Layout layout;
  Sizes(int64_t N, int64_t M, int64_t R) : N(N), M(M), R(R), layout(M, R) {}
  // Numbers per batch element of each state tensor, in AccessState's order.
  std::array<int64_t, 6> state() const { return {N * M, R * N, N, N, N * N, N}; }
  // Of each of Kept's arrays but the order: activated, write_content, allocation,
  // read_content, forward, backward.
  std::array<int64_t, 6> kept() const { return {layout.size, N, N, R * N, R * N, R * N}; }
};

// The activated gates and write vector (pointers into the activated interface).
template <typename V>
struct Gates {
  const V *erase, *free, *vector;
  V allocation, write;
  Gates(const V* act, const Layout& layout)
      : erase(act + layout.erase),
        free(act + layout.free_gates),
        vector(act + layout.write_vector),
        allocation(act[layout.allocation_gate]),
        write(act[layout.write_gate]) {}
};

// A memory state (or its gradient): memory [N, M], read weights [R, N], write weights [N],
// usage [N], link [N, N], precedence [N]; of one batch element (P a number) or of W in
// lanes (P = Lanes).
template <typename P>
struct Memory {
  P *memory, *read, *write, *usage, *link, *precedence;
  // From the rows of six tensors: rows(k) is the k-th's.
  template <typename Rows>
  static Memory of(Rows rows) {
    return {rows(0), rows(1), rows(2), rows(3), rows(4), rows(5)};
  }
  P* operator[](int k) const {
    return std::array<P*, 6>{memory, read, write, usage, link, precedence}[k];
  }
};

// The forward results that backward needs besides the states (in Sizes::kept's order),
// and the allocation's slot order [N] (in lanes: [N, W]).
template <typename P>
struct Kept {
  P *activated, *write_content, *allocation, *read_content, *forward, *backward;
  int64_t* order;
  P* operator[](int k) const {
    return std::array<P*, 6>{activated, write_content, allocation, read_content, forward,
                             backward}[k];
  }
};

// The allocation weighting of each lane's floored usage: a stable ascending sort of it,
// then a[s_j] = (1 - u[s_j]) prod_{i<j} u[s_i]; order [N, W]: each lane's sorted slots.
template <typename V>
void allocate(const V* floored, int64_t N, V* alloc, int64_t* order, int64_t* slots) {
  using T = typename V::Scalar;
  for (int lane = 0; lane < V::width; ++lane) {
    std::iota(slots, slots + N, int64_t(0));
    std::stable_sort(slots, slots + N,
                     [&](int64_t i, int64_t j) { return floored[i][lane] < floored[j][lane]; });
    T product = 1;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t slot = slots[j];
      order[j * V::width + lane] = slot;
      alloc[slot][lane] = (1 - floored[slot][lane]) * product;
      product *= floored[slot][lane];
    }
  }
}

// W batch elements' memory access: the activated interface (in kept) and the previous
// state -> the next state, the read vectors [R, M] and the rest of what backward keeps.
template <typename V>
void access_forward(const Sizes& s, const Memory<V>& prev, const Memory<V>& next,
                    const Kept<V>& kept, V* out, V* inverse, V* floored, int64_t* slots) {
  using T = typename V::Scalar;
  const int64_t N = s.N, M = s.M, R = s.R;
  const Layout& layout = s.layout;
  const V* act = kept.activated;
  const Gates<V> in(act, layout);
  V *mem = next.memory, *u = next.usage, *w = next.write, *l = next.link, *p = next.precedence,
    *rw = next.read;
  V *alloc = kept.allocation, *cw = kept.write_content, *cr = kept.read_content,
    *fw = kept.forward, *bw = kept.backward;

  // usage_update: (u + w - u w) prod_r (1 - f^r w^r)
  for (int64_t n = 0; n < N; ++n) {
    V retention = 1;
    for (int64_t r = 0; r < R; ++r) retention *= 1 - in.free[r] * prev.read[r * N + n];
    u[n] = (prev.usage[n] + prev.write[n] - prev.usage[n] * prev.write[n]) * retention;
  }
  // write key lookup on the previous memory
  for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(prev.memory + n * M, M);
  content_forward(prev.memory, inverse, act + layout.write_key, act[layout.write_strength], N,
                  M, cw);
  // allocation from the floored usage
  for (int64_t n = 0; n < N; ++n) floored[n] = u[n] * V(T(1 - kEpsilon)) + V(T(kEpsilon));
  allocate(floored, N, alloc, kept.order, slots);
  // write weighting, then erase and add
  V written = 0;
  for (int64_t n = 0; n < N; ++n) {
    w[n] = in.write * (cw[n] + in.allocation * (alloc[n] - cw[n]));
    written += w[n];
  }
  for (int64_t n = 0; n < N; ++n) {
    const V* old = prev.memory + n * M;
    V* slot = mem + n * M;
    const V weight = w[n];
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) slot[j] = old[j] + weight * (in.vector[j] - old[j] * in.erase[j]);
  }
  // link (zero diagonal) and precedence
  for (int64_t i = 0; i < N; ++i) {
    V* l_row = l + i * N;
    const V* l0_row = prev.link + i * N;
    const V keep = 1 - w[i], written_here = w[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      l_row[j] = (keep - w[j]) * l0_row[j] + written_here * prev.precedence[j];
    }
    l_row[i] = 0;
  }
  for (int64_t n = 0; n < N; ++n) p[n] = (1 - written) * prev.precedence[n] + w[n];
  // forward f = L w^r, backward b = L^T w^r of the previous read weights
  std::fill(bw, bw + R * N, V(0));
  for (int64_t r = 0; r < R; ++r) {
    const V* weights = prev.read + r * N;
    for (int64_t i = 0; i < N; ++i) fw[r * N + i] = dot(l + i * N, weights, N);
    add_weighted_rows(bw + r * N, l, weights, N, N);
  }
  // read keys on the new memory, the read modes' mix, the reads
  for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(mem + n * M, M);
  for (int64_t r = 0; r < R; ++r) {
    content_forward(mem, inverse, act + layout.read_keys + r * M, act[layout.read_strengths + r],
                    N, M, cr + r * N);
    const V* modes = act + layout.modes + 3 * r;
    V* weights = rw + r * N;
    for (int64_t n = 0; n < N; ++n) {
      weights[n] = modes[0] * bw[r * N + n] + modes[1] * fw[r * N + n] + modes[2] * cr[r * N + n];
    }
    std::fill(out + r * M, out + (r + 1) * M, V(0));
    add_weighted_rows(out + r * M, mem, weights, N, M);
  }
}

// Backward's work space.
template <typename V>
struct Scratch {
  std::vector<V> inverse, grad_act, grad_cr, grad_f, grad_b, grad_cw, grad_alloc,
      factors, erased, per_slot;
  std::vector<typename V::Scalar> prefix;
  explicit Scratch(const Sizes& s)
      : inverse(s.N),
        grad_act(s.layout.size),
        grad_cr(s.R * s.N),
        grad_f(s.R * s.N),
        grad_b(s.R * s.N),
        grad_cw(s.N),
        grad_alloc(s.N),
        factors(s.R),
        erased(s.N * s.M),
        per_slot(s.N),
        prefix(s.N) {}
};

// The allocation's backward, lane by lane along its sorted order: adds to grad_usage.
template <typename V>
void allocate_backward(const V* usage, const V* alloc, const int64_t* order, const V* grad_alloc,
                       int64_t N, V* grad_usage, typename V::Scalar* prefix) {
  using T = typename V::Scalar;
  for (int lane = 0; lane < V::width; ++lane) {
    auto floored = [&](int64_t slot) { return usage[slot][lane] * T(1 - kEpsilon) + T(kEpsilon); };
    T product = 1;
    for (int64_t j = 0; j < N; ++j) {
      prefix[j] = product;
      product *= floored(order[j * V::width + lane]);
    }
    T later = 0;  // sum_{l > j} grad a[s_l] a[s_l]
    for (int64_t j = N - 1; j >= 0; --j) {
      const int64_t slot = order[j * V::width + lane];
      const T grad = grad_alloc[slot][lane];
      grad_usage[slot][lane] += T(1 - kEpsilon) * (later / floored(slot) - grad * prefix[j]);
      later += grad * alloc[slot][lane];
    }
  }
}

// The gradients of W elements' access: given those of the read vectors (g_reads) and of
// the next state (grad: consumed, used as work space) -> those of the activated interface
// (scratch.grad_act) and of the previous state (grad_prev).
template <typename V>
void access_backward(const Sizes& s, const Memory<V>& prev, const Memory<V>& next,
                     const Kept<V>& kept, const V* g_reads, const Memory<V>& grad,
                     const Memory<V>& grad_prev, Scratch<V>& scratch) {
  const int64_t N = s.N, M = s.M, R = s.R;
  const Layout& layout = s.layout;
  const V* act = kept.activated;
  const Gates<V> in(act, layout);
  const V *mem = next.memory, *rw = next.read, *w = next.write, *u = next.usage, *l = next.link;
  const V *cw = kept.write_content, *alloc = kept.allocation, *cr = kept.read_content,
          *fw = kept.forward, *bw = kept.backward;
  V *grad_mem = grad.memory, *grad_write = grad.write, *grad_usage = grad.usage,
    *grad_link = grad.link;
  const V *grad_read = grad.read, *grad_prec = grad.precedence;
  V *g_mem0 = grad_prev.memory, *g_r0 = grad_prev.read, *g_w0 = grad_prev.write,
    *g_u0 = grad_prev.usage, *g_l0 = grad_prev.link, *g_p0 = grad_prev.precedence;
  V *grad_act = scratch.grad_act.data(),
    *grad_cr = scratch.grad_cr.data(), *grad_f = scratch.grad_f.data(),
    *grad_b = scratch.grad_b.data(), *grad_cw = scratch.grad_cw.data(),
    *grad_alloc = scratch.grad_alloc.data(), *inverse = scratch.inverse.data(),
    *factors = scratch.factors.data();
  std::fill(grad_act, grad_act + layout.size, V(0));
  std::fill(g_r0, g_r0 + R * N, V(0));

  // reads = rw M; read weights = the modes' mix
  for (int64_t r = 0; r < R; ++r) {
    const V* g = g_reads + r * M;
    V* modes = grad_act + layout.modes + 3 * r;
    const V* pi = act + layout.modes + 3 * r;
    for (int64_t n = 0; n < N; ++n) {
      const V weight = rw[r * N + n];
      const V grad_weight = grad_read[r * N + n] + dot(g, mem + n * M, M);
      V* grad_slot = grad_mem + n * M;
#pragma omp simd
      for (int64_t j = 0; j < M; ++j) grad_slot[j] += weight * g[j];
      const int64_t k = r * N + n;
      modes[0] += grad_weight * bw[k];
      modes[1] += grad_weight * fw[k];
      modes[2] += grad_weight * cr[k];
      grad_b[k] = pi[0] * grad_weight;
      grad_f[k] = pi[1] * grad_weight;
      grad_cr[k] = pi[2] * grad_weight;
    }
  }
  // read key lookups on the new memory
  for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(mem + n * M, M);
  for (int64_t r = 0; r < R; ++r) {
    content_backward(mem, inverse, act + layout.read_keys + r * M, act[layout.read_strengths + r],
                     cr + r * N, grad_cr + r * N, N, M, grad_mem,
                     grad_act + layout.read_keys + r * M, grad_act + layout.read_strengths + r,
                     scratch.per_slot.data());
  }
  // forward / backward reads: the link's whole gradient, then the previous reads'
  for (int64_t r = 0; r < R; ++r) {
    const V* weights = prev.read + r * N;
    const V* gf = grad_f + r * N;
    const V* gb = grad_b + r * N;
    V* g_weights = g_r0 + r * N;
    for (int64_t i = 0; i < N; ++i) {
      V* g_row = grad_link + i * N;
      const V left = gf[i], right = weights[i];
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) g_row[j] += left * weights[j] + right * gb[j];
      g_weights[i] += dot(l + i * N, gb, N);
    }
    add_weighted_rows(g_weights, l, gf, N, N);
  }
  for (int64_t i = 0; i < N; ++i) grad_link[i * N + i] = 0;
  // precedence p = (1 - sum w) p0 + w
  V written = 0, by_prec = 0;
  for (int64_t n = 0; n < N; ++n) {
    written += w[n];
    by_prec += grad_prec[n] * prev.precedence[n];
  }
  for (int64_t n = 0; n < N; ++n) {
    g_p0[n] = (1 - written) * grad_prec[n];
    grad_write[n] += grad_prec[n] - by_prec;
  }
  // link L = (1 - w[i] - w[j]) L0 + w[i] p0[j]
  for (int64_t i = 0; i < N; ++i) {
    const V* g_row = grad_link + i * N;
    const V* l0_row = prev.link + i * N;
    V* out_row = g_l0 + i * N;
    if constexpr (V::width == 1) {  // the sum as dot products, the rest vectorised
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        out_row[j] = (1 - w[i] - w[j]) * g_row[j];
        grad_write[j] -= g_row[j] * l0_row[j];
        g_p0[j] += g_row[j] * w[i];
      }
      grad_write[i] += dot(g_row, prev.precedence, N) - dot(g_row, l0_row, N);
    } else {  // in lanes: one pass
      V by_row = 0;
      for (int64_t j = 0; j < N; ++j) {
        const V weighted = g_row[j] * l0_row[j];
        out_row[j] = (1 - w[i] - w[j]) * g_row[j];
        by_row += g_row[j] * prev.precedence[j] - weighted;
        grad_write[j] -= weighted;
        g_p0[j] += g_row[j] * w[i];
      }
      grad_write[i] += by_row;
    }
  }
  // erase and add: M = M0 + w (v - M0 e)
  V* g_erase = grad_act + layout.erase;
  V* g_vector = grad_act + layout.write_vector;
  V* erased = scratch.erased.data();  // grad_mem * prev.memory, elementwise
  for (int64_t n = 0; n < N; ++n) {
    const V *g = grad_mem + n * M, *old = prev.memory + n * M;
    V* erased_row = erased + n * M;
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) {
      erased_row[j] = -g[j] * old[j];
      g_mem0[n * M + j] = g[j] * (1 - w[n] * in.erase[j]);
    }
    grad_write[n] += dot(g, in.vector, M) + dot(erased_row, in.erase, M);
  }
  add_weighted_rows(g_erase, erased, w, N, M);
  add_weighted_rows(g_vector, grad_mem, w, N, M);
  // write weighting w = g^w (c + g^a (a - c))
  V g_write_gate = 0, g_allocation_gate = 0;
  for (int64_t n = 0; n < N; ++n) {
    const V mixed = cw[n] + in.allocation * (alloc[n] - cw[n]);
    g_write_gate += grad_write[n] * mixed;
    const V g_mixed = in.write * grad_write[n];
    g_allocation_gate += g_mixed * (alloc[n] - cw[n]);
    grad_cw[n] = g_mixed * (1 - in.allocation);
    grad_alloc[n] = g_mixed * in.allocation;
  }
  grad_act[layout.write_gate] += g_write_gate;
  grad_act[layout.allocation_gate] += g_allocation_gate;
  allocate_backward(u, alloc, kept.order, grad_alloc, N, grad_usage, scratch.prefix.data());
  // write key lookup on the previous memory
  for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(prev.memory + n * M, M);
  content_backward(prev.memory, inverse, act + layout.write_key, act[layout.write_strength], cw,
                   grad_cw, N, M, g_mem0, grad_act + layout.write_key,
                   grad_act + layout.write_strength, scratch.per_slot.data());
  // usage u = (u0 + w0 - u0 w0) psi, psi = prod_r (1 - f^r w^r)
  V* g_free = grad_act + layout.free_gates;
  for (int64_t n = 0; n < N; ++n) {
    V retention = 1;
    for (int64_t r = 0; r < R; ++r) {
      factors[r] = 1 - in.free[r] * prev.read[r * N + n];
      retention *= factors[r];
    }
    const V g = grad_usage[n];
    g_u0[n] = g * retention * (1 - prev.write[n]);
    g_w0[n] = g * retention * (1 - prev.usage[n]);
    const V g_retention = g * (prev.usage[n] + prev.write[n] - prev.usage[n] * prev.write[n]);
    for (int64_t r = 0; r < R; ++r) {
      V others = 1;
      for (int64_t k = 0; k < R; ++k) {
        if (k != r) others *= factors[k];
      }
      const V g_factor = g_retention * others;
      g_free[r] -= g_factor * prev.read[r * N + n];
      g_r0[r * N + n] -= g_factor * in.free[r];
    }
  }
}

// One batch element's rows for an access forward: the interface before its activations,
// the previous and the next state, what backward keeps, the read vectors [R, M].
template <typename T>
struct ForwardRows {
  const T* raw;
  Memory<T> prev, next;
  Kept<T> kept;
  T* reads;
};

// ... and for its backward: those of the forward, the gradient of the read vectors -> that
// of the interface (g_raw). The state's gradient stays in the Group's lanes.
template <typename T>
struct BackwardRows {
  const T* raw;
  Memory<T> prev, next;
  Kept<T> kept;
  const T* g_reads;
  T* g_raw;
};

// Runs the access on up to W batch elements at once: gathers their rows into lanes, runs
// access_forward or access_backward on the lanes and scatters the results back to the
// rows. Lanes past the group's last element repeat it; their results are dropped. The
// interface's activations are done element by element (a few numbers each). Along a
// sequence (continues), the state one call ends with is the next call's, already in lanes;
// backward carries the state's gradient in lanes from call to call. With W = 1 the access
// runs on the rows themselves; only the carried gradient has buffers of its own.
template <typename V>
class Group {
 public:
  using T = typename V::Scalar;
  static constexpr int W = V::width;

  explicit Group(const Sizes& s) : s_(s), slots_(s.N), inverse_(s.N), floored_(s.N), scratch_(s) {
    for (int k = 0; k < 6; ++k) {
      grad_[k].assign(s.state()[k], V(0));
      grad_prev_[k].assign(s.state()[k], V(0));
    }
    if constexpr (W > 1) {  // the lanes' own copies of the rows
      for (int k = 0; k < 6; ++k) {
        prev_[k].resize(s.state()[k]);
        next_[k].resize(s.state()[k]);
        kept_[k].resize(s.kept()[k]);
      }
      order_.resize(s.N * W);
      reads_.resize(s.R * s.M);
      g_reads_.resize(s.R * s.M);
      grad_act_.resize(s.layout.size);
    }
  }

  // rows(e) -> the ForwardRows of the group's element e < count; continues: their previous
  // state is the next state of this group's last forward.
  template <typename Rows>
  void forward(int count, Rows rows, bool continues) {
    if constexpr (W == 1) {  // on the rows themselves
      const ForwardRows<T> r = rows(0);
      activate(s_.layout, s_.R, r.raw, r.kept.activated);
      access_forward(s_, direct(r.prev), direct(r.next), direct(r.kept), direct(r.reads),
                     inverse_.data(), floored_.data(), slots_.data());
      return;
    }
    std::array<ForwardRows<T>, W> r;
    for (int e = 0; e < W; ++e) r[e] = rows(std::min(e, count - 1));
    for (int e = 0; e < count; ++e) activate(s_.layout, s_.R, r[e].raw, r[e].kept.activated);
    gather(kept_[0], [&](int e) { return r[e].kept.activated; });
    if (continues) {
      std::swap(prev_, next_);
    } else {
      for (int k = 0; k < 6; ++k) gather(prev_[k], [&](int e) { return r[e].prev[k]; });
    }
    access_forward(s_, memory(prev_), memory(next_), kept(), reads_.data(), inverse_.data(),
                   floored_.data(), slots_.data());
    for (int k = 0; k < 6; ++k) scatter(next_[k], count, [&](int e) { return r[e].next[k]; });
    for (int k = 1; k < 6; ++k) scatter(kept_[k], count, [&](int e) { return r[e].kept[k]; });
    for (int e = 0; e < count; ++e) {
      for (int64_t j = 0; j < s_.N; ++j) r[e].kept.order[j] = order_[j * W + e];
    }
    scatter(reads_, count, [&](int e) { return r[e].reads; });
  }

  // The next state's gradient (before backward; after it the previous state's): set from
  // rows(e) -> Memory<T>, added to from row(e) of array k, or stored to rows(e).
  template <typename Rows>
  void load_grad(Rows rows) {
    for (int k = 0; k < 6; ++k) gather(grad_[k], [&](int e) { return rows(e)[k]; });
  }
  template <typename Row>
  void add_grad(int k, int count, Row row) {
    for (int e = 0; e < count; ++e) {
      const T* from = row(e);
      for (size_t j = 0; j < grad_[k].size(); ++j) grad_[k][j][e] += from[j];
    }
  }
  template <typename Rows>
  void store_grad(int count, Rows rows) {
    for (int k = 0; k < 6; ++k) scatter(grad_[k], count, [&](int e) { return rows(e)[k]; });
  }

  // rows(e) -> the BackwardRows of the group's element e < count; continues: their next
  // state is the previous state of this group's last backward.
  template <typename Rows>
  void backward(int count, Rows rows, bool continues) {
    if constexpr (W == 1) {  // on the rows themselves, but for the carried gradient
      const BackwardRows<T> r = rows(0);
      access_backward(s_, direct(r.prev), direct(r.next), direct(r.kept), direct(r.g_reads),
                      memory(grad_), memory(grad_prev_), scratch_);
      std::swap(grad_, grad_prev_);
      activate_backward(s_.layout, s_.R, r.raw, r.kept.activated, &scratch_.grad_act[0].v,
                        r.g_raw);
      return;
    }
    std::array<BackwardRows<T>, W> r;
    for (int e = 0; e < W; ++e) r[e] = rows(std::min(e, count - 1));
    std::swap(prev_, next_);
    for (int k = 0; k < 6; ++k) {
      if (!continues) gather(next_[k], [&](int e) { return r[e].next[k]; });
      gather(prev_[k], [&](int e) { return r[e].prev[k]; });
      gather(kept_[k], [&](int e) { return r[e].kept[k]; });
    }
    for (int e = 0; e < W; ++e) {
      for (int64_t j = 0; j < s_.N; ++j) order_[j * W + e] = r[e].kept.order[j];
    }
    gather(g_reads_, [&](int e) { return r[e].g_reads; });
    access_backward(s_, memory(prev_), memory(next_), kept(), g_reads_.data(), memory(grad_),
                    memory(grad_prev_), scratch_);
    std::swap(grad_, grad_prev_);
    for (int e = 0; e < count; ++e) {
      for (int64_t k = 0; k < s_.layout.size; ++k) grad_act_[k] = scratch_.grad_act[k][e];
      activate_backward(s_.layout, s_.R, r[e].raw, r[e].kept.activated, grad_act_.data(),
                        r[e].g_raw);
    }
  }

 private:
  // lanes[k][e] = row(e)[k]: W x W blocks transposed, then the rest number by number.
  template <typename Row>
  static void gather(std::vector<V>& lanes, Row row) {
    const int64_t size = lanes.size();
    if constexpr (W == 1) {
      std::copy_n(row(0), size, &lanes[0].v);
    } else {
      std::array<const T*, W> from;
      for (int e = 0; e < W; ++e) from[e] = row(e);
      int64_t k = 0;
      for (; k + W <= size; k += W) {
        std::array<typename V::Vector, W> block;
        for (int e = 0; e < W; ++e) block[e] = load(from[e] + k);
        transpose(block.data());
        for (int e = 0; e < W; ++e) lanes[k + e].v = block[e];
      }
      for (; k < size; ++k) {
        for (int e = 0; e < W; ++e) lanes[k][e] = from[e][k];
      }
    }
  }
  // row(e)[k] = lanes[k][e] for e < count
  template <typename Row>
  static void scatter(const std::vector<V>& lanes, int count, Row row) {
    const int64_t size = lanes.size();
    if constexpr (W == 1) {
      std::copy_n(&lanes[0].v, size, row(0));
    } else {
      std::array<T*, W> to;
      for (int e = 0; e < count; ++e) to[e] = row(e);
      int64_t k = 0;
      for (; k + W <= size; k += W) {
        std::array<typename V::Vector, W> block;
        for (int e = 0; e < W; ++e) block[e] = lanes[k + e].v;
        transpose(block.data());
        for (int e = 0; e < count; ++e) store(to[e] + k, block[e]);
      }
      for (; k < size; ++k) {
        for (int e = 0; e < count; ++e) to[e][k] = lanes[k][e];
      }
    }
  }
  // One element's rows as W = 1 lanes (the same numbers; Lanes<T, 1> is one T).
  static V* direct(T* row) { return reinterpret_cast<V*>(row); }
  static const V* direct(const T* row) { return reinterpret_cast<const V*>(row); }
  static Memory<V> direct(const Memory<T>& rows) {
    return Memory<V>::of([&](int k) { return direct(rows[k]); });
  }
  static Kept<V> direct(const Kept<T>& rows) {
    return {direct(rows.activated),    direct(rows.write_content), direct(rows.allocation),
            direct(rows.read_content), direct(rows.forward),       direct(rows.backward),
            rows.order};
  }
  static Memory<V> memory(std::array<std::vector<V>, 6>& arrays) {
    return Memory<V>::of([&](int k) { return arrays[k].data(); });
  }
  Kept<V> kept() {
    return {kept_[0].data(), kept_[1].data(), kept_[2].data(), kept_[3].data(),
            kept_[4].data(), kept_[5].data(), order_.data()};
  }

  Sizes s_;
  std::array<std::vector<V>, 6> prev_, next_, grad_, grad_prev_, kept_;
  std::vector<int64_t> order_, slots_;
  std::vector<V> reads_, g_reads_, inverse_, floored_;
  std::vector<T> grad_act_;
  Scratch<V> scratch_;
};

// body(Lanes<T, W>{}) with the lanes for a batch of B with N slots: W elements in the
// lanes of a vector where rows are short (N <= 128: there that is up to twice as fast)
// and every thread gets a group of them or there is one thread; else one element at a
// time (a batch of 8 in float32 would leave all but one thread idle, and long rows are
// vectors already).
template <typename T, typename Body>
void with_lanes(int64_t B, int64_t N, Body body) {
  const int threads = at::get_num_threads();
  if (N <= 128 && (threads == 1 || B >= Wide<T>::width * threads)) {
    body(Wide<T>{});
  } else {
    body(Lanes<T, 1>{});
  }
}

// at::parallel_for over the groups of W elements of a batch of B: body(begin, end) on
// each thread's block of elements, begin a multiple of W.
template <typename V, typename Body>
void parallel_groups(int64_t B, Body body) {
  constexpr int64_t W = V::width;
  at::parallel_for(0, (B + W - 1) / W, 1, [&](int64_t first, int64_t last) {
    body(first * W, std::min(B, last * W));
  });
}

// A block of batch elements [begin, end) as Groups of W, begin a multiple of W.
template <typename V>
class Groups {
 public:
  Groups(const Sizes& s, int64_t begin, int64_t end) : begin_(begin), end_(end) {
    for (int64_t g = begin; g < end; g += Group<V>::W) groups_.emplace_back(s);
  }
  // body(group, its first element, its number of elements) for each group
  template <typename Body>
  void each(Body body) {
    for (size_t i = 0; i < groups_.size(); ++i) {
      const int64_t first = begin_ + int64_t(i) * Group<V>::W;
      body(groups_[i], first, int(std::min<int64_t>(Group<V>::W, end_ - first)));
    }
  }

 private:
  int64_t begin_, end_;
  std::vector<Group<V>> groups_;
};

// Forward results kept for backward, as tensors [B, ...] (one access) or [T, B, ...] (a
// sequence); the rows of element b (at step t).
struct KeptTensors {
  Tensor activated, write_content, allocation, read_content, forward, backward, order;
  template <typename T, typename... Index>
  Kept<T> rows(Index... index) const {
    return {row<T>(activated, index...),    row<T>(write_content, index...),
            row<T>(allocation, index...),   row<T>(read_content, index...),
            row<T>(forward, index...),      row<T>(backward, index...),
            row<int64_t>(order, index...)};
  }
};

void check(const Tensor& interface, const Tensor& memory0, const Tensor& read0) {
  TORCH_CHECK(interface.device().is_cpu(), "dnc_access: CPU tensors only");
  TORCH_CHECK(memory0.dim() == 3 && read0.dim() == 3, "dnc_access: memory [B, N, M]");
  TORCH_CHECK(interface.size(-1) == Layout(memory0.size(2), read0.size(1)).size,
              "dnc_access: interface size does not match N, M, R");
}

std::vector<Tensor> contiguous(at::TensorList tensors) {
  std::vector<Tensor> out;
  for (const Tensor& tensor : tensors) out.push_back(tensor.contiguous());
  return out;
}

// interface [B, I], the previous state (six tensors [B, ...]) -> read vectors [B, R, M],
// the next state's six tensors, the allocation weighting [B, 1, N]; then what backward
// keeps: activated interface [B, I], write content weights [B, N], the allocation's slot
// order [B, N], read content weights, forward and backward weights [B, R, N].
std::vector<Tensor> dnc_access_forward(const Tensor& interface_in, const Tensor& memory0,
                                       const Tensor& read0, const Tensor& write0,
                                       const Tensor& usage0, const Tensor& link0,
                                       const Tensor& precedence0) {
  const Tensor interface = interface_in.contiguous();
  const std::vector<Tensor> prev =
      contiguous({memory0, read0, write0, usage0, link0, precedence0});
  check(interface, prev[0], prev[1]);
  const Sizes s(prev[0].size(1), prev[0].size(2), prev[1].size(1));
  const int64_t B = interface.size(0);
  const auto options = interface.options();
  const Tensor reads = at::empty({B, s.R, s.M}, options);
  std::vector<Tensor> next;
  for (const Tensor& tensor : prev) next.push_back(at::empty_like(tensor));
  const KeptTensors kept{at::empty_like(interface),         at::empty({B, s.N}, options),
                         at::empty({B, 1, s.N}, options),   at::empty({B, s.R, s.N}, options),
                         at::empty({B, s.R, s.N}, options), at::empty({B, s.R, s.N}, options),
                         at::empty({B, s.N}, options.dtype(at::kLong))};
  AT_DISPATCH_FLOATING_TYPES(interface.scalar_type(), "dnc_access_forward", [&] {
    using T = scalar_t;
    with_lanes<T>(B, s.N, [&](auto lanes) {
      using V = decltype(lanes);
      parallel_groups<V>(B, [&](int64_t begin, int64_t end) {
        Groups<V>(s, begin, end).each([&](Group<V>& group, int64_t first, int count) {
          group.forward(count, [&](int e) {
            const int64_t b = first + e;
            return ForwardRows<T>{row<T>(interface, b),
                                  Memory<T>::of([&](int k) { return row<T>(prev[k], b); }),
                                  Memory<T>::of([&](int k) { return row<T>(next[k], b); }),
                                  kept.rows<T>(b), row<T>(reads, b)};
          }, false);
        });
      });
    });
  });
  std::vector<Tensor> results{reads};
  results.insert(results.end(), next.begin(), next.end());
  results.insert(results.end(), {kept.allocation, kept.activated, kept.write_content, kept.order,
                                 kept.read_content, kept.forward, kept.backward});
  return results;
}

// saved: interface, the previous state (6), the next state (6), then dnc_access_forward's
// results from the allocation on (7); grads: of the read vectors and of the next state (6)
// -> the gradients of the interface and of the previous state (6).
std::vector<Tensor> dnc_access_backward(at::TensorList saved_in, at::TensorList grads_in) {
  const std::vector<Tensor> saved = contiguous(saved_in), grads = contiguous(grads_in);
  TORCH_CHECK(saved.size() == 20 && grads.size() == 7, "dnc_access_backward: 20 + 7 tensors");
  const Tensor& interface = saved[0];
  check(interface, saved[1], saved[2]);
  const Sizes s(saved[1].size(1), saved[1].size(2), saved[2].size(1));
  const KeptTensors kept{saved[14], saved[15], saved[13], saved[17],
                         saved[18], saved[19], saved[16]};
  std::vector<Tensor> out{at::empty_like(interface)};
  for (int k = 1; k <= 6; ++k) out.push_back(at::empty_like(saved[k]));
  AT_DISPATCH_FLOATING_TYPES(interface.scalar_type(), "dnc_access_backward", [&] {
    using T = scalar_t;
    with_lanes<T>(interface.size(0), s.N, [&](auto lanes) {
      using V = decltype(lanes);
      parallel_groups<V>(interface.size(0), [&](int64_t begin, int64_t end) {
        Groups<V>(s, begin, end).each([&](Group<V>& group, int64_t first, int count) {
          auto element = [&](int e) { return first + std::min(e, count - 1); };
          group.load_grad([&](int e) {
            return Memory<T>::of([&](int k) { return row<T>(grads[1 + k], element(e)); });
          });
          group.backward(count, [&](int e) {
            const int64_t b = first + e;
            return BackwardRows<T>{row<T>(interface, b),
                                   Memory<T>::of([&](int k) { return row<T>(saved[1 + k], b); }),
                                   Memory<T>::of([&](int k) { return row<T>(saved[7 + k], b); }),
                                   kept.rows<T>(b), row<T>(grads[0], b), row<T>(out[0], b)};
          }, false);
          group.store_grad(count, [&](int e) {
            return Memory<T>::of([&](int k) { return row<T>(out[1 + k], first + e); });
          });
        });
      });
    });
  });
  return out;
}

// -- A whole sequence: LSTM controller stack, output clip, interface layer, memory access -
//
// params: layer 0's weights on [read vectors, hidden] [4H, R M + H] (its input weights'
// read-vector columns and its recurrent weights, side by side: one product for both);
// then per upper layer its weights on [layer below, hidden] [4H, 2H] and its input bias
// [4H] (both of torch's biases summed; zeros without bias); then the interface layer's
// weight [I, H] and bias [I]. Gate blocks in torch.nn.LSTM's order: input, forget,
// candidate, output.

struct Params {
  int64_t layers;
  std::vector<Tensor> params;
  Params(at::TensorList tensors, int64_t layers) : layers(layers), params(contiguous(tensors)) {
    TORCH_CHECK(params.size() == static_cast<size_t>(count(layers)),
                "dnc_sequence: 3 + 2 (L - 1) parameters");
  }
  const Tensor& weight(int64_t layer) const {
    return layer == 0 ? params[0] : params[1 + 2 * (layer - 1)];
  }
  const Tensor& input_bias(int64_t layer) const { return params[2 + 2 * (layer - 1)]; }
  const Tensor& interface_weight() const { return params[count(layers) - 2]; }
  const Tensor& interface_bias() const { return params[count(layers) - 1]; }
  static int64_t count(int64_t layers) { return 3 + 2 * (layers - 1); }
};

// A sequence's tensors, time major: what forward returns and backward is given back.
// Shapes as forward keeps them for backward (without keep, see Timeline, the states but
// the reads have two steps and the rest one).
// The states have T + 1 steps, [0] the initial one: reads [T+1, B, R, M], hidden and cell
// [T+1, L, B, H], the memory's six [T+1, B, ...]; outputs (the clipped controller output)
// [T, B, H] and allocation [T, B, 1, N]; then kept for backward: the interface [T, B, I],
// the access's intermediates [T, B, ...], and per layer the activated gates [T, B, 4H], the
// tanh of the new cell [T, B, H] and the layer's input [below, hidden] [T, B, width + H].
struct Sequence {
  Tensor outputs, reads, hidden, cell;
  std::vector<Tensor> state;
  Tensor interface;
  KeptTensors kept;
  std::vector<Tensor> gates, squashed, inputs;

  std::vector<Tensor> flat() const {
    std::vector<Tensor> out{outputs, reads, hidden, cell};
    out.insert(out.end(), state.begin(), state.end());
    out.insert(out.end(), {kept.allocation, interface, kept.activated, kept.write_content,
                           kept.order, kept.read_content, kept.forward, kept.backward});
    for (const auto* layers : {&gates, &squashed, &inputs}) {
      out.insert(out.end(), layers->begin(), layers->end());
    }
    return out;
  }
  static Sequence from(const std::vector<Tensor>& t) {
    const int64_t layers = t[2].size(1);
    TORCH_CHECK(t.size() == static_cast<size_t>(18 + 3 * layers), "dnc_sequence: saved tensors");
    auto layer_block = [&](int64_t block) {
      return std::vector<Tensor>(t.begin() + 18 + block * layers,
                                 t.begin() + 18 + (block + 1) * layers);
    };
    return {t[0],
            t[1],
            t[2],
            t[3],
            std::vector<Tensor>(t.begin() + 4, t.begin() + 10),
            t[11],
            KeptTensors{t[12], t[13], t[10], t[15], t[16], t[17], t[14]},
            layer_block(0),
            layer_block(1),
            layer_block(2)};
  }
};

// Where a forward writes each step: with keep (for backward, or for a trace) every step's
// state and intermediates, time major, the initial state at [0]; without, two states
// taking turns (the final one at [T % 2]) and one step's intermediates, so that a forward
// without gradients keeps O(1) memory in the sequence length, as the PyTorch path does.
struct Timeline {
  int64_t steps;
  bool keep;
  int64_t states() const { return keep ? steps + 1 : 2; }
  int64_t kept_steps() const { return keep ? steps : 1; }
  int64_t state(int64_t t) const { return keep ? t : t % 2; }
  int64_t kept(int64_t t) const { return keep ? t : 0; }
};

// [slots, ...first's shape], [0] = first.
Tensor over_time(const Tensor& first, int64_t slots) {
  std::vector<int64_t> shape{slots};
  shape.insert(shape.end(), first.sizes().begin(), first.sizes().end());
  Tensor all = at::empty(shape, first.options());
  all[0].copy_(first);
  return all;
}

// The rows [begin, begin + n) of step t of a tensor [T, B, ...] (or of [T, L, B, ...] at
// layer l), as a tensor [n, ...].
Tensor rows_at(const Tensor& tensor, int64_t t, int64_t begin, int64_t n) {
  return tensor.select(0, t).narrow(0, begin, n);
}
Tensor rows_at(const Tensor& tensor, int64_t t, int64_t layer, int64_t begin, int64_t n) {
  return tensor.select(0, t).select(0, layer).narrow(0, begin, n);
}

// Each batch element's run is independent of the others': the batch is split into one
// block per thread, and each block runs the whole sequence (forward, and backward) on its
// own, with ATen's matrix products on its rows.
template <typename V>
void sequence_forward(Sequence& q, const Tensor& projected, const Params& p, double clip,
                      const Timeline& timeline) {
  using T = typename V::Scalar;
  const int64_t steps = projected.size(0), B = projected.size(1);
  const int64_t L = p.layers, H = q.hidden.size(3);
  const Sizes s(q.state[0].size(2), q.state[0].size(3), q.state[1].size(2));
  parallel_groups<V>(B, [&](int64_t begin, int64_t end) {
    // Below autograd (on every thread; grad mode is per thread): plain ATen kernels.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t n = end - begin;
    Groups<V> groups(s, begin, end);
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t now = timeline.state(t), next = timeline.state(t + 1);
      const int64_t kept = timeline.kept(t);
      for (int64_t layer = 0; layer < L; ++layer) {
        const int64_t width = layer == 0 ? s.R * s.M : H;
        for (int64_t b = begin; b < end; ++b) {
          T* in = row<T>(q.inputs[layer], kept, b);
          const T* below = layer == 0 ? row<T>(q.reads, t, b)
                                      : row<T>(q.hidden, next, layer - 1, b);
          std::copy_n(below, width, in);
          std::copy_n(row<T>(q.hidden, now, layer, b), H, in + width);
        }
        Tensor gates = rows_at(q.gates[layer], kept, begin, n);
        at::addmm_out(gates, layer == 0 ? rows_at(projected, t, begin, n) : p.input_bias(layer),
                      rows_at(q.inputs[layer], kept, begin, n), p.weight(layer).t());
        gates.narrow(1, 0, 2 * H).sigmoid_();
        gates.narrow(1, 3 * H, H).sigmoid_();
        gates.narrow(1, 2 * H, H).tanh_();
        const T* g = gates.data_ptr<T>();
        const T* c = row<T>(q.cell, now, layer, begin);
        Tensor new_cell = rows_at(q.cell, next, layer, begin, n);
        T* c2 = new_cell.data_ptr<T>();
        for (int64_t b = 0; b < n; ++b) {
          const T* gb = g + b * 4 * H;
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) {
            c2[b * H + k] = gb[H + k] * c[b * H + k] + gb[k] * gb[2 * H + k];
          }
        }
        Tensor squashed = rows_at(q.squashed[layer], kept, begin, n);
        at::tanh_out(squashed, new_cell);
        const T* sq = squashed.data_ptr<T>();
        T* h2 = row<T>(q.hidden, next, layer, begin);
        for (int64_t b = 0; b < n; ++b) {
#pragma omp simd
          for (int64_t k = 0; k < H; ++k) h2[b * H + k] = g[b * 4 * H + 3 * H + k] * sq[b * H + k];
        }
      }
      const T* top = row<T>(q.hidden, next, L - 1, begin);
      T* out = row<T>(q.outputs, t, begin);
      for (int64_t k = 0; k < n * H; ++k) out[k] = std::clamp(top[k], T(-clip), T(clip));
      Tensor interface = rows_at(q.interface, kept, begin, n);
      at::addmm_out(interface, p.interface_bias(), rows_at(q.outputs, t, begin, n),
                    p.interface_weight().t());
      groups.each([&](Group<V>& group, int64_t first, int count) {
        group.forward(count, [&](int e) {
          const int64_t b = first + e;
          return ForwardRows<T>{row<T>(q.interface, kept, b),
                                Memory<T>::of([&](int k) { return row<T>(q.state[k], now, b); }),
                                Memory<T>::of([&](int k) { return row<T>(q.state[k], next, b); }),
                                q.kept.rows<T>(kept, b), row<T>(q.reads, t + 1, b)};
        }, t > 0);
      });
    }
  });
}

// The LSTM cell's backward on n rows: given the gradients of the new hidden (gh) and of
// the new cell (gc, replaced by the previous cell's) -> the gates' (pre-activation).
template <typename T>
void lstm_backward(int64_t n, int64_t H, const T* gates, const T* cell, const T* squashed,
                   const T* gh, T* gc, T* grad_gates) {
  for (int64_t b = 0; b < n; ++b) {
    const T* g = gates + b * 4 * H;
    T* gg = grad_gates + b * 4 * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const int64_t at = b * H + k;
      const T input = g[k], forget = g[H + k], candidate = g[2 * H + k], output = g[3 * H + k];
      const T grad_value = gc[at] + gh[at] * output * (1 - squashed[at] * squashed[at]);
      gg[k] = grad_value * candidate * input * (1 - input);
      gg[H + k] = grad_value * cell[at] * forget * (1 - forget);
      gg[2 * H + k] = grad_value * input * (1 - candidate * candidate);
      gg[3 * H + k] = gh[at] * squashed[at] * output * (1 - output);
      gc[at] = grad_value * forget;
    }
  }
}

template <typename T, typename... Index>
void add_rows(T* into, const Tensor& grad, int64_t count, Index... index) {
  if (grad.numel() == 0) return;  // no gradient flows into this output
  const T* from = row<T>(grad, index...);
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) into[k] += from[k];
}

// grads: of the outputs, reads, hidden, cell and the memory's six (empty where none flows)
// -> the gates' gradients per layer [T, B, 4H] and the interface's [T, B, I]; the initial
// state's gradients: reads, hidden, cell, the memory's six.
template <typename V>
void sequence_backward(const Sequence& q, const Params& p, double clip,
                       const std::vector<Tensor>& grads, std::vector<Tensor>& grad_gates,
                       Tensor& grad_interface, std::vector<Tensor>& initial) {
  using T = typename V::Scalar;
  const int64_t steps = q.outputs.size(0), B = q.outputs.size(1);
  const int64_t L = p.layers, H = q.hidden.size(3);
  const Sizes s(q.state[0].size(2), q.state[0].size(3), q.state[1].size(2));
  const int64_t read_size = s.R * s.M;
  parallel_groups<V>(B, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t n = end - begin;
    // Gradients carried back in time, of the state after the step being undone (the
    // memory's in the groups' lanes).
    std::vector<T> reads(n * read_size, T(0)), hidden(L * n * H, T(0)), cell(L * n * H, T(0));
    Groups<V> groups(s, begin, end);
    auto add_state = [&](int64_t t) {  // the external gradients of the state at step t
      for (int64_t b = begin; b < end; ++b) {
        const int64_t i = b - begin;
        add_rows(reads.data() + i * read_size, grads[1], read_size, t, b);
        for (int64_t layer = 0; layer < L; ++layer) {
          const int64_t at = (layer * n + i) * H;
          add_rows(hidden.data() + at, grads[2], H, t, layer, b);
          add_rows(cell.data() + at, grads[3], H, t, layer, b);
        }
      }
      for (int k = 0; k < 6; ++k) {
        if (grads[4 + k].numel() == 0) continue;  // no gradient flows into this output
        groups.each([&](Group<V>& group, int64_t first, int count) {
          group.add_grad(k, count, [&](int e) { return row<T>(grads[4 + k], t, first + e); });
        });
      }
    };
    std::vector<T> grad_below(n * H), grad_out(n * H);
    std::vector<Tensor> grad_inputs;
    for (int64_t layer = 0; layer < L; ++layer) {
      grad_inputs.push_back(at::empty({n, p.weight(layer).size(1)}, q.outputs.options()));
    }
    Tensor grad_top = at::empty({n, H}, q.outputs.options());
    for (int64_t t = steps - 1; t >= 0; --t) {
      add_state(t + 1);
      groups.each([&](Group<V>& group, int64_t first, int count) {
        group.backward(count, [&](int e) {
          const int64_t b = first + e;
          return BackwardRows<T>{row<T>(q.interface, t, b),
                                 Memory<T>::of([&](int k) { return row<T>(q.state[k], t, b); }),
                                 Memory<T>::of([&](int k) { return row<T>(q.state[k], t + 1, b); }),
                                 q.kept.rows<T>(t, b), reads.data() + (b - begin) * read_size,
                                 row<T>(grad_interface, t, b)};
        }, t < steps - 1);
      });
      // the interface layer and the clip: the gradient of the top layer's new hidden
      at::mm_out(grad_top, rows_at(grad_interface, t, begin, n), p.interface_weight());
      const T* from_interface = grad_top.data_ptr<T>();
      const T* top = row<T>(q.hidden, t + 1, L - 1, begin);
      for (int64_t k = 0; k < n * H; ++k) {
        grad_below[k] = std::abs(top[k]) < clip ? from_interface[k] : T(0);
      }
      if (grads[0].numel()) {  // the outputs' own gradient (the clip's is already in)
        const T* outside = row<T>(grads[0], t, begin);
        for (int64_t k = 0; k < n * H; ++k) grad_below[k] += std::abs(top[k]) < clip ? outside[k] : T(0);
      }
      for (int64_t layer = L - 1; layer >= 0; --layer) {
        const int64_t width = layer == 0 ? read_size : H;
        T* carried_hidden = hidden.data() + layer * n * H;
        for (int64_t k = 0; k < n * H; ++k) grad_out[k] = grad_below[k] + carried_hidden[k];
        Tensor layer_grad = rows_at(grad_gates[layer], t, begin, n);
        lstm_backward(n, H, row<T>(q.gates[layer], t, begin), row<T>(q.cell, t, layer, begin),
                      row<T>(q.squashed[layer], t, begin), grad_out.data(),
                      cell.data() + layer * n * H, layer_grad.data_ptr<T>());
        at::mm_out(grad_inputs[layer], layer_grad, p.weight(layer));
        const T* g = grad_inputs[layer].data_ptr<T>();
        T* below = layer == 0 ? reads.data() : grad_below.data();
        for (int64_t i = 0; i < n; ++i) {
          std::copy_n(g + i * (width + H), width, below + i * width);
          std::copy_n(g + i * (width + H) + width, H, carried_hidden + i * H);
        }
      }
    }
    add_state(0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i = b - begin;
      std::copy_n(reads.data() + i * read_size, read_size, row<T>(initial[0], b));
      for (int64_t layer = 0; layer < L; ++layer) {
        std::copy_n(hidden.data() + (layer * n + i) * H, H, row<T>(initial[1], layer, b));
        std::copy_n(cell.data() + (layer * n + i) * H, H, row<T>(initial[2], layer, b));
      }
    }
    groups.each([&](Group<V>& group, int64_t first, int count) {
      group.store_grad(count, [&](int e) {
        return Memory<T>::of([&](int k) { return row<T>(initial[3 + k], first + e); });
      });
    });
  });
}

void check_sequence(const Tensor& projected, const Tensor& hidden, const Tensor& memory) {
  TORCH_CHECK(projected.device().is_cpu(), "dnc_sequence: CPU tensors only");
  TORCH_CHECK(projected.dim() == 3, "dnc_sequence: projected [T, B, 4H]");
  TORCH_CHECK(hidden.dim() == 3 && memory.dim() == 3, "dnc_sequence: hidden [L, B, H]");
}

// projected: layer 0's input weights on the inputs, with the biases [T, B, 4H]; reads
// [B, R, M], hidden and cell [L, B, H], the memory's six: the initial state; keep: every
// step's state and intermediates (for backward or a trace; see Timeline) -> Sequence.
std::vector<Tensor> dnc_sequence_forward(const Tensor& projected_in, const Tensor& reads0,
                                         const Tensor& hidden0, const Tensor& cell0,
                                         at::TensorList params_in, double clip, bool keep,
                                         const Tensor& memory0, const Tensor& read0,
                                         const Tensor& write0, const Tensor& usage0,
                                         const Tensor& link0, const Tensor& precedence0) {
  const Tensor projected = projected_in.contiguous();
  check_sequence(projected, hidden0, memory0);
  const Params p(params_in, hidden0.size(0));
  const int64_t steps = projected.size(0), B = projected.size(1), H = hidden0.size(2);
  const Sizes s(memory0.size(1), memory0.size(2), read0.size(1));
  TORCH_CHECK(p.interface_weight().size(0) == s.layout.size,
              "dnc_sequence: interface size does not match N, M, R");
  const Timeline timeline{steps, keep};
  const auto options = projected.options();
  auto empty = [&](int64_t count, std::vector<int64_t> shape) {
    shape.insert(shape.begin(), {count, B});
    return at::empty(shape, options);
  };
  auto kept = [&](std::vector<int64_t> shape) { return empty(timeline.kept_steps(), shape); };
  Sequence q;
  q.outputs = empty(steps, {H});
  q.reads = over_time(reads0, steps + 1);  // every step's: the output layer reads them
  q.hidden = over_time(hidden0, timeline.states());
  q.cell = over_time(cell0, timeline.states());
  for (const Tensor& first : {memory0, read0, write0, usage0, link0, precedence0}) {
    q.state.push_back(over_time(first, timeline.states()));
  }
  q.interface = kept({s.layout.size});
  q.kept = KeptTensors{kept({s.layout.size}), kept({s.N}),      kept({1, s.N}),
                       kept({s.R, s.N}),      kept({s.R, s.N}), kept({s.R, s.N}),
                       at::empty({timeline.kept_steps(), B, s.N}, options.dtype(at::kLong))};
  for (int64_t layer = 0; layer < p.layers; ++layer) {
    q.gates.push_back(kept({4 * H}));
    q.squashed.push_back(kept({H}));
    q.inputs.push_back(kept({p.weight(layer).size(1)}));
  }
  AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "dnc_sequence_forward", [&] {
    with_lanes<scalar_t>(B, s.N, [&](auto lanes) {
      sequence_forward<decltype(lanes)>(q, projected, p, clip, timeline);
    });
  });
  return q.flat();
}

// params and saved: as dnc_sequence_forward was given and returned; grads: of its first ten
// results (empty where none flows) -> the gradients of projected, reads, hidden, cell,
// each param and the memory's six.
std::vector<Tensor> dnc_sequence_backward(at::TensorList params_in, at::TensorList saved,
                                          at::TensorList grads_in, double clip) {
  const Sequence q = Sequence::from(contiguous(saved));
  const Params p(params_in, q.hidden.size(1));
  const std::vector<Tensor> grads = contiguous(grads_in);
  TORCH_CHECK(grads.size() == 10, "dnc_sequence_backward: 10 gradients");
  const int64_t steps = q.outputs.size(0), B = q.outputs.size(1);
  std::vector<Tensor> grad_gates;
  for (const Tensor& gates : q.gates) grad_gates.push_back(at::empty_like(gates));
  Tensor grad_interface = at::empty_like(q.interface);
  std::vector<Tensor> initial{at::empty_like(q.reads[0]), at::empty_like(q.hidden[0]),
                              at::empty_like(q.cell[0])};
  for (const Tensor& state : q.state) initial.push_back(at::empty_like(state[0]));
  AT_DISPATCH_FLOATING_TYPES(q.outputs.scalar_type(), "dnc_sequence_backward", [&] {
    with_lanes<scalar_t>(B, q.state[0].size(2), [&](auto lanes) {
      sequence_backward<decltype(lanes)>(q, p, clip, grads, grad_gates, grad_interface, initial);
    });
  });
  // The weights' gradients: one product over all steps and batch elements.
  auto flat = [&](const Tensor& tensor) { return tensor.view({steps * B, tensor.size(2)}); };
  std::vector<Tensor> grad_params;
  for (int64_t layer = 0; layer < p.layers; ++layer) {
    grad_params.push_back(at::mm(flat(grad_gates[layer]).t(), flat(q.inputs[layer])));
    if (layer > 0) grad_params.push_back(flat(grad_gates[layer]).sum(0));
  }
  grad_params.push_back(at::mm(flat(grad_interface).t(), flat(q.outputs)));
  grad_params.push_back(flat(grad_interface).sum(0));
  std::vector<Tensor> results{grad_gates[0], initial[0], initial[1], initial[2]};
  results.insert(results.end(), grad_params.begin(), grad_params.end());
  results.insert(results.end(), initial.begin() + 3, initial.end());
  return results;
}

}  // namespace

TORCH_LIBRARY(memctl, m) {
  m.def(
      "dnc_access_forward(Tensor interface, Tensor memory, Tensor read_weights, "
      "Tensor write_weights, Tensor usage, Tensor link, Tensor precedence) -> Tensor[]");
  m.def("dnc_access_backward(Tensor[] saved, Tensor[] grads) -> Tensor[]");
  m.def(
      "dnc_sequence_forward(Tensor projected, Tensor reads, Tensor hidden, Tensor cell, "
      "Tensor[] params, float clip, bool keep, Tensor memory, Tensor read_weights, "
      "Tensor write_weights, Tensor usage, Tensor link, Tensor precedence) -> Tensor[]");
  m.def(
      "dnc_sequence_backward(Tensor[] params, Tensor[] saved, Tensor[] grads, float clip) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(memctl, CPU, m) {
  m.impl("dnc_access_forward", &dnc_access_forward);
  m.impl("dnc_access_backward", &dnc_access_backward);
  m.impl("dnc_sequence_forward", &dnc_sequence_forward);
  m.impl("dnc_sequence_backward", &dnc_sequence_backward);
}
