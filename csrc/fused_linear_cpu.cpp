// Native CPU ops for rba's fused linear token scores and distillation loss.
//
// Semantics and signatures follow /work/notes/KERNELS_CONTRACT.md (mirrored in
// kernels/native.py). Every op walks rows in chunks and the vocabulary in blocks: the largest
// temporary is one [rows_chunk, vocab_block] logits tile (fp32; fp64 for fp64 inputs), computed
// with at::mm / at::addmm
// so BLAS does the heavy lifting, and the log-sum-exp is accumulated online across blocks. The
// backward ops recompute the tiles from the saved log-sum-exp(s) instead of keeping [N, V].
//
// Threading: one OpenMP region per op (at::parallel_for over torch's intra-op threads), in which
// workers pull whole work items from a shared counter and run each tile's GEMMs and element-wise
// ops single-threaded. A forward item is a row chunk swept over the whole vocabulary; a backward
// item is a vocabulary block swept over all rows, so its rows of grad_weight (and grad_bias)
// have exactly one writer, while grad_hidden is summed from one fp32 buffer per worker. There
// are no barriers inside the region, which matters on a shared machine where a descheduled
// thread would stall every other thread at each barrier. Because items are handed out
// dynamically, grad_hidden may differ between runs in the last bits (summation order).
//
// Built two ways, both from this file: by setup.py as the extension `rba_core._C`, or just in
// time by kernels/native.py as `rba_native`; TORCH_EXTENSION_NAME names the module in each case.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace {

// Bumped whenever an op's signature or meaning changes, so kernels/native.py can refuse a stale
// prebuilt module and rebuild from source instead.
constexpr int64_t kAbiVersion = 2;

std::atomic<int64_t> g_rows_chunk{256};
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

// One logits tile z = (h @ W[v0:v1].T + b[v0:v1]) * scale in h32's (accumulation) dtype; also
// returns that block of W in the same dtype so the backward can reuse it for grad_hidden.
std::pair<at::Tensor, at::Tensor> logits_tile(const at::Tensor& h32, const at::Tensor& weight,
                                              const OptTensor& bias, int64_t v0, int64_t v1,
                                              double scale) {
  at::Tensor w32 = as_acc(weight.slice(0, v0, v1), h32.scalar_type());
  at::Tensor z;
  if (bias.has_value()) {
    z = at::addmm(as_acc(bias->slice(0, v0, v1), h32.scalar_type()), h32, w32.t(), scale, scale);
  } else {
    z = at::mm(h32, w32.t());
    if (scale != 1.0) z.mul_(scale);
  }
  return {z, w32};
}

// tgt[r] = z[r, ids[r] - v0] for rows whose id falls in this vocabulary block.
void gather_targets(const at::Tensor& z, const at::Tensor& ids, int64_t v0, at::Tensor& tgt) {
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t width = z.size(1), stride = z.stride(0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gather_targets", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* tp = tgt.data_ptr<scalar_t>();
    for (int64_t r = 0; r < z.size(0); ++r) {
      const int64_t c = ip[r] - v0;
      if (c >= 0 && c < width) tp[r] = zp[r * stride + c];
    }
  });
}

// dz[r, ids[r] - v0] += add[r] for rows whose id falls in this vocabulary block.
void scatter_add_targets(at::Tensor& dz, const at::Tensor& ids, int64_t v0,
                         const at::Tensor& add) {
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t width = dz.size(1), stride = dz.stride(0);
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "scatter_add_targets", [&] {
    scalar_t* dp = dz.data_ptr<scalar_t>();
    const scalar_t* ap = add.data_ptr<scalar_t>();
    for (int64_t r = 0; r < dz.size(0); ++r) {
      const int64_t c = ip[r] - v0;
      if (c >= 0 && c < width) dp[r * stride + c] += ap[r];
    }
  });
}

// Online log-sum-exp state of a row chunk: lse = m + log(s).
struct OnlineLse {
  at::Tensor m, s;
  bool started = false;

  // Folds in one tile; returns the factor exp(m_old - m_new) that rescales other running sums
  // (undefined on the first tile) and leaves `z` shifted in place to z - m_new.
  at::Tensor update(at::Tensor& z, at::Tensor& e) {
    at::Tensor bm = z.amax(1);
    at::Tensor alpha;
    if (!started) {
      m = bm;
      z.sub_(m.unsqueeze(1));
      e = z.exp();
      s = e.sum(1);
      started = true;
      return alpha;
    }
    at::Tensor m_new = at::maximum(m, bm);
    alpha = (m - m_new).exp_();
    z.sub_(m_new.unsqueeze(1));
    e = z.exp();
    s.mul_(alpha).add_(e.sum(1));
    m = m_new;
    return alpha;
  }

  at::Tensor lse() const { return m + s.log(); }
};

