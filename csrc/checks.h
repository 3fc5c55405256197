// Argument checks shared by the CPU and CUDA implementations. Every message names the argument
// and the index of the tensor ("grads[3] ...") and says what to do.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace sgg_fast {

inline const char* dtype_name(c10::ScalarType t) { return c10::toString(t); }

inline bool supported_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// `t` must be a dense tensor of the device/dtype/shape of `like` with the same element order
// (same strides), so that element k of one is element k of the other in memory.
inline void check_like(const at::Tensor& t, const char* name, int64_t i, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == like.device(), name, "[", i, "] is on ", t.device(), " but ", like_name,
              "[", i, "] is on ", like.device(),
              "; keep optimizer state on the parameter's device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, "[", i, "] has dtype ",
              dtype_name(t.scalar_type()), " but ", like_name, "[", i, "] has dtype ",
              dtype_name(like.scalar_type()),
              "; gradients, optimizer state and references must have the parameter's dtype");
  TORCH_CHECK(t.sizes() == like.sizes(), name, "[", i, "] has shape ", t.sizes(), " but ",
              like_name, "[", i, "] has shape ", like.sizes());
  if (!(t.is_contiguous() && like.is_contiguous())) {
    TORCH_CHECK(t.is_non_overlapping_and_dense() && like.is_non_overlapping_and_dense() &&
                    t.strides() == like.strides(),
                name, "[", i, "] (strides ", t.strides(), ") and ", like_name, "[", i,
                "] (strides ", like.strides(),
                ") must be dense with the same memory layout; call .contiguous() on them or use "
                "backend='torch'");
  }
}

inline void check_first(const at::Tensor& t, const char* name, int64_t i) {
  TORCH_CHECK(t.defined(), name, "[", i, "] is undefined");
  TORCH_CHECK(supported_dtype(t.scalar_type()), name, "[", i, "] has dtype ",
              dtype_name(t.scalar_type()),
              "; the compiled kernels support float32, bfloat16 and float16 (use backend='torch' "
              "for float64)");
  TORCH_CHECK(t.is_contiguous() || t.is_non_overlapping_and_dense(), name, "[", i,
              "] is not dense (strides ", t.strides(),
              "); call .contiguous() or use backend='torch'");
}

inline std::optional<at::Tensor> opt_at(const c10::List<std::optional<at::Tensor>>& l, int64_t i) {
  std::optional<at::Tensor> t = l.get(i);
  if (t.has_value() && !t->defined()) return std::nullopt;
  return t;
}

inline void check_lengths(const char* name, int64_t got, int64_t want, const char* of) {
  TORCH_CHECK(got == want, name, " has ", got, " entries but ", of, " has ", want,
              "; pass one per tensor");
}

inline void check_seg(at::IntArrayRef seg_index, int64_t i, int64_t S) {
  TORCH_CHECK(seg_index[i] >= 0 && seg_index[i] < S, "seg_index[", i, "] = ", seg_index[i],
              " is not a row of out (S = ", S, ")");
}

inline void check_ref_mode(int64_t mode, int64_t i) {
  TORCH_CHECK(mode == 0 || mode == 1 || mode == 2, "ref_mode[", i, "] = ", mode,
              "; expected 0 (momentum), 1 (ema) or 2 (source)");
}

// The per-tensor lists of sgg_adamw_apply, all of length P.
inline void check_apply_lengths(int64_t P, int64_t grads, int64_t exp_avgs, int64_t exp_avg_sqs,
                                int64_t steps, int64_t refs, int64_t seg_index, int64_t lr,
                                int64_t beta1, int64_t beta2, int64_t eps, int64_t weight_decay,
                                int64_t ref_beta, int64_t ref_mode, int64_t lr_tensors) {
  check_lengths("grads", grads, P, "params");
  check_lengths("exp_avgs", exp_avgs, P, "params");
  check_lengths("exp_avg_sqs", exp_avg_sqs, P, "params");
  check_lengths("steps", steps, P, "params");
  check_lengths("refs", refs, P, "params");
  check_lengths("seg_index", seg_index, P, "params");
  check_lengths("lr", lr, P, "params");
  check_lengths("beta1", beta1, P, "params");
  check_lengths("beta2", beta2, P, "params");
  check_lengths("eps", eps, P, "params");
  check_lengths("weight_decay", weight_decay, P, "params");
  check_lengths("ref_beta", ref_beta, P, "params");
  check_lengths("ref_mode", ref_mode, P, "params");
  TORCH_CHECK(lr_tensors == 0 || lr_tensors == P,
              "lr_tensors must be empty or have one entry (None or a tensor) per parameter, got ",
              lr_tensors, " for ", P, " parameters");
}

// refs[i] against ref_mode[i] for sgg_adamw_apply: the reference, or nullopt for momentum
// (whose refs[i] is a placeholder with no elements).
inline std::optional<at::Tensor> check_apply_ref(const at::Tensor& r, int64_t mode, int64_t i,
                                                 const at::Tensor& p) {
  TORCH_CHECK(r.defined(), "refs[", i, "] is undefined");
  if (mode == 0) {
    TORCH_CHECK(r.numel() == 0, "refs[", i,
                "] must be a placeholder with no elements for ref_mode 0 "
                "(momentum: r is exp_avgs[",
                i, "] before the step), got shape ", r.sizes());
    return std::nullopt;
  }
  if (p.numel() == 0 && r.numel() == 0) return std::nullopt;
  check_like(r, "refs", i, p, "params");
  return r;
}

// refs[i] of sgg_guide_apply: nullopt when it has no elements (r = 0).
inline std::optional<at::Tensor> guide_ref(const at::Tensor& r, int64_t i, const at::Tensor& g) {
  TORCH_CHECK(r.defined(), "refs[", i, "] is undefined");
  if (r.numel() == 0 && (g.numel() != 0 || r.sizes() != g.sizes())) return std::nullopt;
  check_like(r, "refs", i, g, "grads");
  return r;
}

}  // namespace sgg_fast
