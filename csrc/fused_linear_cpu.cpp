// Native CPU ops for rba's fused linear token scores and distillation loss.
//
// Semantics and signatures follow /work/notes/KERNELS_CONTRACT.md (mirrored in
// kernels/native.py). Every op walks the rows in chunks: one GEMM gives a chunk's
// full-vocabulary logits [rows, V] (fp32; fp64 for fp64 inputs) in a buffer reused across
// chunks, one vectorised pass per row turns them into the softmax statistics and, where a
// gradient is wanted, into dz in place while the row is in cache, and two GEMMs give
// grad_hidden[chunk] = dz @ W and grad_weight += dz^T @ h[chunk]. The largest temporary is that
// [rows, V] tile (rows: see chunk_rows), never [N, V] logits.
//
// The token-score ops (token_scores_forward / _backward) instead walk each row chunk's
// vocabulary in blocks through a [rows, vb] tile, merging online softmax statistics across
// blocks; see token_rows for why. Their autograd pair (_keep / _kept) keeps the last blocks of
// logits from the forward so the backward, which cannot know its weights earlier, recomputes
// fewer: eager PyTorch needs three GEMMs, a recomputing backward four.
//
// Threading: the GEMMs use all of torch's intra-op threads (MKL), and the row passes split the
// chunk's rows over them with at::parallel_for. Results do not depend on the thread count beyond
// BLAS's own summation order.
//
// Built two ways, both from this file: by setup.py as the extension `rba_core._C`, or just in
// time by kernels/native.py as `rba_native`; TORCH_EXTENSION_NAME names the module in each case.
// Both compile with -fno-trapping-math (as torch itself does) so the row loops vectorise.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace {

// Bumped whenever an op's signature or meaning changes, so kernels/native.py can refuse a stale
// prebuilt module and rebuild from source instead.
constexpr int64_t kAbiVersion = 4;

// Elements of the default [rows, V] logits tile: 12 * 2**20 fp32 = 48 MiB, 256 rows at
// V = 49152. Distillation holds two tiles. Fewer rows cost time: MKL's GEMMs with 85-128 rows
// ran 10-60% slower than with 256 on the build machine.
constexpr int64_t kTileElements = int64_t{12} << 20;

// Rows per chunk (0: derived from kTileElements and V, or for the token-score ops from
// kTileElements and the vocabulary block) and vocabulary entries per block: the token-score ops'
// blocks, and elsewhere the blocks in which 16-bit weights are converted to fp32 (one block at a
// time, never a full fp32 copy).
std::atomic<int64_t> g_rows_chunk{0};
std::atomic<int64_t> g_vocab_block{4096};

using OptTensor = c10::optional<at::Tensor>;

std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

bool is_float_kind(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got ",
                    t.device(), "); CUDA tensors go through the Triton backend");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name,
                    " must be contiguous; call .contiguous() on it first");
}

void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  check_cpu_contiguous(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", shape_of(t));
  TORCH_CHECK_TYPE(is_float_kind(t.scalar_type()), op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

void check_row_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* op,
                      const char* name) {
  check_cpu_contiguous(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n,
                    "] (one value per row), got ", shape_of(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type(), "; convert it with .to(", dtype, ")");
}

void check_acc_matrix(const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType acc,
                      const char* op, const char* name) {
  check_cpu_contiguous(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
                    " must have shape [", rows, ", ", cols, "], got ", shape_of(t));
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ",
                   t.scalar_type());
}

void check_ids(const at::Tensor& ids, int64_t n, int64_t vocab, const char* op) {
  check_row_vector(ids, n, at::kLong, op, "ids");
  if (n == 0) return;
  const int64_t lo = ids.min().item<int64_t>();
  const int64_t hi = ids.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < vocab, op, ": ids must lie in [0, ", vocab,
                    ") (the weight's vocabulary size), got values in [", lo, ", ", hi,
                    "]; mask out padding tokens before calling");
}

void check_scalar(double x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(x) && x != 0.0, op, ": ", name,
                    " must be finite and non-zero, got ", x);
}

// Accumulation type: float32 for float32 and the 16-bit types, float64 for float64 inputs (so
// float64 callers, e.g. gradient checks, keep their precision).
at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc ? t : t.to(acc);
}

int64_t chunk_rows(int64_t vocab) {
  const int64_t set = g_rows_chunk.load();
  if (set > 0) return set;
  const int64_t rows = kTileElements / std::max<int64_t>(vocab, 1);
  // A multiple of 64 when there is room: BLAS runs those shapes fastest.
  return rows >= 64 ? rows - rows % 64 : std::max<int64_t>(rows, 1);
}

int64_t vocab_block() { return std::max<int64_t>(1, g_vocab_block.load()); }

// ---------------------------------------------------------------------------------------------
// Per-row passes. Each works on one row of V logits while it sits in cache. They are written
// with plain arithmetic (exp and log below) so the compiler vectorises them; on x86-64 with GCC
// each is compiled for AVX2+FMA and for the baseline, and the loader picks by CPU (about 3x
// faster than the 4-wide baseline build; a wheel still runs on any x86-64).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RBA_ROW_PASS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RBA_ROW_PASS
#endif

// exp(x) for x <= 88; relative error below 1e-7. Below -87 it returns exp(-87) (1.6e-38, still
// a normal float) instead of underflowing, which no sum or product here can tell from 0.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  // x = k ln2 + r with |r| <= ln2 / 2; adding and subtracting 1.5 * 2^23 rounds k to nearest.
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  // ln2 in two parts, the first exact in 15 bits so that k * hi has no rounding error.
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  // Taylor series of e^r to r^7: the next term is below 2^-27 for |r| <= ln2 / 2.
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
}