int64_t rows_chunk() { return std::max<int64_t>(1, g_rows_chunk.load()); }
int64_t vocab_block() { return std::max<int64_t>(1, g_vocab_block.load()); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile extent along a dimension of `total` split over `workers` threads: at most `cap`, but
// small enough to give each thread about four work items so none sits idle at the end.
int64_t split_extent(int64_t total, int64_t workers, int64_t cap) {
  const int64_t even = ceil_div(total, 4 * std::max<int64_t>(workers, 1));
  return std::max<int64_t>(1, std::min(cap, std::max<int64_t>(even, std::min<int64_t>(cap, 64))));
}

// Runs fn(item, slot) for every item in [0, n_items) on torch's intra-op threads. Items are
// handed out one at a time from a shared counter, so a thread descheduled on a busy machine
// does not leave the others waiting on its share; `slot` (< workers) numbers the calling worker
// for per-worker buffers. Inside, ATen ops and BLAS run single-threaded (the OpenMP region is
// not nested), so each tile's work has no barriers of its own.
template <typename F>
void parallel_items(int64_t n_items, int64_t workers, const F& fn) {
  std::atomic<int64_t> next{0}, slots{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Grad mode is thread-local: worker threads start with it on.
    at::NoGradGuard no_grad;
    const int64_t slot = slots++;
    for (int64_t i = next++; i < n_items; i = next++) fn(i, slot);
  });
}

int64_t num_workers(int64_t n_items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
}

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

}  // namespace

std::tuple<at::Tensor, at::Tensor, OptTensor> token_scores_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, bool with_entropy) {
  const char* op = "token_scores_forward";
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  at::NoGradGuard no_grad;
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const at::ScalarType acc = acc_type(hidden);
  const auto acc_opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n}, acc_opts), lse = at::empty({n}, acc_opts);
  at::Tensor entropy = with_entropy ? at::empty({n}, acc_opts) : at::Tensor();
  const int64_t rc = split_extent(n, at::get_num_threads(), rows_chunk());
  const int64_t vb = vocab_block();
  const int64_t n_chunks = ceil_div(n, rc);

  // Rows are independent, so each worker takes whole row chunks and sweeps the vocabulary.
  parallel_items(n_chunks, num_workers(n_chunks), [&](int64_t item, int64_t) {
    const int64_t r0 = item * rc, r1 = std::min(n, r0 + rc);
    at::Tensor h32 = as_acc(hidden.slice(0, r0, r1), acc);
    at::Tensor ids_c = ids.slice(0, r0, r1);
    at::Tensor tgt = at::zeros({r1 - r0}, acc_opts);
    // Running sum of exp(z - m) * (z - m): the entropy is log(s) - t / s, and keeping it
    // relative to the running max avoids cancelling two large numbers.
    at::Tensor t;
    OnlineLse acc;
    for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
      const int64_t v1 = std::min(vocab, v0 + vb);
      at::Tensor z = logits_tile(h32, weight, bias, v0, v1, scale).first;
      gather_targets(z, ids_c, v0, tgt);
      at::Tensor m_old = acc.started ? acc.m : at::Tensor();
      at::Tensor s_old = acc.started ? acc.s.clone() : at::Tensor();
      at::Tensor e;
      at::Tensor alpha = acc.update(z, e);
      if (with_entropy) {
        at::Tensor block_t = e.mul_(z).sum(1);
        if (!alpha.defined()) {
          t = block_t;
        } else {
          // Re-centre the old sum on the new max: sum e^(z-m')(z-m') =
          // e^(m-m') * (t + s * (m - m')).
          t = alpha * (t + s_old * (m_old - acc.m)) + block_t;
        }
      }
    }
    at::Tensor log_s = acc.s.log();
    at::Tensor lse_c = acc.m + log_s;
    lse.slice(0, r0, r1).copy_(lse_c);
    logp.slice(0, r0, r1).copy_(tgt - lse_c);
    if (with_entropy) entropy.slice(0, r0, r1).copy_(log_s - t / acc.s);
  });
  return {logp, lse, with_entropy ? OptTensor(entropy) : OptTensor()};
}

namespace {

// Sums the per-worker grad_hidden buffers (in worker order) into one fp32 tensor.
at::Tensor reduce_slots(std::vector<at::Tensor>& slots) {
  at::Tensor total;
  for (at::Tensor& part : slots) {
    if (!part.defined()) continue;
    if (!total.defined()) {
      total = part;
    } else {
      total.add_(part);
    }
  }
  return total;
}

}  // namespace

