// The DNC's time step on the CPU as native kernels, forward and backward, built and
// wrapped in memctl/models/native.py:
// - dnc_access_forward / dnc_access_backward: one memory access with one write head, the
//   maths of addressing.py step by step in the order of MemoryAccess.step, each batch
//   element a few plain loops over N slots (two calls instead of about four hundred small
//   tensor ops a step);
// - dnc_step_forward / dnc_step_backward: a whole step of a DNC with one LSTM controller
//   stack (Controller.step without layer norm or dropout, the output clip, the interface
//   layer) and that memory access; the matrix products are ATen's.
//
// Shapes: B batch, N slots, M word size, R read heads; I = (R + 3) M + 5 R + 3 interface
// numbers, laid out as MemoryAccess.sizes: read keys R x M, write key M, write vector M
// (identity); read strengths R, write strength 1 (oneplus); erase M, free gates R,
// allocation gate 1, write gate 1 (sigmoid); read modes R x 3 (softmax over backward,
// forward, content).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using at::Tensor;

constexpr double kEpsilon = 1e-6;  // addressing.EPSILON
constexpr double kSoftplusThreshold = 20;  // torch.nn.functional.softplus's default

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

template <typename T>
T inverse_norm(const T* vector, int64_t width) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < width; ++j) total += vector[j] * vector[j];
  return T(1) / std::sqrt(total + T(kEpsilon));
}

template <typename T>
T dot(const T* a, const T* b, int64_t width) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < width; ++j) total += a[j] * b[j];
  return total;
}

// Content weights: softmax_n(strength * cos(key, memory[n])), the norms as in
// addressing.inverse_norms.
template <typename T>
void content_forward(const T* memory, const T* memory_inverse, const T* key, T strength,
                     int64_t N, int64_t M, T* weights) {
  const T scale = strength * inverse_norm(key, M);
  T largest = -std::numeric_limits<T>::infinity();
  for (int64_t n = 0; n < N; ++n) {
    weights[n] = dot(key, memory + n * M, M) * scale * memory_inverse[n];
    largest = std::max(largest, weights[n]);
  }
  T total = 0;
  for (int64_t n = 0; n < N; ++n) {
    weights[n] = std::exp(weights[n] - largest);
    total += weights[n];
  }
  for (int64_t n = 0; n < N; ++n) weights[n] /= total;
}

// Adds the content weights' gradients (given grad on the weights) to grad_memory,
// grad_key and grad_strength.
template <typename T>
void content_backward(const T* memory, const T* memory_inverse, const T* key, T strength,
                      const T* weights, const T* grad, int64_t N, int64_t M, T* grad_memory,
                      T* grad_key, T* grad_strength) {
  const T key_inverse = inverse_norm(key, M);
  const T weighted = dot(weights, grad, N);
  T by_dots = 0;  // sum_n grad_logit[n] dot[n] memory_inverse[n]
  for (int64_t n = 0; n < N; ++n) {
    const T* row = memory + n * M;
    const T grad_logit = weights[n] * (grad[n] - weighted);
    const T d = dot(key, row, M);
    const T grad_dot = grad_logit * strength * key_inverse * memory_inverse[n];
    // d/dv (|v|^2 + eps)^(-1/2) = -(inverse norm)^3 v
    const T grad_norm = grad_logit * strength * key_inverse * d * memory_inverse[n] *
                        memory_inverse[n] * memory_inverse[n];
    by_dots += grad_logit * d * memory_inverse[n];
    T* grad_row = grad_memory + n * M;
#pragma omp simd
    for (int64_t j = 0; j < M; ++j) {
      grad_key[j] += grad_dot * row[j];
      grad_row[j] += grad_dot * key[j] - grad_norm * row[j];
    }
  }
  *grad_strength += key_inverse * by_dots;
  const T grad_norm = strength * by_dots * key_inverse * key_inverse * key_inverse;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) grad_key[j] -= grad_norm * key[j];
}

// Pointers to one batch element's rows of the tensors below.
template <typename T>
const T* row(const Tensor& tensor, int64_t b) {
  return tensor.data_ptr<T>() + b * tensor.stride(0);
}
template <typename T>
T* mutable_row(Tensor& tensor, int64_t b) {
  return tensor.data_ptr<T>() + b * tensor.stride(0);
}

// One batch element's activated gates and write vector (pointers into the activated
// interface).
template <typename T>
struct Gates {
  const T *erase, *free, *vector;
  T allocation, write;
  Gates(const T* act, const Layout& layout)
      : erase(act + layout.erase),
        free(act + layout.free_gates),
        vector(act + layout.write_vector),
        allocation(act[layout.allocation_gate]),
        write(act[layout.write_gate]) {}
};