// log(x) for x > 0 (a subnormal or zero x gives about -88, finite).
inline float fast_log(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  // x = 2^e m with m in [sqrt(1/2), sqrt(2)).
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);
  float e = static_cast<float>((bits >> 23) - 127);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1.0f : e;
  // log m = 2 atanh(u), u = (m - 1) / (m + 1), |u| <= 0.172: the odd series to u^9 is exact to
  // float precision.
  const float u = (m - 1.0f) / (m + 1.0f), u2 = u * u;
  float q = 2.0f / 9.0f;
  q = q * u2 + 2.0f / 7.0f;
  q = q * u2 + 2.0f / 5.0f;
  q = q * u2 + 2.0f / 3.0f;
  q = q * u2 + 2.0f;
  return e * 0.693145752f + (u * q + e * 1.42860677e-6f);
}

// float64 inputs (gradient checks) keep libm's precision.
inline double fast_exp(double x) { return std::exp(x); }
inline double fast_log(double x) { return std::log(x); }

template <typename T>
inline T row_max(const T* z, int64_t n) {
  T m = z[0];
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < n; ++v) m = z[v] > m ? z[v] : m;
  return m;
}

// A row's log-sum-exp as max + log sum exp(z - max). The two parts are kept apart because
// log-probs computed as (z - max) - log_sum keep their precision when the logits are large.
template <typename T>
struct RowLse {
  T max, log_sum;
};

template <typename T>
RBA_ROW_PASS RowLse<T> row_lse(const T* z, int64_t n) {
  const T m = row_max(z, n);
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < n; ++v) s += fast_exp(z[v] - m);
  return {m, std::log(s)};
}

// Log-sum-exp, the target's log-prob and (when entropy is given) the entropy of one row.
template <typename T>
RBA_ROW_PASS void row_token_stats(const T* z, int64_t n, int64_t id, T* lse, T* logp,
                                  T* entropy) {
  RowLse<T> l;
  if (entropy == nullptr) {
    l = row_lse(z, n);
  } else {
    // Relative to the max, sum p (z - m) stays well scaled: entropy = log s - sum e (z - m) / s.
    const T m = row_max(z, n);
    T s = 0, t = 0;
#pragma omp simd reduction(+ : s, t)
    for (int64_t v = 0; v < n; ++v) {
      const T d = z[v] - m, e = fast_exp(d);
      s += e;
      t += e * d;
    }
    l = {m, std::log(s)};
    *entropy = l.log_sum - t / s;
  }
  *lse = l.max + l.log_sum;
  *logp = (z[id] - l.max) - l.log_sum;
}

// dz of one row (or of one vocabulary block of it) in place of its logits:
// scale * (g (1[v = id] - p_v) - ge p_v (log p_v + H)) for the objective g * logp[id] + ge * H.
// id outside [0, n): the target lies in another block.
template <typename T>
RBA_ROW_PASS void row_token_grad(T* z, int64_t n, int64_t id, T lse, T entropy, T g, T ge,
                                 T scale) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    const T lp = z[v] - lse;
    z[v] = -scale * fast_exp(lp) * (g + ge * (lp + entropy));
  }
  if (id >= 0 && id < n) z[id] += scale * g;
}

// Online softmax statistics of one row over vocabulary blocks: the running max m, s = sum
// exp(z - m) and (when t is kept) t = sum exp(z - m) (z - m), merged with one block of n
// logits. s == 0 marks a row no block has reached yet (afterwards s >= 1: the max contributes 1).
template <typename T>
RBA_ROW_PASS void row_block_stats(const T* z, int64_t n, bool with_t, T* m, T* s, T* t) {
  const T mb = row_max(z, n);
  T sb = 0, tb = 0;
  if (with_t) {
#pragma omp simd reduction(+ : sb, tb)
    for (int64_t v = 0; v < n; ++v) {
      const T d = z[v] - mb, e = fast_exp(d);
      sb += e;
      tb += e * d;
    }
  } else {
#pragma omp simd reduction(+ : sb)
    for (int64_t v = 0; v < n; ++v) sb += fast_exp(z[v] - mb);
  }
  if (*s == 0) {
    *m = mb, *s = sb, *t = tb;
    return;
  }
  // Rescaled to the new max M: sum e^(z - M) (z - M) = e^(m - M) (t + s (m - M)).
  const T mx = std::max(*m, mb), a = std::exp(*m - mx), b = std::exp(mb - mx);
  *t = a * (*t + *s * (*m - mx)) + b * (tb + sb * (mb - mx));
  *s = a * *s + b * sb;
  *m = mx;
}

enum class Kind { ForwardKl, ReverseKl, Jsd };

// One row of distillation from the student's and teacher's logits zs, zt (already divided by
// the temperature) and their log-sum-exps ls, lt: returns the row's loss and leaves
// c * d loss / d zs in zs (zt is scratch). With P_S = softmax(zs) and g = d loss / d log P_S,
// d loss / d zs = P_S (g - sum_v P_S g); forward KL simplifies to P_S - P_T in one pass, the
// others need the row's sum first, so a second pass writes dz.
template <typename T>
RBA_ROW_PASS T row_distill(T* zs, T* zt, int64_t n, Kind kind, T beta, RowLse<T> ls,
                           RowLse<T> lt, T c) {
  T a = 0, b = 0;
  if (kind == Kind::ForwardKl) {
#pragma omp simd reduction(+ : a)
    for (int64_t v = 0; v < n; ++v) {
      const T lps = (zs[v] - ls.max) - ls.log_sum, lpt = (zt[v] - lt.max) - lt.log_sum;
      const T pt = fast_exp(lpt);
      a += pt * (lpt - lps);
      zs[v] = c * (fast_exp(lps) - pt);
    }
    return a;
  }
  if (kind == Kind::ReverseKl) {
    // g = log P_S - log P_T and sum P_S g is the loss itself.
#pragma omp simd reduction(+ : a)
    for (int64_t v = 0; v < n; ++v) {
      const T lps = (zs[v] - ls.max) - ls.log_sum, ps = fast_exp(lps);
      const T g = lps - ((zt[v] - lt.max) - lt.log_sum);
      a += ps * g;
      zs[v] = ps;
      zt[v] = g;
    }
    b = a;
  } else {
    // M = beta P_T + (1 - beta) P_S; a = KL(P_T || M), b = KL(P_S || M), and
    // g = (1 - beta) (log P_S - log M).
    const T wt = beta, ws = 1 - beta;
#pragma omp simd reduction(+ : a, b)
    for (int64_t v = 0; v < n; ++v) {
      const T lps = (zs[v] - ls.max) - ls.log_sum, lpt = (zt[v] - lt.max) - lt.log_sum;
      const T ps = fast_exp(lps), pt = fast_exp(lpt);
      const T lm = fast_log(wt * pt + ws * ps);
      a += pt * (lpt - lm);
      b += ps * (lps - lm);
      zs[v] = ps;
      zt[v] = ws * (lps - lm);
    }
    a = wt * a + ws * b;
    b *= ws;
  }
  // Here zs holds P_S, zt holds g and b = sum_v P_S g.
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) zs[v] = c * zs[v] * (zt[v] - b);
  return a;
}