std::tuple<at::Tensor, OptTensor, OptTensor> token_scores_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, const at::Tensor& lse, const OptTensor& entropy,
    const at::Tensor& grad_logp, const OptTensor& grad_entropy, bool need_weight_grad) {
  const char* op = "token_scores_backward";
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  const at::ScalarType out_t = acc_type(hidden);
  check_row_vector(lse, n, out_t, op, "lse");
  check_row_vector(grad_logp, n, out_t, op, "grad_logp");
  if (grad_entropy.has_value()) {
    check_row_vector(*grad_entropy, n, out_t, op, "grad_entropy");
    TORCH_CHECK_VALUE(entropy.has_value(), op,
                      ": grad_entropy was given without the entropy saved by the forward; "
                      "run token_scores_forward with with_entropy=True");
  }
  if (entropy.has_value()) check_row_vector(*entropy, n, out_t, op, "entropy");
  at::NoGradGuard no_grad;
  const bool use_entropy = grad_entropy.has_value();
  const at::ScalarType acc = acc_type(hidden);
  const auto acc_opts = hidden.options().dtype(acc);
  at::Tensor grad_w = need_weight_grad ? at::zeros({vocab, d}, acc_opts) : at::Tensor();
  const bool want_bias = need_weight_grad && bias.has_value();
  at::Tensor grad_b = want_bias ? at::zeros({vocab}, acc_opts) : at::Tensor();
  const int64_t rc = rows_chunk();
  const int64_t vb = split_extent(vocab, at::get_num_threads(), vocab_block());
  const int64_t n_blocks = ceil_div(vocab, vb);
  const int64_t workers = num_workers(n_blocks);
  at::Tensor neg_gl = grad_logp.neg().unsqueeze(1);

  // Each worker owns whole vocabulary blocks, so it alone writes those rows of grad_weight and
  // grad_bias; grad_hidden, which every block touches, goes to a buffer per worker.
  std::vector<at::Tensor> grad_h_parts(workers);
  parallel_items(n_blocks, workers, [&](int64_t item, int64_t slot) {
    const int64_t v0 = item * vb, v1 = std::min(vocab, v0 + vb);
    at::Tensor& grad_h = grad_h_parts[slot];
    if (!grad_h.defined()) grad_h = at::zeros({n, d}, acc_opts);
    for (int64_t r0 = 0; r0 < n; r0 += rc) {
      const int64_t r1 = std::min(n, r0 + rc);
      at::Tensor h32 = as_acc(hidden.slice(0, r0, r1), acc);
      at::Tensor gl = grad_logp.slice(0, r0, r1);
      auto tile = logits_tile(h32, weight, bias, v0, v1, scale);
      at::Tensor z = tile.first.sub_(lse.slice(0, r0, r1).unsqueeze(1));  // log p
      at::Tensor dz = z.exp();                                              // p
      if (use_entropy) {
        // z_v - (lse - entropy) = log p_v + entropy, so
        // dz = -p * (grad_logp + grad_entropy * (log p + entropy)) (+ grad_logp at the id).
        z.add_(entropy->slice(0, r0, r1).unsqueeze(1))
            .mul_(grad_entropy->slice(0, r0, r1).unsqueeze(1))
            .add_(gl.unsqueeze(1));
        dz.mul_(z).neg_();
      } else {
        dz.mul_(neg_gl.slice(0, r0, r1));
      }
      scatter_add_targets(dz, ids.slice(0, r0, r1), v0, gl);
      if (scale != 1.0) dz.mul_(scale);
      grad_h.slice(0, r0, r1).addmm_(dz, tile.second);
      if (need_weight_grad) {
        grad_w.slice(0, v0, v1).addmm_(dz.t(), h32);
        if (want_bias) grad_b.slice(0, v0, v1).add_(dz.sum(0));
      }
    }
  });
  at::Tensor grad_h = reduce_slots(grad_h_parts);
  OptTensor out_w, out_b;
  if (need_weight_grad) out_w = grad_w.to(weight.scalar_type());
  if (want_bias) out_b = grad_b.to(bias->scalar_type());
  return {grad_h.to(hidden.scalar_type()), out_w, out_b};
}