// One batch element's rows of the previous state.
template <typename T>
struct Previous {
  const T *memory, *read, *write, *usage, *link, *precedence;
  Previous(const Tensor& memory0, const Tensor& read0, const Tensor& write0,
           const Tensor& usage0, const Tensor& link0, const Tensor& precedence0, int64_t b)
      : memory(row<T>(memory0, b)),
        read(row<T>(read0, b)),
        write(row<T>(write0, b)),
        usage(row<T>(usage0, b)),
        link(row<T>(link0, b)),
        precedence(row<T>(precedence0, b)) {}
};

template <typename T>
void forward_kernel(const Tensor& interface, const Tensor& memory0, const Tensor& read0,
                    const Tensor& write0, const Tensor& usage0, const Tensor& link0,
                    const Tensor& precedence0, Tensor& reads, Tensor& memory, Tensor& read,
                    Tensor& write, Tensor& usage, Tensor& link, Tensor& precedence,
                    Tensor& allocation, Tensor& activated, Tensor& write_content,
                    Tensor& read_content, Tensor& forward, Tensor& backward, Tensor& order) {
  const int64_t B = memory0.size(0), N = memory0.size(1), M = memory0.size(2);
  const int64_t R = read0.size(1);
  const Layout layout(M, R);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> inverse(N), sorted_usage(N);
    for (int64_t b = begin; b < end; ++b) {
      const T* raw = row<T>(interface, b);
      T* act = mutable_row<T>(activated, b);
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
      const Gates<T> in(act, layout);
      const Previous<T> prev(memory0, read0, write0, usage0, link0, precedence0, b);
      T* mem = mutable_row<T>(memory, b);
      T* u = mutable_row<T>(usage, b);
      T* w = mutable_row<T>(write, b);
      T* l = mutable_row<T>(link, b);
      T* p = mutable_row<T>(precedence, b);
      T* alloc = mutable_row<T>(allocation, b);
      T* cw = mutable_row<T>(write_content, b);
      T* cr = mutable_row<T>(read_content, b);
      T* fw = mutable_row<T>(forward, b);
      T* bw = mutable_row<T>(backward, b);
      T* rw = mutable_row<T>(read, b);
      int64_t* slots = mutable_row<int64_t>(order, b);

      // usage_update: (u + w - u w) prod_r (1 - f^r w^r)
      for (int64_t n = 0; n < N; ++n) {
        T retention = 1;
        for (int64_t r = 0; r < R; ++r) retention *= 1 - in.free[r] * prev.read[r * N + n];
        u[n] = (prev.usage[n] + prev.write[n] - prev.usage[n] * prev.write[n]) * retention;
      }
      // write key lookup on the previous memory
      for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(prev.memory + n * M, M);
      content_forward(prev.memory, inverse.data(), act + layout.write_key,
                      act[layout.write_strength], N, M, cw);
      // allocation: a stable ascending sort of the (floored) usage
      for (int64_t n = 0; n < N; ++n) sorted_usage[n] = u[n] * T(1 - kEpsilon) + T(kEpsilon);
      std::iota(slots, slots + N, int64_t(0));
      std::stable_sort(slots, slots + N, [&](int64_t i, int64_t j) {
        return sorted_usage[i] < sorted_usage[j];
      });
      T product = 1;
      for (int64_t j = 0; j < N; ++j) {
        const int64_t slot = slots[j];
        alloc[slot] = (1 - sorted_usage[slot]) * product;
        product *= sorted_usage[slot];
      }
      // write weighting, then erase and add
      T written = 0;
      for (int64_t n = 0; n < N; ++n) {
        w[n] = in.write * (cw[n] + in.allocation * (alloc[n] - cw[n]));
        written += w[n];
      }
      for (int64_t n = 0; n < N; ++n) {
        const T* old = prev.memory + n * M;
        T* slot = mem + n * M;
        const T weight = w[n];
#pragma omp simd
        for (int64_t j = 0; j < M; ++j) {
          slot[j] = old[j] + weight * (in.vector[j] - old[j] * in.erase[j]);
        }
      }
      // link (zero diagonal) and precedence
      for (int64_t i = 0; i < N; ++i) {
        T* l_row = l + i * N;
        const T* l0_row = prev.link + i * N;
        const T keep = 1 - w[i], written_here = w[i];
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          l_row[j] = (keep - w[j]) * l0_row[j] + written_here * prev.precedence[j];
        }
        l_row[i] = 0;
      }
      for (int64_t n = 0; n < N; ++n) p[n] = (1 - written) * prev.precedence[n] + w[n];
      // forward f = L w^r, backward b = L^T w^r of the previous read weights
      std::fill(bw, bw + R * N, T(0));
      for (int64_t r = 0; r < R; ++r) {
        const T* weights = prev.read + r * N;
        for (int64_t i = 0; i < N; ++i) {
          fw[r * N + i] = dot(l + i * N, weights, N);
          const T weight = weights[i];
          T* bw_row = bw + r * N;
          const T* l_row = l + i * N;
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) bw_row[j] += weight * l_row[j];
        }
      }
      // read keys on the new memory, the read modes' mix, the reads
      for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(mem + n * M, M);
      T* out = mutable_row<T>(reads, b);
      for (int64_t r = 0; r < R; ++r) {
        content_forward(mem, inverse.data(), act + layout.read_keys + r * M,
                        act[layout.read_strengths + r], N, M, cr + r * N);
        const T* modes = act + layout.modes + 3 * r;
        T* weights = rw + r * N;
        T* vector = out + r * M;
        std::fill(vector, vector + M, T(0));
        for (int64_t n = 0; n < N; ++n) {
          weights[n] = modes[0] * bw[r * N + n] + modes[1] * fw[r * N + n] +
                       modes[2] * cr[r * N + n];
          const T weight = weights[n];
          const T* slot = mem + n * M;
#pragma omp simd
          for (int64_t j = 0; j < M; ++j) vector[j] += weight * slot[j];
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const std::vector<Tensor>& saved, const std::vector<Tensor>& grads,
                     std::vector<Tensor>& out) {
  const Tensor &interface = saved[0], &activated = saved[1], &memory0 = saved[2],
               &read0 = saved[3], &write0 = saved[4], &usage0 = saved[5], &link0 = saved[6],
               &precedence0 = saved[7], &memory = saved[8], &read = saved[9],
               &write = saved[10], &usage = saved[11], &link = saved[12],
               &write_content = saved[13], &allocation = saved[14], &order = saved[15],
               &read_content = saved[16], &forward = saved[17], &backward = saved[18];
  const int64_t B = memory0.size(0), N = memory0.size(1), M = memory0.size(2);
  const int64_t R = read0.size(1);
  const Layout layout(M, R);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> inverse(N), grad_mem(N * M), grad_read(R * N), grad_write(N),
        grad_usage(N), grad_link(N * N), grad_prec(N), grad_modes(3 * R), grad_act(layout.size),
        grad_cr(R * N), grad_f(R * N), grad_b(R * N), grad_cw(N), grad_alloc(N),
        prefix(N), factors(R);
    for (int64_t b = begin; b < end; ++b) {
      const T* raw = row<T>(interface, b);
      const T* act = row<T>(activated, b);
      const Gates<T> in(act, layout);
      const Previous<T> prev(memory0, read0, write0, usage0, link0, precedence0, b);
      const T* mem = row<T>(memory, b);
      const T* rw = row<T>(read, b);
      const T* w = row<T>(write, b);
      const T* u = row<T>(usage, b);
      const T* l = row<T>(link, b);
      const T* cw = row<T>(write_content, b);
      const T* alloc = row<T>(allocation, b);
      const int64_t* slots = row<int64_t>(order, b);
      const T* cr = row<T>(read_content, b);
      const T* fw = row<T>(forward, b);
      const T* bw = row<T>(backward, b);
      const T* g_reads = row<T>(grads[0], b);
      std::copy_n(row<T>(grads[1], b), N * M, grad_mem.begin());
      std::copy_n(row<T>(grads[2], b), R * N, grad_read.begin());
      std::copy_n(row<T>(grads[3], b), N, grad_write.begin());
      std::copy_n(row<T>(grads[4], b), N, grad_usage.begin());
      std::copy_n(row<T>(grads[5], b), N * N, grad_link.begin());
      std::copy_n(row<T>(grads[6], b), N, grad_prec.begin());
      std::fill(grad_act.begin(), grad_act.end(), T(0));
      std::fill(grad_modes.begin(), grad_modes.end(), T(0));
      T* g_mem0 = mutable_row<T>(out[1], b);
      T* g_r0 = mutable_row<T>(out[2], b);
      T* g_w0 = mutable_row<T>(out[3], b);
      T* g_u0 = mutable_row<T>(out[4], b);
      T* g_l0 = mutable_row<T>(out[5], b);
      T* g_p0 = mutable_row<T>(out[6], b);
      std::fill(g_r0, g_r0 + R * N, T(0));

      // reads = rw M; read weights = the modes' mix
      for (int64_t r = 0; r < R; ++r) {
        const T* g = g_reads + r * M;
        T* modes = grad_modes.data() + 3 * r;
        const T* pi = act + layout.modes + 3 * r;
        for (int64_t n = 0; n < N; ++n) {
          const T weight = rw[r * N + n];
          T grad = grad_read[r * N + n] + dot(g, mem + n * M, M);
          T* grad_slot = grad_mem.data() + n * M;
#pragma omp simd
          for (int64_t j = 0; j < M; ++j) grad_slot[j] += weight * g[j];
          const int64_t k = r * N + n;
          modes[0] += grad * bw[k];
          modes[1] += grad * fw[k];
          modes[2] += grad * cr[k];
          grad_b[k] = pi[0] * grad;
          grad_f[k] = pi[1] * grad;
          grad_cr[k] = pi[2] * grad;
        }
      }
      // read key lookups on the new memory
      for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(mem + n * M, M);
      for (int64_t r = 0; r < R; ++r) {
        content_backward(mem, inverse.data(), act + layout.read_keys + r * M,
                         act[layout.read_strengths + r], cr + r * N, grad_cr.data() + r * N,
                         N, M, grad_mem.data(), grad_act.data() + layout.read_keys + r * M,
                         grad_act.data() + layout.read_strengths + r);
      }
      // forward / backward reads: the link's whole gradient, then the previous reads'
      for (int64_t r = 0; r < R; ++r) {
        const T* weights = prev.read + r * N;
        const T* gf = grad_f.data() + r * N;
        const T* gb = grad_b.data() + r * N;
        T* g_weights = g_r0 + r * N;
        for (int64_t i = 0; i < N; ++i) {
          T* g_row = grad_link.data() + i * N;
          const T* l_row = l + i * N;
          const T left = gf[i], right = weights[i];
          T from_backward = 0;
#pragma omp simd reduction(+ : from_backward)
          for (int64_t j = 0; j < N; ++j) {
            g_row[j] += left * weights[j] + right * gb[j];
            g_weights[j] += l_row[j] * left;
            from_backward += l_row[j] * gb[j];
          }
          g_weights[i] += from_backward;
        }
      }
      for (int64_t i = 0; i < N; ++i) grad_link[i * N + i] = 0;
      // precedence p = (1 - sum w) p0 + w
      T written = 0, by_prec = 0;
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
        const T* g_row = grad_link.data() + i * N;
        const T* l0_row = prev.link + i * N;
        T* out_row = g_l0 + i * N;
        T by_row = 0;
#pragma omp simd reduction(+ : by_row)
        for (int64_t j = 0; j < N; ++j) {
          const T weighted = g_row[j] * l0_row[j];
          out_row[j] = (1 - w[i] - w[j]) * g_row[j];
          by_row += g_row[j] * prev.precedence[j] - weighted;
          grad_write[j] -= weighted;
          g_p0[j] += g_row[j] * w[i];
        }
        grad_write[i] += by_row;
      }
      // erase and add: M = M0 + w (v - M0 e)
      T* g_erase = grad_act.data() + layout.erase;
      T* g_vector = grad_act.data() + layout.write_vector;
      for (int64_t n = 0; n < N; ++n) {
        T by_slot = 0;
#pragma omp simd reduction(+ : by_slot)
        for (int64_t j = 0; j < M; ++j) {
          const T g = grad_mem[n * M + j], old = prev.memory[n * M + j];
          by_slot += g * (in.vector[j] - old * in.erase[j]);
          g_erase[j] -= g * old * w[n];
          g_vector[j] += g * w[n];
          g_mem0[n * M + j] = g * (1 - w[n] * in.erase[j]);
        }
        grad_write[n] += by_slot;
      }
      // write weighting w = g^w (c + g^a (a - c))
      T g_write_gate = 0, g_allocation_gate = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T mixed = cw[n] + in.allocation * (alloc[n] - cw[n]);
        g_write_gate += grad_write[n] * mixed;
        const T g_mixed = in.write * grad_write[n];
        g_allocation_gate += g_mixed * (alloc[n] - cw[n]);
        grad_cw[n] = g_mixed * (1 - in.allocation);
        grad_alloc[n] = g_mixed * in.allocation;
      }
      grad_act[layout.write_gate] += g_write_gate;
      grad_act[layout.allocation_gate] += g_allocation_gate;
      // allocation a[s_j] = (1 - u[s_j]) prod_{i<j} u[s_i] of the floored, sorted usage
      T product = 1;
      for (int64_t j = 0; j < N; ++j) {
        prefix[j] = product;
        product *= u[slots[j]] * T(1 - kEpsilon) + T(kEpsilon);
      }
      T later = 0;  // sum_{l > j} grad a[s_l] a[s_l]
      for (int64_t j = N - 1; j >= 0; --j) {
        const int64_t slot = slots[j];
        const T floored = u[slot] * T(1 - kEpsilon) + T(kEpsilon);
        grad_usage[slot] +=
            T(1 - kEpsilon) * (later / floored - grad_alloc[slot] * prefix[j]);
        later += grad_alloc[slot] * alloc[slot];
      }
      // write key lookup on the previous memory
      for (int64_t n = 0; n < N; ++n) inverse[n] = inverse_norm(prev.memory + n * M, M);
      content_backward(prev.memory, inverse.data(), act + layout.write_key,
                       act[layout.write_strength], cw, grad_cw.data(), N, M, g_mem0,
                       grad_act.data() + layout.write_key,
                       grad_act.data() + layout.write_strength);
      // usage u = (u0 + w0 - u0 w0) psi, psi = prod_r (1 - f^r w^r)
      T* g_free = grad_act.data() + layout.free_gates;
      for (int64_t n = 0; n < N; ++n) {
        T retention = 1;
        for (int64_t r = 0; r < R; ++r) {
          factors[r] = 1 - in.free[r] * prev.read[r * N + n];
          retention *= factors[r];
        }
        const T g = grad_usage[n];
        g_u0[n] = g * retention * (1 - prev.write[n]);
        g_w0[n] = g * retention * (1 - prev.usage[n]);
        const T g_retention = g * (prev.usage[n] + prev.write[n] - prev.usage[n] * prev.write[n]);
        for (int64_t r = 0; r < R; ++r) {
          T others = 1;
          for (int64_t k = 0; k < R; ++k) {
            if (k != r) others *= factors[k];
          }
          const T g_factor = g_retention * others;
          g_free[r] -= g_factor * prev.read[r * N + n];
          g_r0[r * N + n] -= g_factor * in.free[r];
        }
      }
      // activations: identity, oneplus, sigmoid, softmax over each head's three modes
      T* g_raw = mutable_row<T>(out[0], b);
      for (int64_t k = 0; k < layout.read_strengths; ++k) g_raw[k] = grad_act[k];
      for (int64_t k = layout.read_strengths; k < layout.erase; ++k) {
        g_raw[k] = raw[k] > kSoftplusThreshold ? grad_act[k] : grad_act[k] * sigmoid(raw[k]);
      }
      for (int64_t k = layout.erase; k < layout.modes; ++k) {
        g_raw[k] = grad_act[k] * act[k] * (1 - act[k]);
      }
      for (int64_t r = 0; r < R; ++r) {
        const T* pi = act + layout.modes + 3 * r;
        const T* g = grad_modes.data() + 3 * r;
        const T mean = pi[0] * g[0] + pi[1] * g[1] + pi[2] * g[2];
        for (int k = 0; k < 3; ++k) g_raw[layout.modes + 3 * r + k] = pi[k] * (g[k] - mean);
      }
    }
  });
}