template <typename F>
void for_rows(int64_t rows, const F& fn) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

// ---------------------------------------------------------------------------------------------
// Chunk GEMMs.

// z [rows, V] = (h32 W^T + b) * scale, written into the caller's buffer. Weights already in
// h32's dtype go through one GEMM; 16-bit weights are converted one vocabulary block at a time.
void chunk_logits(at::Tensor& z, const at::Tensor& h32, const at::Tensor& weight,
                  const OptTensor& bias, double scale) {
  const at::ScalarType acc = h32.scalar_type();
  const int64_t vocab = weight.size(0);
  const int64_t vb = weight.scalar_type() == acc ? vocab : vocab_block();
  for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
    const int64_t v1 = std::min(vocab, v0 + vb);
    at::Tensor zb = z.slice(1, v0, v1);
    at::Tensor wb = as_acc(weight.slice(0, v0, v1), acc).t();
    if (bias.has_value()) {
      at::addmm_out(zb, as_acc(bias->slice(0, v0, v1), acc), h32, wb, scale, scale);
    } else {
      // beta = 0: the buffer's old contents are not read.
      at::addmm_out(zb, zb, h32, wb, 0.0, scale);
    }
  }
}

// grad_h_c = dz @ W (overwritten), grad_w += dz^T @ h32, grad_b += sum_rows dz (those defined).
void chunk_grad_gemms(const at::Tensor& dz, const at::Tensor& h32, const at::Tensor& weight,
                      at::Tensor grad_h_c, const at::Tensor& grad_w, const at::Tensor& grad_b) {
  const at::ScalarType acc = dz.scalar_type();
  const int64_t vocab = weight.size(0);
  if (weight.scalar_type() == acc) {
    at::mm_out(grad_h_c, dz, weight);
    if (grad_w.defined()) grad_w.addmm_(dz.t(), h32);
  } else {
    grad_h_c.zero_();
    const int64_t vb = vocab_block();
    for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
      const int64_t v1 = std::min(vocab, v0 + vb);
      at::Tensor dzb = dz.slice(1, v0, v1);
      grad_h_c.addmm_(dzb, as_acc(weight.slice(0, v0, v1), acc));
      if (grad_w.defined()) grad_w.slice(0, v0, v1).addmm_(dzb.t(), h32);
    }
  }
  if (grad_b.defined()) grad_b.add_(dz.sum(0));
}

// ---------------------------------------------------------------------------------------------
// Token scores.

void check_token_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                        const OptTensor& bias, const at::Tensor& ids, double scale,
                        const char* op) {
  check_matrix(hidden, op, "hidden");
  check_matrix(weight, op, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op,
                   ": weight and hidden must share a dtype, got weight ", weight.scalar_type(),
                   " and hidden ", hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), op, ": weight ", shape_of(weight),
                    " and hidden ", shape_of(hidden),
                    " disagree on the hidden size D (weight must be [V, D], hidden [N, D])");
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight has an empty vocabulary");
  if (bias.has_value()) {
    check_row_vector(*bias, weight.size(0), hidden.scalar_type(), op, "bias");
  }
  check_ids(ids, hidden.size(0), weight.size(0), op);
  check_scalar(scale, op, "scale");
}

// One chunk's logits into z, then lse, logp and entropy (if defined) of its rows.
void chunk_token_stats(at::Tensor& z, const at::Tensor& h32, const at::Tensor& weight,
                       const OptTensor& bias, const at::Tensor& ids, double scale,
                       at::Tensor lse, at::Tensor logp, at::Tensor entropy) {
  chunk_logits(z, h32, weight, bias, scale);
  const int64_t vocab = z.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "chunk_token_stats", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t *lp = lse.data_ptr<scalar_t>(), *gp = logp.data_ptr<scalar_t>();
    scalar_t* ep = entropy.defined() ? entropy.data_ptr<scalar_t>() : nullptr;
    for_rows(z.size(0), [&](int64_t r) {
      row_token_stats(zp + r * vocab, vocab, ip[r], lp + r, gp + r, ep ? ep + r : nullptr);
    });
  });
}

// From a chunk's logits z (overwritten with dz): the gradient of
// sum_r grad_logp[r] logp[r] + grad_entropy[r] entropy[r] into grad_h_c (overwritten),
// grad_w and grad_b (accumulated, when defined).
void chunk_token_grads(at::Tensor& z, const at::Tensor& h32, const at::Tensor& weight,
                       const at::Tensor& ids, double scale, const at::Tensor& lse,
                       const at::Tensor& entropy, const at::Tensor& grad_logp,
                       const at::Tensor& grad_entropy, at::Tensor grad_h_c,
                       const at::Tensor& grad_w, const at::Tensor& grad_b) {
  const int64_t vocab = z.size(1);
  const int64_t* ip = ids.data_ptr<int64_t>();
  const bool use_entropy = grad_entropy.defined();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "chunk_token_grads", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t *lp = lse.data_ptr<scalar_t>(), *gp = grad_logp.data_ptr<scalar_t>();
    const scalar_t* ep = use_entropy ? entropy.data_ptr<scalar_t>() : nullptr;
    const scalar_t* gep = use_entropy ? grad_entropy.data_ptr<scalar_t>() : nullptr;
    for_rows(z.size(0), [&](int64_t r) {
      row_token_grad<scalar_t>(zp + r * vocab, vocab, ip[r], lp[r], ep ? ep[r] : 0, gp[r],
                               gep ? gep[r] : 0, static_cast<scalar_t>(scale));
    });
  });
  chunk_grad_gemms(z, h32, weight, grad_h_c, grad_w, grad_b);
}

}  // namespace