namespace {

enum class Kind { ForwardKl, ReverseKl, Jsd };

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

// Per-tile log-probabilities of student and teacher from the known log-sum-exps.
struct DistillTile {
  at::Tensor lps, lpt, ws32;
};

DistillTile distill_tile(const at::Tensor& hs32, const at::Tensor& s_weight,
                         const at::Tensor& ht32, const at::Tensor& t_weight, double inv_t,
                         int64_t v0, int64_t v1, const at::Tensor& s_lse_c,
                         const at::Tensor& t_lse_c) {
  auto s = logits_tile(hs32, s_weight, c10::nullopt, v0, v1, inv_t);
  auto t = logits_tile(ht32, t_weight, c10::nullopt, v0, v1, inv_t);
  return {s.first.sub_(s_lse_c), t.first.sub_(t_lse_c), s.second};
}

// log M = log(beta * P_T + (1 - beta) * P_S), computed stably from the two log-probabilities.
at::Tensor log_mixture(const at::Tensor& lps, const at::Tensor& lpt, double beta) {
  return at::logaddexp(lpt + std::log(beta), lps + std::log1p(-beta));
}

// Per-row sum over one tile of the term whose row total is the loss (jsd) or the softmax
// correction c (reverse_kl, jsd backward).
at::Tensor jsd_tile_loss(const at::Tensor& lps, const at::Tensor& lpt, const at::Tensor& lm,
                         double beta) {
  at::Tensor a = lpt.exp().mul_(lpt - lm).mul_(beta);
  a.add_(lps.exp().mul_(lps - lm).mul_(1.0 - beta));
  return a.sum(1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_forward(
    const at::Tensor& s_hidden, const at::Tensor& s_weight, const at::Tensor& t_hidden,
    const at::Tensor& t_weight, double temperature, const std::string& kind_name,
    double jsd_beta) {
  const char* op = "distill_forward";
  const Kind kind = parse_kind(kind_name, op);
  check_distill_inputs(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, op);
  at::NoGradGuard no_grad;
  const int64_t n = s_hidden.size(0), vocab = s_weight.size(0);
  const double inv_t = 1.0 / temperature;
  const at::ScalarType acc = acc_type(s_hidden);
  const auto acc_opts = s_hidden.options().dtype(acc);
  at::Tensor loss = at::empty({n}, acc_opts), s_lse = at::empty({n}, acc_opts),
             t_lse = at::empty({n}, acc_opts);
  const int64_t rc = split_extent(n, at::get_num_threads(), rows_chunk());
  const int64_t vb = vocab_block();
  const int64_t n_chunks = ceil_div(n, rc);

  parallel_items(n_chunks, num_workers(n_chunks), [&](int64_t item, int64_t) {
    const int64_t r0 = item * rc, r1 = std::min(n, r0 + rc);
    at::Tensor hs32 = as_acc(s_hidden.slice(0, r0, r1), acc);
    at::Tensor ht32 = as_acc(t_hidden.slice(0, r0, r1), acc);
    OnlineLse acc_s, acc_t;
    // KL(P||Q) = sum_v e^(zp - mp) (zp - zq) / sp - lse_p + lse_q: the running sum only needs
    // rescaling when P's max moves, so both KL directions finish in this one pass.
    at::Tensor kl_sum;
    for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
      const int64_t v1 = std::min(vocab, v0 + vb);
      at::Tensor zs = logits_tile(hs32, s_weight, c10::nullopt, v0, v1, inv_t).first;
      at::Tensor zt = logits_tile(ht32, t_weight, c10::nullopt, v0, v1, inv_t).first;
      at::Tensor diff;
      if (kind == Kind::ForwardKl) diff = zt - zs;
      if (kind == Kind::ReverseKl) diff = zs - zt;
      at::Tensor es, et;
      at::Tensor alpha_s = acc_s.update(zs, es);
      at::Tensor alpha_t = acc_t.update(zt, et);
      if (kind == Kind::Jsd) continue;
      at::Tensor& e = kind == Kind::ForwardKl ? et : es;
      const at::Tensor& alpha = kind == Kind::ForwardKl ? alpha_t : alpha_s;
      at::Tensor block = e.mul_(diff).sum(1);
      kl_sum = alpha.defined() ? kl_sum.mul_(alpha).add_(block) : block;
    }
    at::Tensor s_lse_c = acc_s.lse(), t_lse_c = acc_t.lse();
    at::Tensor loss_c;
    if (kind == Kind::ForwardKl) {
      loss_c = kl_sum / acc_t.s - t_lse_c + s_lse_c;
    } else if (kind == Kind::ReverseKl) {
      loss_c = kl_sum / acc_s.s - s_lse_c + t_lse_c;
    } else {
      // The mixture M needs normalised probabilities, so JSD takes a second pass once both
      // log-sum-exps are known.
      loss_c = at::zeros({r1 - r0}, acc_opts);
      at::Tensor sl = s_lse_c.unsqueeze(1), tl = t_lse_c.unsqueeze(1);
      for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
        const int64_t v1 = std::min(vocab, v0 + vb);
        DistillTile tile = distill_tile(hs32, s_weight, ht32, t_weight, inv_t, v0, v1, sl, tl);
        loss_c.add_(jsd_tile_loss(tile.lps, tile.lpt, log_mixture(tile.lps, tile.lpt, jsd_beta),
                                  jsd_beta));
      }
    }
    // Rounding can leave a divergence of identical distributions a hair below zero.
    loss.slice(0, r0, r1).copy_(loss_c.clamp_min_(0.0));
    s_lse.slice(0, r0, r1).copy_(s_lse_c);
    t_lse.slice(0, r0, r1).copy_(t_lse_c);
  });
  return {loss, s_lse, t_lse};
}

std::tuple<at::Tensor, OptTensor> distill_backward(
    const at::Tensor& s_hidden, const at::Tensor& s_weight, const at::Tensor& t_hidden,
    const at::Tensor& t_weight, double temperature, const std::string& kind_name, double jsd_beta,
    const at::Tensor& s_lse, const at::Tensor& t_lse, const at::Tensor& grad_rows,
    bool need_weight_grad) {
  const char* op = "distill_backward";
  const Kind kind = parse_kind(kind_name, op);
  check_distill_inputs(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, op);
  const int64_t n = s_hidden.size(0), ds = s_hidden.size(1), vocab = s_weight.size(0);
  const at::ScalarType out_t = acc_type(s_hidden);
  check_row_vector(s_lse, n, out_t, op, "s_lse");
  check_row_vector(t_lse, n, out_t, op, "t_lse");
  check_row_vector(grad_rows, n, out_t, op, "grad_rows");
  at::NoGradGuard no_grad;
  const double inv_t = 1.0 / temperature;
  const at::ScalarType acc = acc_type(s_hidden);
  const auto acc_opts = s_hidden.options().dtype(acc);
  at::Tensor grad_w = need_weight_grad ? at::zeros({vocab, ds}, acc_opts) : at::Tensor();
  const int64_t threads = at::get_num_threads();
  const int64_t rc = rows_chunk(), vb = vocab_block();

  // dL/dz_s = p_s * (g - c) with g = dL/dp_s and c = sum_v p_s g. For reverse KL and JSD, c
  // depends on the whole row, so a first pass over row chunks finds it.
  at::Tensor c;
  if (kind != Kind::ForwardKl) {
    c = at::empty({n, 1}, acc_opts);
    const int64_t rc_c = split_extent(n, threads, rc);
    const int64_t n_chunks = ceil_div(n, rc_c);
    parallel_items(n_chunks, num_workers(n_chunks), [&](int64_t item, int64_t) {
      const int64_t r0 = item * rc_c, r1 = std::min(n, r0 + rc_c);
      at::Tensor hs32 = as_acc(s_hidden.slice(0, r0, r1), acc);
      at::Tensor ht32 = as_acc(t_hidden.slice(0, r0, r1), acc);
      at::Tensor sl = s_lse.slice(0, r0, r1).unsqueeze(1);
      at::Tensor tl = t_lse.slice(0, r0, r1).unsqueeze(1);
      at::Tensor c_chunk = c.slice(0, r0, r1);
      c_chunk.zero_();
      for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
        const int64_t v1 = std::min(vocab, v0 + vb);
        DistillTile tile = distill_tile(hs32, s_weight, ht32, t_weight, inv_t, v0, v1, sl, tl);
        at::Tensor g = kind == Kind::ReverseKl
                           ? tile.lps - tile.lpt
                           : (tile.lps - log_mixture(tile.lps, tile.lpt, jsd_beta))
                                 .mul_(1.0 - jsd_beta);
        c_chunk.add_(g.mul_(tile.lps.exp()).sum(1, true));
      }
    });
  }