void check(const Tensor& interface, const Tensor& memory0, const Tensor& read0) {
  TORCH_CHECK(interface.device().is_cpu(), "dnc_access: CPU tensors only");
  TORCH_CHECK(memory0.dim() == 3 && read0.dim() == 3, "dnc_access: memory [B, N, M]");
  TORCH_CHECK(interface.size(1) == Layout(memory0.size(2), read0.size(1)).size,
              "dnc_access: interface size does not match N, M, R");
}

std::vector<Tensor> dnc_access_forward(const Tensor& interface_in, const Tensor& memory0_in,
                                       const Tensor& read0_in, const Tensor& write0_in,
                                       const Tensor& usage0_in, const Tensor& link0_in,
                                       const Tensor& precedence0_in) {
  const Tensor interface = interface_in.contiguous(), memory0 = memory0_in.contiguous(),
               read0 = read0_in.contiguous(), write0 = write0_in.contiguous(),
               usage0 = usage0_in.contiguous(), link0 = link0_in.contiguous(),
               precedence0 = precedence0_in.contiguous();
  check(interface, memory0, read0);
  const int64_t B = memory0.size(0), N = memory0.size(1), M = memory0.size(2);
  const int64_t R = read0.size(1);
  Tensor reads = at::empty({B, R, M}, memory0.options());
  Tensor memory = at::empty_like(memory0), read = at::empty_like(read0),
         write = at::empty_like(write0), usage = at::empty_like(usage0),
         link = at::empty_like(link0), precedence = at::empty_like(precedence0),
         allocation = at::empty_like(write0), activated = at::empty_like(interface),
         write_content = at::empty({B, N}, memory0.options()),
         read_content = at::empty_like(read0), forward = at::empty_like(read0),
         backward = at::empty_like(read0),
         order = at::empty({B, N}, memory0.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(memory0.scalar_type(), "dnc_access_forward", [&] {
    forward_kernel<scalar_t>(interface, memory0, read0, write0, usage0, link0, precedence0,
                             reads, memory, read, write, usage, link, precedence, allocation,
                             activated, write_content, read_content, forward, backward, order);
  });
  return {reads,      memory,        read,  write,        usage,   link,     precedence,
          allocation, activated, write_content, order, read_content, forward, backward};
}

std::vector<Tensor> dnc_access_backward(at::TensorList saved_in, at::TensorList grads_in) {
  std::vector<Tensor> saved, grads;
  for (const Tensor& tensor : saved_in) saved.push_back(tensor.contiguous());
  for (const Tensor& tensor : grads_in) grads.push_back(tensor.contiguous());
  TORCH_CHECK(saved.size() == 19 && grads.size() == 7, "dnc_access_backward: 19 + 7 tensors");
  check(saved[0], saved[2], saved[3]);
  std::vector<Tensor> out;
  for (int index : {0, 2, 3, 4, 5, 6, 7}) out.push_back(at::empty_like(saved[index]));
  AT_DISPATCH_FLOATING_TYPES(saved[2].scalar_type(), "dnc_access_backward", [&] {
    backward_kernel<scalar_t>(saved, grads, out);
  });
  return out;
}


// -- Whole step: LSTM controller stack, output clip, interface layer, memory access ------
//
// params: layer 0's weights on [read vectors, hidden] [4H, R M + H] (its input weights'
// read-vector columns and its recurrent weights, side by side: one product for both);
// then per upper layer its weights on [layer below, hidden] [4H, 2H] and its input bias
// [4H] (both of torch's biases summed; zeros without bias); then the interface layer's
// weight [I, H] and bias [I]. Gate blocks in torch.nn.LSTM's order: input, forget,
// candidate, output.

struct StepParams {
  int64_t layers;
  const std::vector<Tensor>& params;
  const Tensor& weight(int64_t layer) const {
    return layer == 0 ? params[0] : params[1 + 2 * (layer - 1)];
  }
  const Tensor& input_bias(int64_t layer) const { return params[2 + 2 * (layer - 1)]; }
  const Tensor& interface_weight() const { return params[1 + 2 * (layers - 1)]; }
  const Tensor& interface_bias() const { return params[2 + 2 * (layers - 1)]; }
  static int64_t count(int64_t layers) { return 3 + 2 * (layers - 1); }
};

// gates [B, 4H] (pre-activation; activated in place: sigmoid, the candidate block tanh),
// cell [B, H] -> new cell, its tanh and the new hidden. The transcendental functions are
// ATen's vectorised ones.
template <typename T>
void lstm_forward(Tensor& gates, const Tensor& cell, Tensor& new_cell, Tensor& squashed,
                  Tensor& new_hidden) {
  const int64_t B = gates.size(0), H = cell.size(1);
  const Tensor candidate = gates.narrow(1, 2 * H, H).tanh();
  gates.sigmoid_();
  gates.narrow(1, 2 * H, H).copy_(candidate);
  const T* g = gates.data_ptr<T>();
  const T* c = cell.data_ptr<T>();
  T* c2 = new_cell.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    const T* row_gates = g + b * 4 * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      c2[b * H + k] = row_gates[H + k] * c[b * H + k] + row_gates[k] * row_gates[2 * H + k];
    }
  }
  at::tanh_out(squashed, new_cell);
  at::mul_out(new_hidden, gates.narrow(1, 3 * H, H), squashed);
}