namespace {

// Elements of the logits kept from a token-score forward for its backward (96 MiB in fp32).
constexpr int64_t kKeepElements = int64_t{24} << 20;

// Rows per chunk of the token-score ops. They walk each chunk's vocabulary in blocks of
// vb = vocab_block() entries through one [rows, vb] tile with online softmax statistics, so no
// full vocabulary row is held and a chunk can have many rows: on the build machine GEMMs of 2048
// rows by 4096-entry blocks ran 10-15% faster than 256-row full-vocabulary ones, and each block
// of grad_weight is written once instead of accumulated chunk by chunk.
int64_t token_rows(int64_t n) {
  const int64_t set = g_rows_chunk.load();
  const int64_t rows = set > 0 ? set : std::max<int64_t>(1, kTileElements / vocab_block());
  return std::min(rows, std::max<int64_t>(n, 1));
}

// The [rows, cols] front of tile i of tiles [k, rc, vb], contiguous.
at::Tensor tile_view(const at::Tensor& tiles, int64_t i, int64_t rows, int64_t cols) {
  return tiles[i].view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}

// Tiles whose logits a forward keeps for its backward (the last row chunk's last blocks), so
// the backward recomputes fewer: at most kKeepElements and a quarter of the [N, V] logits (eager
// PyTorch holds three times [N, V] at its peak, so this stays under a tenth of that), at least
// the one working tile.
int64_t kept_tiles(int64_t n, int64_t vocab, int64_t rc, int64_t vb, int64_t blocks) {
  const int64_t budget = std::min(kKeepElements, n * vocab / 4);
  return std::clamp<int64_t>(budget / (rc * vb), 1, blocks);
}

// z [rows, v1 - v0] = (h32 w32^T + b[v0:v1]) * scale, w32 being W[v0:v1] in h32's dtype.
void block_logits(at::Tensor& z, const at::Tensor& h32, const at::Tensor& w32,
                  const OptTensor& bias, int64_t v0, int64_t v1, double scale) {
  if (bias.has_value()) {
    at::addmm_out(z, as_acc(bias->slice(0, v0, v1), h32.scalar_type()), h32, w32.t(), scale,
                  scale);
  } else {
    // beta = 0: the tile's old contents are not read.
    at::addmm_out(z, z, h32, w32.t(), 0.0, scale);
  }
}

// Block b of `blocks` of the last row chunk sits in its own kept tile when among the last k;
// every other block uses tile 0.
int64_t tile_slot(bool last_chunk, int64_t b, int64_t blocks, int64_t k) {
  return last_chunk && b >= blocks - k ? b - (blocks - k) : 0;
}

// logp, lse and entropy (with_entropy) of every row; with keep, also the tiles [k, rc, vb]
// holding the last row chunk's last k blocks of logits, for token_backward_pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_forward_pass(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, bool with_entropy, bool keep) {
  at::NoGradGuard no_grad;
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType acc = acc_type(hidden);
  const auto acc_opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n}, acc_opts), lse = at::empty({n}, acc_opts);
  at::Tensor entropy = with_entropy ? at::empty({n}, acc_opts) : at::Tensor();
  // Per row: running max, sum and entropy sum (row_block_stats) and the target's logit.
  at::Tensor run_m = at::empty({n}, acc_opts), run_s = at::zeros({n}, acc_opts);
  at::Tensor run_t = at::zeros({n}, acc_opts), z_id = at::empty({n}, acc_opts);
  const int64_t rc = token_rows(n), vb = std::min(vocab_block(), vocab);
  const int64_t blocks = (vocab + vb - 1) / vb, last_r0 = n > 0 ? (n - 1) / rc * rc : 0;
  const int64_t k = keep ? kept_tiles(n, vocab, rc, vb, blocks) : 1;
  at::Tensor tiles = at::empty({k, rc, vb}, acc_opts);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < n; r0 += rc) {
    const int64_t r1 = std::min(n, r0 + rc), rows = r1 - r0;
    const at::Tensor h32 = as_acc(hidden.slice(0, r0, r1), acc);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t v0 = b * vb, v1 = std::min(vocab, v0 + vb), bw = v1 - v0;
      at::Tensor z = tile_view(tiles, tile_slot(r0 == last_r0, b, blocks, k), rows, bw);
      block_logits(z, h32, as_acc(weight.slice(0, v0, v1), acc), bias, v0, v1, scale);
      AT_DISPATCH_FLOATING_TYPES(acc, "token_forward_pass", [&] {
        const scalar_t* zp = z.data_ptr<scalar_t>();
        scalar_t* mp = run_m.data_ptr<scalar_t>() + r0;
        scalar_t* sp = run_s.data_ptr<scalar_t>() + r0;
        scalar_t* tp = run_t.data_ptr<scalar_t>() + r0;
        scalar_t* ztp = z_id.data_ptr<scalar_t>() + r0;
        for_rows(rows, [&](int64_t r) {
          const scalar_t* zr = zp + r * bw;
          row_block_stats(zr, bw, with_entropy, mp + r, sp + r, tp + r);
          const int64_t id = ip[r0 + r] - v0;
          if (id >= 0 && id < bw) ztp[r] = zr[id];
        });
      });
    }
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "token_forward_pass", [&] {
    const scalar_t *mp = run_m.data_ptr<scalar_t>(), *sp = run_s.data_ptr<scalar_t>();
    const scalar_t *tp = run_t.data_ptr<scalar_t>(), *ztp = z_id.data_ptr<scalar_t>();
    scalar_t *lp = lse.data_ptr<scalar_t>(), *gp = logp.data_ptr<scalar_t>();
    scalar_t* ep = with_entropy ? entropy.data_ptr<scalar_t>() : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      // Kept apart from the max, as in row_token_stats, so large logits keep their precision.
      const scalar_t log_sum = std::log(sp[r]);
      lp[r] = mp[r] + log_sum;
      gp[r] = (ztp[r] - mp[r]) - log_sum;
      if (ep) ep[r] = log_sum - tp[r] / sp[r];
    }
  });
  return {logp, lse, entropy, keep ? tiles : at::Tensor()};
}