  // Gradient pass: each worker owns whole vocabulary blocks (its rows of grad_weight) and keeps
  // its own grad_hidden buffer.
  const int64_t vb_g = split_extent(vocab, threads, vb);
  const int64_t n_blocks = ceil_div(vocab, vb_g);
  const int64_t workers = num_workers(n_blocks);
  at::Tensor row_scale = (grad_rows * inv_t).unsqueeze(1);
  std::vector<at::Tensor> grad_h_parts(workers);
  parallel_items(n_blocks, workers, [&](int64_t item, int64_t slot) {
    const int64_t v0 = item * vb_g, v1 = std::min(vocab, v0 + vb_g);
    at::Tensor& grad_h = grad_h_parts[slot];
    if (!grad_h.defined()) grad_h = at::zeros({n, ds}, acc_opts);
    for (int64_t r0 = 0; r0 < n; r0 += rc) {
      const int64_t r1 = std::min(n, r0 + rc);
      at::Tensor hs32 = as_acc(s_hidden.slice(0, r0, r1), acc);
      at::Tensor ht32 = as_acc(t_hidden.slice(0, r0, r1), acc);
      DistillTile tile = distill_tile(hs32, s_weight, ht32, t_weight, inv_t, v0, v1,
                                      s_lse.slice(0, r0, r1).unsqueeze(1),
                                      t_lse.slice(0, r0, r1).unsqueeze(1));
      at::Tensor ps = tile.lps.exp();
      at::Tensor dz;
      if (kind == Kind::ForwardKl) {
        dz = ps.sub_(tile.lpt.exp_());
      } else if (kind == Kind::ReverseKl) {
        dz = ps.mul_(tile.lps.sub_(tile.lpt).sub_(c.slice(0, r0, r1)));
      } else {
        at::Tensor lm = log_mixture(tile.lps, tile.lpt, jsd_beta);
        dz = ps.mul_(tile.lps.sub_(lm).mul_(1.0 - jsd_beta).sub_(c.slice(0, r0, r1)));
      }
      dz.mul_(row_scale.slice(0, r0, r1));
      grad_h.slice(0, r0, r1).addmm_(dz, tile.ws32);
      if (need_weight_grad) grad_w.slice(0, v0, v1).addmm_(dz.t(), hs32);
    }
  });
  at::Tensor grad_h = reduce_slots(grad_h_parts);
  OptTensor out_w;
  if (need_weight_grad) out_w = grad_w.to(s_weight.scalar_type());
  return {grad_h.to(s_hidden.scalar_type()), out_w};
}