// Given the new hidden and cell's gradients, the gates' (pre-activation) gradient and the
// previous cell's.
template <typename T>
void lstm_backward(const Tensor& gates, const Tensor& cell, const Tensor& squashed,
                   const Tensor& grad_hidden, const Tensor& grad_new_cell, Tensor& grad_gates,
                   Tensor& grad_cell) {
  const int64_t B = gates.size(0), H = cell.size(1);
  const T* g = gates.data_ptr<T>();
  const T* c = cell.data_ptr<T>();
  const T* sq = squashed.data_ptr<T>();
  const T* gh = grad_hidden.data_ptr<T>();
  const T* gc2 = grad_new_cell.data_ptr<T>();
  T* gg = grad_gates.data_ptr<T>();
  T* gc = grad_cell.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    const T* row_gates = g + b * 4 * H;
    T* row_grad = gg + b * 4 * H;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      const int64_t at = b * H + k;
      const T input = row_gates[k], forget = row_gates[H + k];
      const T candidate = row_gates[2 * H + k], output = row_gates[3 * H + k];
      const T grad_value = gc2[at] + gh[at] * output * (1 - sq[at] * sq[at]);
      row_grad[k] = grad_value * candidate * input * (1 - input);
      row_grad[H + k] = grad_value * c[at] * forget * (1 - forget);
      row_grad[2 * H + k] = grad_value * input * (1 - candidate * candidate);
      row_grad[3 * H + k] = gh[at] * sq[at] * output * (1 - output);
      gc[at] = grad_value * forget;
    }
  }
}