// The gradients of sum_r grad_logp[r] logp[r] + grad_entropy[r] entropy[r] by the same walk;
// `kept` (token_forward_pass's tiles, overwritten) spares recomputing those blocks.
std::tuple<at::Tensor, OptTensor, OptTensor> token_backward_pass(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, const at::Tensor& lse, const OptTensor& entropy,
    const at::Tensor& grad_logp, const OptTensor& grad_entropy, bool need_weight_grad,
    const at::Tensor& kept) {
  at::NoGradGuard no_grad;
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  const at::ScalarType acc = acc_type(hidden);
  const auto acc_opts = hidden.options().dtype(acc);
  const bool use_entropy = grad_entropy.has_value();
  const bool want_bias = need_weight_grad && bias.has_value();
  at::Tensor grad_h = at::zeros({n, d}, acc_opts);
  at::Tensor grad_w = need_weight_grad ? at::empty({vocab, d}, acc_opts) : at::Tensor();
  at::Tensor grad_b = want_bias ? at::zeros({vocab}, acc_opts) : at::Tensor();
  // Kept tiles fix the tiling the forward used.
  const int64_t k = kept.defined() ? kept.size(0) : 0;
  const int64_t rc = kept.defined() ? kept.size(1) : token_rows(n);
  const int64_t vb = kept.defined() ? kept.size(2) : std::min(vocab_block(), vocab);
  at::Tensor tiles = kept.defined() ? kept : at::empty({1, rc, vb}, acc_opts);
  const int64_t blocks = (vocab + vb - 1) / vb, last_r0 = n > 0 ? (n - 1) / rc * rc : 0;
  // With kept tiles the last row chunk goes first, its kept blocks before the others, so tile 0
  // is free for recomputing by the time a block needs it.
  std::vector<int64_t> chunk_order, block_order;
  if (k > 0) chunk_order.push_back(last_r0);
  for (int64_t r0 = 0; r0 < n; r0 += rc) {
    if (k == 0 || r0 != last_r0) chunk_order.push_back(r0);
  }
  const int64_t* ip = ids.data_ptr<int64_t>();
  bool first_chunk = true;
  for (const int64_t r0 : chunk_order) {
    const int64_t r1 = std::min(n, r0 + rc), rows = r1 - r0;
    const bool last = r0 == last_r0;
    const int64_t skip = last ? k : 0;
    block_order.clear();
    for (int64_t b = blocks - skip; b < blocks; ++b) block_order.push_back(b);
    for (int64_t b = 0; b < blocks - skip; ++b) block_order.push_back(b);
    const at::Tensor h32 = as_acc(hidden.slice(0, r0, r1), acc);
    at::Tensor gh = grad_h.slice(0, r0, r1);
    for (const int64_t b : block_order) {
      const int64_t v0 = b * vb, v1 = std::min(vocab, v0 + vb), bw = v1 - v0;
      const at::Tensor w32 = as_acc(weight.slice(0, v0, v1), acc);
      at::Tensor z = tile_view(tiles, tile_slot(last, b, blocks, k), rows, bw);
      if (b < blocks - skip) block_logits(z, h32, w32, bias, v0, v1, scale);
      AT_DISPATCH_FLOATING_TYPES(acc, "token_backward_pass", [&] {
        scalar_t* zp = z.data_ptr<scalar_t>();
        const scalar_t *lp = lse.data_ptr<scalar_t>() + r0, *gp = grad_logp.data_ptr<scalar_t>() + r0;
        const scalar_t* ep = use_entropy ? entropy->data_ptr<scalar_t>() + r0 : nullptr;
        const scalar_t* gep = use_entropy ? grad_entropy->data_ptr<scalar_t>() + r0 : nullptr;
        for_rows(rows, [&](int64_t r) {
          row_token_grad<scalar_t>(zp + r * bw, bw, ip[r0 + r] - v0, lp[r], ep ? ep[r] : 0,
                                   gp[r], gep ? gep[r] : 0, static_cast<scalar_t>(scale));
        });
      });
      gh.addmm_(z, w32);
      if (grad_w.defined()) {
        at::Tensor gw = grad_w.slice(0, v0, v1);
        if (first_chunk) {
          at::mm_out(gw, z.t(), h32);
        } else {
          gw.addmm_(z.t(), h32);
        }
      }
      if (grad_b.defined()) grad_b.slice(0, v0, v1).add_(z.sum(0));
    }
    first_chunk = false;
  }
  // No rows: nothing wrote grad_weight, whose gradient is zero.
  if (first_chunk && grad_w.defined()) grad_w.zero_();
  OptTensor out_w, out_b;
  if (need_weight_grad) out_w = grad_w.to(weight.scalar_type());
  if (want_bias) out_b = grad_b.to(bias->scalar_type());
  return {grad_h.to(hidden.scalar_type()), out_w, out_b};
}

void check_token_backward_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                                 const OptTensor& bias, const at::Tensor& ids, double scale,
                                 const at::Tensor& lse, const OptTensor& entropy,
                                 const at::Tensor& grad_logp, const OptTensor& grad_entropy,
                                 const char* op) {
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  const int64_t n = hidden.size(0);
  const at::ScalarType acc = acc_type(hidden);
  check_row_vector(lse, n, acc, op, "lse");
  check_row_vector(grad_logp, n, acc, op, "grad_logp");
  if (grad_entropy.has_value()) {
    check_row_vector(*grad_entropy, n, acc, op, "grad_entropy");
    TORCH_CHECK_VALUE(entropy.has_value(), op,
                      ": grad_entropy was given without the entropy saved by the forward; "
                      "run token_scores_forward with with_entropy=True");
  }
  if (entropy.has_value()) check_row_vector(*entropy, n, acc, op, "entropy");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, OptTensor> token_scores_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, bool with_entropy) {
  check_token_inputs(hidden, weight, bias, ids, scale, "token_scores_forward");
  auto [logp, lse, entropy, kept] =
      token_forward_pass(hidden, weight, bias, ids, scale, with_entropy, false);
  return {logp, lse, with_entropy ? OptTensor(entropy) : OptTensor()};
}