// ---------------------------------------------------------------------------------------------
// Gradient-in-forward ops for scalar losses (policy loss; distillation with reduction mean/sum).
//
// When the caller's output is one scalar, the gradient with respect to every logit is known as
// soon as a row's log-sum-exp is, so the forward computes it right away, chunk by chunk over
// rows: one [rows, V] logits tile, its softmax statistics, dz in place, then
// grad_hidden[chunk] = dz @ W and grad_weight += dz^T @ h[chunk]. That is eager PyTorch's GEMM
// count (one logits GEMM, two gradient GEMMs) instead of the recompute backward's extra logits
// GEMM. These ops run outside any parallel region, so at::mm and the element-wise ATen ops use
// all intra-op threads; the caller picks the chunk so that a few tiles fit its memory budget.
namespace {

// [rows, V] logits (h W^T + b) * scale in h32's dtype. Weights already in that dtype go through
// one GEMM; 16-bit weights are converted one vocabulary block at a time (never a full copy).
at::Tensor chunk_logits(const at::Tensor& h32, const at::Tensor& weight, const OptTensor& bias,
                        double scale) {
  const int64_t vocab = weight.size(0);
  if (weight.scalar_type() == h32.scalar_type()) {
    return logits_tile(h32, weight, bias, 0, vocab, scale).first;
  }
  at::Tensor z = at::empty({h32.size(0), vocab}, h32.options());
  const int64_t vb = vocab_block();
  for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
    const int64_t v1 = std::min(vocab, v0 + vb);
    z.slice(1, v0, v1).copy_(logits_tile(h32, weight, bias, v0, v1, scale).first);
  }
  return z;
}

// Rows per element-wise step over a [rows, vocab] tile: contiguous row blocks of about one
// [rows_chunk, vocab_block] tile (21 rows at V = 49152 by default), so temporaries stay small
// and every element-wise op runs on contiguous memory.
int64_t sub_rows(int64_t vocab) {
  return std::max<int64_t>(1, rows_chunk() * vocab_block() / std::max<int64_t>(vocab, 1));
}

// In place, z becomes log softmax(z) row-wise; returns (lse [rows], entropy [rows] or undefined).
std::pair<at::Tensor, at::Tensor> log_softmax_rows_(at::Tensor& z, bool with_entropy) {
  const int64_t rows = z.size(0), step = sub_rows(z.size(1));
  at::Tensor lse = at::empty({rows}, z.options());
  at::Tensor entropy = with_entropy ? at::empty({rows}, z.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t r1 = std::min(rows, r0 + step);
    at::Tensor zb = z.slice(0, r0, r1);
    at::Tensor m = zb.amax(1, true);
    zb.sub_(m);
    at::Tensor e = zb.exp();
    at::Tensor s = e.sum(1, true);
    at::Tensor log_s = s.log();
    // Relative to the max, sum p (z - m) stays well scaled: entropy = log s - sum e (z - m) / s.
    if (with_entropy) {
      entropy.slice(0, r0, r1).copy_((log_s - e.mul_(zb).sum(1, true).div_(s)).squeeze(1));
    }
    zb.sub_(log_s);
    lse.slice(0, r0, r1).copy_((m + log_s).squeeze(1));
  }
  return {lse, entropy};
}

// grad_h_c = dz @ W (overwritten), grad_w += dz^T @ h32, grad_b += sum_rows dz (those defined).
void chunk_grad_gemms(const at::Tensor& dz, const at::Tensor& h32, const at::Tensor& weight,
                      at::Tensor grad_h_c, const at::Tensor& grad_w, const at::Tensor& grad_b) {
  const int64_t vocab = weight.size(0);
  if (weight.scalar_type() == dz.scalar_type()) {
    at::mm_out(grad_h_c, dz, weight);
    if (grad_w.defined()) grad_w.addmm_(dz.t(), h32);
  } else {
    grad_h_c.zero_();
    const int64_t vb = vocab_block();
    for (int64_t v0 = 0; v0 < vocab; v0 += vb) {
      const int64_t v1 = std::min(vocab, v0 + vb);
      at::Tensor dzb = dz.slice(1, v0, v1);
      grad_h_c.addmm_(dzb, as_acc(weight.slice(0, v0, v1), dz.scalar_type()));
      if (grad_w.defined()) grad_w.slice(0, v0, v1).addmm_(dzb.t(), h32);
    }
  }
  if (grad_b.defined()) grad_b.add_(dz.sum(0));
}