// One tensor per layer -> [L, ...]; a view, not a copy, for one layer.
Tensor stacked(const std::vector<Tensor>& layers) {
  return layers.size() == 1 ? layers[0].unsqueeze(0) : at::stack(layers);
}

void check_step(const Tensor& projected, const Tensor& hidden, const StepParams& p) {
  TORCH_CHECK(projected.device().is_cpu(), "dnc_step: CPU tensors only");
  TORCH_CHECK(hidden.dim() == 3 && hidden.size(0) == p.layers, "dnc_step: hidden [L, B, H]");
  TORCH_CHECK(p.params.size() == static_cast<size_t>(StepParams::count(p.layers)),
              "dnc_step: 3 + 2 (L - 1) parameters");
}

// Returns: clipped output [B, H], hidden [L, B, H], cell [L, B, H], then
// dnc_access_forward's 14 results; then to keep for backward: the activated gates
// [L, B, 4H], the interface [B, I], the tanh of the new cells [L, B, H].
std::vector<Tensor> dnc_step_forward(const Tensor& projected, const Tensor& reads,
                                     const Tensor& hidden_in, const Tensor& cell_in,
                                     at::TensorList params_in, double clip,
                                     const Tensor& memory, const Tensor& read_weights,
                                     const Tensor& write_weights, const Tensor& usage,
                                     const Tensor& link, const Tensor& precedence) {
  std::vector<Tensor> params(params_in.begin(), params_in.end());
  const StepParams p{hidden_in.size(0), params};
  check_step(projected, hidden_in, p);
  const Tensor hidden = hidden_in.contiguous(), cell = cell_in.contiguous();
  std::vector<Tensor> gates(p.layers), hiddens(p.layers), cells(p.layers), squashed(p.layers);
  Tensor below = reads;
  for (int64_t layer = 0; layer < p.layers; ++layer) {
    const Tensor inputs = at::cat({below, hidden[layer]}, 1);
    const Tensor& bias = layer == 0 ? projected : p.input_bias(layer);
    gates[layer] = at::addmm(bias, inputs, p.weight(layer).t());
    cells[layer] = at::empty_like(cell[layer]);
    hiddens[layer] = at::empty_like(hidden[layer]);
    squashed[layer] = at::empty_like(hidden[layer]);
    AT_DISPATCH_FLOATING_TYPES(projected.scalar_type(), "dnc_step_forward", [&] {
      lstm_forward<scalar_t>(gates[layer], cell[layer], cells[layer], squashed[layer],
                             hiddens[layer]);
    });
    below = hiddens[layer];
  }
  const Tensor output = below.clamp(-clip, clip);
  const Tensor interface = at::addmm(p.interface_bias(), output, p.interface_weight().t());
  std::vector<Tensor> access = dnc_access_forward(interface, memory, read_weights,
                                                  write_weights, usage, link, precedence);
  std::vector<Tensor> results{output, stacked(hiddens), stacked(cells)};
  results.insert(results.end(), access.begin(), access.end());
  results.push_back(stacked(gates));
  results.push_back(interface);
  results.push_back(stacked(squashed));
  return results;
}