// token_scores_forward that also returns the logits it keeps for token_scores_backward_kept.
std::tuple<at::Tensor, at::Tensor, OptTensor, at::Tensor> token_scores_forward_keep(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, bool with_entropy) {
  check_token_inputs(hidden, weight, bias, ids, scale, "token_scores_forward_keep");
  auto [logp, lse, entropy, kept] =
      token_forward_pass(hidden, weight, bias, ids, scale, with_entropy, true);
  return {logp, lse, with_entropy ? OptTensor(entropy) : OptTensor(), kept};
}

std::tuple<at::Tensor, OptTensor, OptTensor> token_scores_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, const at::Tensor& lse, const OptTensor& entropy,
    const at::Tensor& grad_logp, const OptTensor& grad_entropy, bool need_weight_grad) {
  check_token_backward_inputs(hidden, weight, bias, ids, scale, lse, entropy, grad_logp,
                              grad_entropy, "token_scores_backward");
  return token_backward_pass(hidden, weight, bias, ids, scale, lse, entropy, grad_logp,
                             grad_entropy, need_weight_grad, at::Tensor());
}

// token_scores_backward from token_scores_forward_keep's kept logits (overwritten: use once).
std::tuple<at::Tensor, OptTensor, OptTensor> token_scores_backward_kept(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, const at::Tensor& lse, const OptTensor& entropy,
    const at::Tensor& grad_logp, const OptTensor& grad_entropy, bool need_weight_grad,
    const at::Tensor& kept) {
  const char* op = "token_scores_backward_kept";
  check_token_backward_inputs(hidden, weight, bias, ids, scale, lse, entropy, grad_logp,
                              grad_entropy, op);
  check_cpu_contiguous(kept, op, "kept");
  TORCH_CHECK_VALUE(kept.dim() == 3 && kept.scalar_type() == acc_type(hidden) &&
                        kept.size(0) >= 1 && kept.size(1) >= 1 && kept.size(2) >= 1 &&
                        kept.size(2) <= weight.size(0) &&
                        kept.size(0) <= (weight.size(0) + kept.size(2) - 1) / kept.size(2),
                    op, ": kept must be the tiles token_scores_forward_keep returned, got ",
                    shape_of(kept));
  return token_backward_pass(hidden, weight, bias, ids, scale, lse, entropy, grad_logp,
                             grad_entropy, need_weight_grad, kept);
}

// The policy loss's gradient-in-forward steps (kernels/policy_loss.py): the loss's per-token
// weights d loss / d logp come from PyTorch code between these two calls, so the chunk's logits
// wait in the caller's buffer `logits` [rows, V] (accumulation dtype).
std::tuple<at::Tensor, at::Tensor, OptTensor> token_scores_chunk_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, bool with_entropy, at::Tensor logits) {
  const char* op = "token_scores_chunk_forward";
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType acc = acc_type(hidden);
  check_acc_matrix(logits, n, vocab, acc, op, "logits");
  at::NoGradGuard no_grad;
  const auto acc_opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n}, acc_opts), lse = at::empty({n}, acc_opts);
  at::Tensor entropy = with_entropy ? at::empty({n}, acc_opts) : at::Tensor();
  chunk_token_stats(logits, as_acc(hidden, acc), weight, bias, ids, scale, lse, logp, entropy);
  return {logp, lse, with_entropy ? OptTensor(entropy) : OptTensor()};
}

void token_scores_chunk_backward(at::Tensor logits, const at::Tensor& hidden,
                                 const at::Tensor& weight, const OptTensor& bias,
                                 const at::Tensor& ids, double scale, const at::Tensor& lse,
                                 const at::Tensor& grad_logp, const at::Tensor& grad_hidden,
                                 const OptTensor& grad_weight, const OptTensor& grad_bias) {
  const char* op = "token_scores_chunk_backward";
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  const at::ScalarType acc = acc_type(hidden);
  check_acc_matrix(logits, n, vocab, acc, op, "logits");
  check_acc_matrix(grad_hidden, n, d, acc, op, "grad_hidden");
  check_row_vector(lse, n, acc, op, "lse");
  check_row_vector(grad_logp, n, acc, op, "grad_logp");
  if (grad_weight.has_value()) check_acc_matrix(*grad_weight, vocab, d, acc, op, "grad_weight");
  if (grad_bias.has_value()) check_row_vector(*grad_bias, vocab, acc, op, "grad_bias");
  at::NoGradGuard no_grad;
  chunk_token_grads(logits, as_acc(hidden, acc), weight, ids, scale, lse, at::Tensor(),
                    grad_logp, at::Tensor(), grad_hidden,
                    grad_weight.has_value() ? *grad_weight : at::Tensor(),
                    grad_bias.has_value() ? *grad_bias : at::Tensor());
}

// ---------------------------------------------------------------------------------------------
// Distillation.