void check_acc_matrix(const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType acc,
                      const char* op, const char* name) {
  check_cpu_contiguous(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name,
                    " must have shape [", rows, ", ", cols, "], got ", shape_of(t));
  TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ",
                   t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, OptTensor, at::Tensor> token_scores_chunk_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const OptTensor& bias,
    const at::Tensor& ids, double scale, bool with_entropy) {
  const char* op = "token_scores_chunk_forward";
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  at::NoGradGuard no_grad;
  at::Tensor z = chunk_logits(as_acc(hidden, acc_type(hidden)), weight, bias, scale);
  auto stats = log_softmax_rows_(z, with_entropy);
  at::Tensor logp = z.gather(1, ids.unsqueeze(1)).squeeze(1);
  return {logp, stats.first, with_entropy ? OptTensor(stats.second) : OptTensor(), z};
}

void token_scores_chunk_backward(const at::Tensor& logp_tile, const at::Tensor& hidden,
                                 const at::Tensor& weight, const OptTensor& bias,
                                 const at::Tensor& ids, double scale,
                                 const at::Tensor& grad_logp, const at::Tensor& grad_hidden,
                                 const OptTensor& grad_weight, const OptTensor& grad_bias) {
  const char* op = "token_scores_chunk_backward";
  check_token_inputs(hidden, weight, bias, ids, scale, op);
  const int64_t n = hidden.size(0), d = hidden.size(1), vocab = weight.size(0);
  const at::ScalarType acc = acc_type(hidden);
  check_acc_matrix(logp_tile, n, vocab, acc, op, "logp_tile");
  check_acc_matrix(grad_hidden, n, d, acc, op, "grad_hidden");
  check_row_vector(grad_logp, n, acc, op, "grad_logp");
  if (grad_weight.has_value()) check_acc_matrix(*grad_weight, vocab, d, acc, op, "grad_weight");
  if (grad_bias.has_value()) check_row_vector(*grad_bias, vocab, acc, op, "grad_bias");
  at::NoGradGuard no_grad;
  at::Tensor gl = grad_logp.unsqueeze(1);
  // d/dz of sum_r g_r log p_r[id_r] is g_r (1[v = id_r] - p_v), built in the tile's storage.
  at::Tensor dz = logp_tile;
  dz.exp_().mul_(gl.neg());
  dz.scatter_add_(1, ids.unsqueeze(1), gl);
  if (scale != 1.0) dz.mul_(scale);
  chunk_grad_gemms(dz, as_acc(hidden, acc), weight, grad_hidden,
                   grad_weight.has_value() ? *grad_weight : at::Tensor(),
                   grad_bias.has_value() ? *grad_bias : at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, OptTensor> distill_fused(
    const at::Tensor& s_hidden, const at::Tensor& s_weight, const at::Tensor& t_hidden,
    const at::Tensor& t_weight, double temperature, const std::string& kind_name,
    double jsd_beta, double grad_scale, int64_t rows_per_chunk, bool need_weight_grad) {
  const char* op = "distill_fused";
  const Kind kind = parse_kind(kind_name, op);
  check_distill_inputs(s_hidden, s_weight, t_hidden, t_weight, temperature, kind, jsd_beta, op);
  TORCH_CHECK_VALUE(rows_per_chunk > 0, op, ": rows_per_chunk must be positive, got ",
                    rows_per_chunk);
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), op, ": grad_scale must be finite, got ",
                    grad_scale);
  at::NoGradGuard no_grad;
  const int64_t n = s_hidden.size(0), ds = s_hidden.size(1), vocab = s_weight.size(0);
  const double inv_t = 1.0 / temperature;
  const at::ScalarType acc = acc_type(s_hidden);
  const auto acc_opts = s_hidden.options().dtype(acc);
  at::Tensor loss = at::empty({n}, acc_opts), s_lse = at::empty({n}, acc_opts),
             t_lse = at::empty({n}, acc_opts);
  at::Tensor grad_h = at::empty({n, ds}, acc_opts);
  at::Tensor grad_w = need_weight_grad ? at::zeros({vocab, ds}, acc_opts) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows_per_chunk) {
    const int64_t r1 = std::min(n, r0 + rows_per_chunk);
    at::Tensor hs32 = as_acc(s_hidden.slice(0, r0, r1), acc);
    at::Tensor lps = chunk_logits(hs32, s_weight, c10::nullopt, inv_t);
    s_lse.slice(0, r0, r1).copy_(log_softmax_rows_(lps, false).first);
    at::Tensor lpt = chunk_logits(as_acc(t_hidden.slice(0, r0, r1), acc), t_weight,
                                  c10::nullopt, inv_t);
    t_lse.slice(0, r0, r1).copy_(log_softmax_rows_(lpt, false).first);
    // dL/dz_s = p_s * (g - c) / T with g = dL/dlog p_s and c = sum_v p_s g (softmax Jacobian).
    // The two log-prob tiles are the only [rows, V] buffers: the steps below go one contiguous
    // block of whole rows at a time and leave dz in the student's tile.
    const int64_t rows = r1 - r0, step = sub_rows(vocab);
    at::Tensor loss_c = at::empty({rows, 1}, acc_opts);
    for (int64_t b0 = 0; b0 < rows; b0 += step) {
      const int64_t b1 = std::min(rows, b0 + step);
      at::Tensor sb = lps.slice(0, b0, b1), tb = lpt.slice(0, b0, b1);
      at::Tensor loss_b = loss_c.slice(0, b0, b1);
      if (kind == Kind::ForwardKl) {
        at::Tensor pt = tb.exp();
        loss_b.copy_((tb - sb).mul_(pt).sum(1, true));
        sb.exp_().sub_(pt);
      } else if (kind == Kind::ReverseKl) {
        tb.sub_(sb).neg_();  // g = log p_s - log p_t
        sb.exp_();           // p_s
        loss_b.copy_(at::mul(sb, tb).sum(1, true));
        tb.sub_(loss_b);     // c = the row's loss
        sb.mul_(tb);
      } else {
        at::Tensor lm = log_mixture(sb, tb, jsd_beta);
        at::Tensor pt = tb.exp();
        tb.sub_(lm);
        at::Tensor teacher_part = pt.mul_(tb).sum(1, true).mul_(jsd_beta);
        pt.reset();
        tb.copy_(sb).sub_(lm);  // log p_s - log M
        lm.reset();
        sb.exp_();              // p_s
        at::Tensor c = at::mul(sb, tb).sum(1, true).mul_(1.0 - jsd_beta);
        loss_b.copy_(teacher_part.add_(c));
        tb.mul_(1.0 - jsd_beta).sub_(c);
        sb.mul_(tb);
      }
    }
    lpt.reset();
    at::Tensor dz = lps;
    dz.mul_(grad_scale * inv_t);
    chunk_grad_gemms(dz, hs32, s_weight, grad_h.slice(0, r0, r1), grad_w, at::Tensor());
    // Rounding can leave a divergence of identical distributions a hair below zero.
    loss.slice(0, r0, r1).copy_(loss_c.squeeze(1).clamp_min_(0.0));
  }
  OptTensor out_w;
  if (need_weight_grad) out_w = grad_w.to(s_weight.scalar_type());
  return {loss, s_lse, t_lse, grad_h.to(s_hidden.scalar_type()), out_w};
}