// saved: projected, reads, hidden, cell, the step's new hidden, the tanh of its new cell,
// the activated gates, the params, then the 19 tensors dnc_access_backward keeps; grads: output,
// hidden, cell, then dnc_access_backward's 7. Returns the gradients of projected, reads,
// hidden, cell, each param, and the 6 memory states.
std::vector<Tensor> dnc_step_backward(at::TensorList saved, at::TensorList grads, double clip) {
  const Tensor &reads = saved[1], &hidden = saved[2], &cell = saved[3],
               &new_hidden = saved[4], &squashed = saved[5], &gates = saved[6];
  const int64_t layers = hidden.size(0);
  const int64_t count = StepParams::count(layers);
  std::vector<Tensor> params(saved.begin() + 7, saved.begin() + 7 + count);
  const StepParams p{layers, params};
  std::vector<Tensor> access_saved(saved.begin() + 7 + count, saved.end());
  std::vector<Tensor> access_grads(grads.begin() + 3, grads.end());
  std::vector<Tensor> access = dnc_access_backward(access_saved, access_grads);
  const Tensor& grad_interface = access[0];
  const Tensor& output_before = new_hidden[layers - 1];
  std::vector<Tensor> grad_params(count);
  grad_params[count - 2] = at::mm(grad_interface.t(), output_before.clamp(-clip, clip));
  grad_params[count - 1] = grad_interface.sum(0);
  // hardtanh's gradient: through where -clip < x < clip
  Tensor grad_below = at::addmm(grads[0], grad_interface, p.interface_weight());
  grad_below.mul_(output_before.abs().lt(clip).to(grad_below.scalar_type()));
  Tensor grad_hidden = at::empty_like(hidden), grad_cell = at::empty_like(cell);
  Tensor grad_projected, grad_reads;
  for (int64_t layer = layers - 1; layer >= 0; --layer) {
    const Tensor grad_out = grad_below.add(grads[1][layer]);
    Tensor grad_gates = at::empty_like(gates[layer]);
    Tensor grad_previous_cell = grad_cell[layer];
    const Tensor grad_new_cell = grads[2][layer].contiguous();
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "dnc_step_backward", [&] {
      lstm_backward<scalar_t>(gates[layer], cell[layer].contiguous(), squashed[layer],
                              grad_out, grad_new_cell, grad_gates, grad_previous_cell);
    });
    const Tensor& below = layer == 0 ? reads : new_hidden[layer - 1];
    const int64_t width = below.size(1);
    const Tensor grad_inputs = at::mm(grad_gates, p.weight(layer));
    grad_hidden[layer].copy_(grad_inputs.narrow(1, width, grad_inputs.size(1) - width));
    grad_below = grad_inputs.narrow(1, 0, width);
    const Tensor weight_grad = at::mm(grad_gates.t(), at::cat({below, hidden[layer]}, 1));
    if (layer == 0) {
      grad_params[0] = weight_grad;
      grad_reads = grad_below;
      grad_projected = grad_gates;
    } else {
      grad_params[1 + 2 * (layer - 1)] = weight_grad;
      grad_params[2 + 2 * (layer - 1)] = grad_gates.sum(0);
    }
  }
  std::vector<Tensor> results{grad_projected, grad_reads, grad_hidden, grad_cell};
  results.insert(results.end(), grad_params.begin(), grad_params.end());
  results.insert(results.end(), access.begin() + 1, access.end());
  return results;
}

}  // namespace

TORCH_LIBRARY(memctl, m) {
  m.def(
      "dnc_access_forward(Tensor interface, Tensor memory, Tensor read_weights, "
      "Tensor write_weights, Tensor usage, Tensor link, Tensor precedence) -> Tensor[]");
  m.def("dnc_access_backward(Tensor[] saved, Tensor[] grads) -> Tensor[]");
  m.def(
      "dnc_step_forward(Tensor projected, Tensor reads, Tensor hidden, Tensor cell, "
      "Tensor[] params, float clip, Tensor memory, Tensor read_weights, "
      "Tensor write_weights, Tensor usage, Tensor link, Tensor precedence) -> Tensor[]");
  m.def("dnc_step_backward(Tensor[] saved, Tensor[] grads, float clip) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(memctl, CPU, m) {
  m.impl("dnc_access_forward", &dnc_access_forward);
  m.impl("dnc_access_backward", &dnc_access_backward);
  m.impl("dnc_step_forward", &dnc_step_forward);
  m.impl("dnc_step_backward", &dnc_step_backward);
}