namespace {

Kind parse_kind(const std::string& kind, const char* op) {
  if (kind == "forward_kl") return Kind::ForwardKl;
  if (kind == "reverse_kl") return Kind::ReverseKl;
  if (kind == "jsd") return Kind::Jsd;
  TORCH_CHECK_VALUE(false, op, ": kind must be 'forward_kl', 'reverse_kl' or 'jsd', got '", kind,
                    "'");
  return Kind::ForwardKl;
}

void check_distill_inputs(const at::Tensor& s_hidden, const at::Tensor& s_weight,
                          const at::Tensor& t_hidden, const at::Tensor& t_weight,
                          double temperature, Kind kind, double jsd_beta, const char* op) {
  check_matrix(s_hidden, op, "s_hidden");
  check_matrix(s_weight, op, "s_weight");
  check_matrix(t_hidden, op, "t_hidden");
  check_matrix(t_weight, op, "t_weight");
  TORCH_CHECK_TYPE(s_weight.scalar_type() == s_hidden.scalar_type(), op,
                   ": s_weight and s_hidden must share a dtype, got ", s_weight.scalar_type(),
                   " and ", s_hidden.scalar_type());
  TORCH_CHECK_TYPE(t_weight.scalar_type() == t_hidden.scalar_type(), op,
                   ": t_weight and t_hidden must share a dtype, got ", t_weight.scalar_type(),
                   " and ", t_hidden.scalar_type());
  TORCH_CHECK_VALUE(s_weight.size(1) == s_hidden.size(1), op, ": s_weight ",
                    shape_of(s_weight), " and s_hidden ", shape_of(s_hidden),
                    " disagree on the student hidden size");
  TORCH_CHECK_VALUE(t_weight.size(1) == t_hidden.size(1), op, ": t_weight ",
                    shape_of(t_weight), " and t_hidden ", shape_of(t_hidden),
                    " disagree on the teacher hidden size");
  TORCH_CHECK_VALUE(s_hidden.size(0) == t_hidden.size(0), op, ": s_hidden has ",
                    s_hidden.size(0), " rows but t_hidden has ", t_hidden.size(0),
                    "; student and teacher must score the same tokens");
  TORCH_CHECK_VALUE(s_weight.size(0) == t_weight.size(0), op, ": student vocabulary ",
                    s_weight.size(0), " != teacher vocabulary ", t_weight.size(0),
                    "; the two LM heads must share a vocabulary");
  TORCH_CHECK_VALUE(s_weight.size(0) > 0, op, ": the weights have an empty vocabulary");
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be finite and > 0, got ", temperature);
  if (kind == Kind::Jsd) {
    TORCH_CHECK_VALUE(jsd_beta > 0.0 && jsd_beta < 1.0, op,
                      ": jsd_beta must lie strictly between 0 and 1, got ", jsd_beta);
  }
}

struct DistillResult {
  at::Tensor loss, s_lse, t_lse, grad_h, grad_w;
};

// The one pass of every distillation op over row chunks: per-row loss and log-sum-exps and,
// when row_scale [N] is defined, the student's gradients of sum_r row_scale[r] * loss[r]
// (grad_w only with need_weight_grad). Log-sum-exps passed in (the recompute backward's) are
// used instead of computed.
DistillResult distill_pass(const at::Tensor& s_hidden, const at::Tensor& s_weight,
                           const at::Tensor& t_hidden, const at::Tensor& t_weight,
                           double temperature, Kind kind, double jsd_beta,
                           const at::Tensor& row_scale, bool need_weight_grad,
                           const at::Tensor& s_lse_in, const at::Tensor& t_lse_in) {
  at::NoGradGuard no_grad;
  const int64_t n = s_hidden.size(0), ds = s_hidden.size(1), vocab = s_weight.size(0);
  const double inv_t = 1.0 / temperature;
  const at::ScalarType acc = acc_type(s_hidden);
  const auto acc_opts = s_hidden.options().dtype(acc);
  const bool grads = row_scale.defined(), have_lse = s_lse_in.defined();
  DistillResult out;
  out.loss = at::empty({n}, acc_opts);
  out.s_lse = have_lse ? s_lse_in : at::empty({n}, acc_opts);
  out.t_lse = have_lse ? t_lse_in : at::empty({n}, acc_opts);
  if (grads) out.grad_h = at::empty({n, ds}, acc_opts);
  if (grads && need_weight_grad) out.grad_w = at::zeros({vocab, ds}, acc_opts);
  const int64_t rc = std::min(chunk_rows(vocab), n);
  at::Tensor s_tile = at::empty({rc, vocab}, acc_opts), t_tile = at::empty({rc, vocab}, acc_opts);
  for (int64_t r0 = 0; r0 < n; r0 += rc) {
    const int64_t r1 = std::min(n, r0 + rc);
    at::Tensor zs = s_tile.slice(0, 0, r1 - r0), zt = t_tile.slice(0, 0, r1 - r0);
    at::Tensor hs32 = as_acc(s_hidden.slice(0, r0, r1), acc);
    chunk_logits(zs, hs32, s_weight, c10::nullopt, inv_t);
    chunk_logits(zt, as_acc(t_hidden.slice(0, r0, r1), acc), t_weight, c10::nullopt, inv_t);
    AT_DISPATCH_FLOATING_TYPES(acc, "distill_pass", [&] {
      scalar_t *zsp = zs.data_ptr<scalar_t>(), *ztp = zt.data_ptr<scalar_t>();
      scalar_t* lossp = out.loss.data_ptr<scalar_t>() + r0;
      scalar_t* slp = out.s_lse.data_ptr<scalar_t>() + r0;
      scalar_t* tlp = out.t_lse.data_ptr<scalar_t>() + r0;
      const scalar_t* scp = grads ? row_scale.data_ptr<scalar_t>() + r0 : nullptr;
      for_rows(r1 - r0, [&](int64_t r) {
        scalar_t* zr = zsp + r * vocab;
        scalar_t* tr = ztp + r * vocab;
        RowLse<scalar_t> ls{slp[r], 0}, lt{tlp[r], 0};
        if (!have_lse) {
          ls = row_lse(zr, vocab);
          lt = row_lse(tr, vocab);
          slp[r] = ls.max + ls.log_sum;
          tlp[r] = lt.max + lt.log_sum;
        }
        const scalar_t c = scp ? static_cast<scalar_t>(scp[r] * inv_t) : scalar_t(0);
        const scalar_t loss = row_distill(zr, tr, vocab, kind, static_cast<scalar_t>(jsd_beta),
                                          ls, lt, c);
        // Rounding can leave a divergence of identical distributions a hair below zero.
        lossp[r] = std::max(loss, scalar_t(0));
      });
    });
    if (grads) chunk_grad_gemms(zs, hs32, s_weight, out.grad_h.slice(0, r0, r1), out.grad_w,
                                at::Tensor());
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward(
    const at::Tensor& s_hidden, const at::Tensor& s_weight, const at::Tensor& t_hidden,
    const at::Tensor& t_weight, double temperature, const std::string& kind_name,
    double jsd_beta) {
  const char* op = "distill_forward";
  const Kind kind = parse_kind(kind_name, op);
  check_distill_inputs(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, op);
  DistillResult r = distill_pass(s_hidden, s_weight, t_hidden, t_weight, temperature, kind,
                                 jsd_beta, at::Tensor(), false, at::Tensor(), at::Tensor());
  return {r.loss, r.s_lse, r.t_lse};
}

std::tuple<at::Tensor, OptTensor> distill_backward(
    const at::Tensor& s_hidden, const at::Tensor& s_weight, const at::Tensor& t_hidden,
    const at::Tensor& t_weight, double temperature, const std::string& kind_name, double jsd_beta,
    const at::Tensor& s_lse, const at::Tensor& t_lse, const at::Tensor& grad_rows,
    bool need_weight_grad) {
  const char* op = "distill_backward";
  const Kind kind = parse_kind(kind_name, op);
  check_distill_inputs(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, op);
  const int64_t n = s_hidden.size(0);
  const at::ScalarType acc = acc_type(s_hidden);
  check_row_vector(s_lse, n, acc, op, "s_lse");
  check_row_vector(t_lse, n, acc, op, "t_lse");
  check_row_vector(grad_rows, n, acc, op, "grad_rows");
  DistillResult r = distill_pass(s_hidden, s_weight, t_hidden, t_weight, temperature, kind,
                                 jsd_beta, grad_rows, need_weight_grad, s_lse, t_lse);
  OptTensor out_w;
  if (need_weight_grad) out_w = r.grad_w.to(s_weight.scalar_type());
  return {r.grad_h.to(s_hidden.scalar_type()), out_w};
}

// Gradient-in-forward for the scalar losses (reduction mean/sum): grad_scale * sum(loss_rows)
// and its gradients in one pass, eager PyTorch's GEMM count.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, OptTensor> distill_fused(
    const at::Tensor& s_hidden, const at::Tensor& s_weight, const at::Tensor& t_hidden,
    const at::Tensor& t_weight, double temperature, const std::string& kind_name,
    double jsd_beta, double grad_scale, bool need_weight_grad) {
  const char* op = "distill_fused";
  const Kind kind = parse_kind(kind_name, op);
  check_distill_inputs(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, op);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ",
                    grad_scale);
  at::Tensor row_scale = at::full({s_hidden.size(0)}, grad_scale,
                                  s_hidden.options().dtype(acc_type(s_hidden)));
  DistillResult r = distill_pass(s_hidden, s_weight, t_hidden, t_weight, temperature, kind,
                                 jsd_beta, row_scale, need_weight_grad, at::Tensor(),
                                 at::Tensor());
  OptTensor out_w;
  if (need_weight_grad) out_w = r.grad_w.to(s_weight.scalar_type());
  return {r.loss, r.s_lse, r.t_lse, r.grad_h.to(s_hidden.scalar_type()), out_w};
}

void set_tile_sizes(int64_t rows, int64_t vocab) {
  TORCH_CHECK_VALUE(rows >= 0 && vocab > 0,
                    "set_tile_sizes: rows must be >= 0 (0: automatic) and vocab positive, got ",
                    rows, " and ", vocab);
  g_rows_chunk.store(rows);
  g_vocab_block.store(vocab);
}

std::tuple<int64_t, int64_t> get_tile_sizes() {
  return {g_rows_chunk.load(), g_vocab_block.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rba native CPU ops: fused linear token scores and distillation loss";
  m.attr("ABI_VERSION") = kAbiVersion;
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("token_scores_forward", &token_scores_forward, release(), py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("ids"), py::arg("scale"),
        py::arg("with_entropy"));
  m.def("token_scores_backward", &token_scores_backward, release(), py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("ids"), py::arg("scale"), py::arg("lse"),
        py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
        py::arg("need_weight_grad"));
  m.def("token_scores_forward_keep", &token_scores_forward_keep, release(), py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("ids"), py::arg("scale"),
        py::arg("with_entropy"));
  m.def("token_scores_backward_kept", &token_scores_backward_kept, release(), py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("ids"), py::arg("scale"), py::arg("lse"),
        py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
        py::arg("need_weight_grad"), py::arg("kept"));
  m.def("distill_forward", &distill_forward, release(), py::arg("s_hidden"),
        py::arg("s_weight"), py::arg("t_hidden"), py::arg("t_weight"), py::arg("temperature"),
        py::arg("kind"), py::arg("jsd_beta"));
  m.def("distill_backward", &distill_backward, release(), py::arg("s_hidden"),
        py::arg("s_weight"), py::arg("t_hidden"), py::arg("t_weight"), py::arg("temperature"),
        py::arg("kind"), py::arg("jsd_beta"), py::arg("s_lse"), py::arg("t_lse"),
        py::arg("grad_rows"), py::arg("need_weight_grad"));
  m.def("token_scores_chunk_forward", &token_scores_chunk_forward, release(), py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("ids"), py::arg("scale"),
        py::arg("with_entropy"), py::arg("logits"));
  m.def("token_scores_chunk_backward", &token_scores_chunk_backward, release(),
        py::arg("logits"), py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("ids"), py::arg("scale"), py::arg("lse"), py::arg("grad_logp"),
        py::arg("grad_hidden"), py::arg("grad_weight"), py::arg("grad_bias"));
  m.def("distill_fused", &distill_fused, release(), py::arg("s_hidden"), py::arg("s_weight"),
        py::arg("t_hidden"), py::arg("t_weight"), py::arg("temperature"), py::arg("kind"),
        py::arg("jsd_beta"), py::arg("grad_scale"), py::arg("need_weight_grad"));
  m.def("chunk_rows", &chunk_rows, py::arg("vocab"),
        "Rows per chunk of the ops for a vocabulary of `vocab` entries.");
  m.def("set_tile_sizes", &set_tile_sizes, py::arg("rows"), py::arg("vocab"),
        "Rows per chunk (0: automatic) and vocabulary entries per 16-bit weight conversion "
        "block (process-wide).");
  m.def("get_tile_sizes", &get_tile_sizes);
}