void set_tile_sizes(int64_t rows, int64_t vocab) {
  TORCH_CHECK_VALUE(rows > 0 && vocab > 0,
                    "set_tile_sizes: rows and vocab must be positive, got ", rows, " and ",
                    vocab);
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
  m.def("distill_forward", &distill_forward, release(), py::arg("s_hidden"),
        py::arg("s_weight"), py::arg("t_hidden"), py::arg("t_weight"), py::arg("temperature"),
        py::arg("kind"), py::arg("jsd_beta"));
  m.def("distill_backward", &distill_backward, release(), py::arg("s_hidden"),
        py::arg("s_weight"), py::arg("t_hidden"), py::arg("t_weight"), py::arg("temperature"),
        py::arg("kind"), py::arg("jsd_beta"), py::arg("s_lse"), py::arg("t_lse"),
        py::arg("grad_rows"), py::arg("need_weight_grad"));
  m.def("token_scores_chunk_forward", &token_scores_chunk_forward, release(), py::arg("hidden"),
        py::arg("weight"), py::arg("bias"), py::arg("ids"), py::arg("scale"),
        py::arg("with_entropy"));
  m.def("token_scores_chunk_backward", &token_scores_chunk_backward, release(),
        py::arg("logp_tile"), py::arg("hidden"), py::arg("weight"), py::arg("bias"),
        py::arg("ids"), py::arg("scale"), py::arg("grad_logp"), py::arg("grad_hidden"),
        py::arg("grad_weight"), py::arg("grad_bias"));
  m.def("distill_fused", &distill_fused, release(), py::arg("s_hidden"), py::arg("s_weight"),
        py::arg("t_hidden"), py::arg("t_weight"), py::arg("temperature"), py::arg("kind"),
        py::arg("jsd_beta"), py::arg("grad_scale"), py::arg("rows_per_chunk"),
        py::arg("need_weight_grad"));
  m.def("set_tile_sizes", &set_tile_sizes, py::arg("rows"), py::arg("vocab"),
        "Rows per chunk and vocabulary entries per block of the logits tile (process-wide).");
  m.def("get_tile_sizes", &get_tile_sizes);
}
