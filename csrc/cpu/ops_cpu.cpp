// CPU implementations of the sgg_fast ops (schema: csrc/ops.cpp).
//
// Work is split into fixed-size chunks of one tensor each and spread over threads with
// at::parallel_for. A chunk's statistics depend only on its elements (never on which thread ran
// it or how the range was split), and chunks are summed in index order by sgg_finalize, so the
// result is bitwise identical for any number of threads.
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../checks.h"
#include "../sgg_common.h"
#include "kernels.h"

// With torch's OpenMP backend at::parallel_for is a header template around `#pragma omp
// parallel`: compiled without OpenMP it silently runs every loop on one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error \
    "torch uses OpenMP (AT_PARALLEL_OPENMP): compile csrc/cpu with -fopenmp (sgg_fast/_build.py openmp_flags)"
#endif

namespace sgg_fast {
namespace cpu {
namespace {

// Elements per parallel task of the apply/guide kernels. Big enough that a task's fixed cost
// (a few hundred ns: finding its tensor, broadcasting the scalars) is noise against streaming
// 5 × 128 KiB of fp32, small enough that a 2-core split of a 1M-element tensor stays balanced.
constexpr int64_t kApplyChunk = 1 << 15;

DType to_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DT_F32;
    case at::kBFloat16:
      return DT_BF16;
    default:
      return DT_F16;
  }
}

Kernels choose_kernels() {
  Kernels k = kernels_default();
  std::string want;
  if (const char* env = std::getenv("SGG_FAST_CPU_ISA")) want = env;  // tests / debugging
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  Kernels k2 = kernels_avx2(), k512 = kernels_avx512();
  if (want.empty()) want = has_avx512 ? "avx512" : has_avx2 ? "avx2" : "default";
  if (want == "avx512" && has_avx512 && k512.stats) return k512;
  if ((want == "avx512" || want == "avx2") && has_avx2 && k2.stats) return k2;
#endif
  return k;
}

const Kernels& kernels() {
  static const Kernels k = choose_kernels();
  return k;
}

// First chunk of each tensor (prefix sums of num_chunks), size P + 1.
std::vector<int64_t> chunk_prefix(const std::vector<int64_t>& numels, int64_t chunk) {
  std::vector<int64_t> pre(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) pre[i + 1] = pre[i] + num_chunks(numels[i], chunk);
  return pre;
}

// Distinct threads that ran chunks in the last for_each_chunk call (sgg_cpu_debug_threads).
std::atomic<int64_t> g_last_threads{0};

// Run fn(tensor, chunk, begin, end) for every chunk [0, pre.back()) in parallel.
template <typename F>
void for_each_chunk(const std::vector<int64_t>& pre, const std::vector<int64_t>& numels,
                    int64_t chunk, const F& fn) {
  const int64_t C = pre.back();
  // one byte per thread of the pool, set once per task range (not per chunk) by its thread
  std::vector<unsigned char> ran(static_cast<size_t>(std::max(1, at::get_num_threads())), 0);
  at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
    const size_t tid = static_cast<size_t>(at::get_thread_num());
    if (tid < ran.size()) ran[tid] = 1;
    int64_t t = std::upper_bound(pre.begin(), pre.end(), cb) - pre.begin() - 1;
    for (int64_t c = cb; c < ce; ++c) {
      while (c >= pre[t + 1]) ++t;
      const int64_t begin = (c - pre[t]) * chunk;
      fn(t, c, begin, std::min(begin + chunk, numels[t]));
    }
  });
  g_last_threads.store(std::count(ran.begin(), ran.end(), 1), std::memory_order_relaxed);
}

// ---- sgg_stats -----------------------------------------------------------------------------
at::Tensor stats_cpu(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& refs,
                     const c10::List<std::optional<at::Tensor>>& params, int64_t chunk_size,
                     const std::optional<at::Tensor>& /*ws*/,
                     const std::optional<at::Tensor>& /*ws_host*/) {
  const int64_t P = grads.size();
  check_lengths("refs", refs.size(), P, "grads");
  check_lengths("params", params.size(), P, "grads");
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive, got ", chunk_size);
  std::vector<StatsTask> tasks(P);
  std::vector<int64_t> numels(P);
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& g = grads[i];
    check_first(g, "grads", i);
    TORCH_CHECK(g.device().is_cpu(), "grads[", i, "] is on ", g.device(),
                "; this is the CPU implementation");
    auto r = opt_at(refs, i);
    auto p = opt_at(params, i);
    if (r) check_like(*r, "refs", i, g, "grads");
    if (p) check_like(*p, "params", i, g, "grads");
    tasks[i] = StatsTask{g.const_data_ptr(), r ? r->const_data_ptr() : nullptr,
                         p ? p->const_data_ptr() : nullptr, g.numel(), to_dtype(g.scalar_type())};
    numels[i] = g.numel();
  }
  const auto pre = chunk_prefix(numels, chunk_size);
  at::Tensor out = at::empty({pre.back(), NUM_STATS}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const StatsFn fn = kernels().stats;
  for_each_chunk(pre, numels, chunk_size, [&](int64_t t, int64_t c, int64_t b, int64_t e) {
    if (e <= b) {
      std::fill(o + NUM_STATS * c, o + NUM_STATS * (c + 1), 0.f);
    } else {
      fn(tasks[t], b, e, o + NUM_STATS * c);
    }
  });
  return out;
}

// ---- sgg_segment_sum / sgg_finalize ------------------------------------------------------------
std::vector<int64_t> read_offsets(const at::Tensor& partials, const at::Tensor& seg_offsets) {
  TORCH_CHECK(partials.dim() == 2 && partials.size(1) == NUM_STATS,
              "partials must have shape [C, 4] (gg, rr, gr, pp per chunk), got ", partials.sizes());
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble,
              "partials must be float32 or float64, got ", dtype_name(partials.scalar_type()));
  TORCH_CHECK(
      seg_offsets.dim() == 1 && seg_offsets.size(0) >= 1 && seg_offsets.scalar_type() == at::kLong,
      "seg_offsets must be a 1-D int64 tensor [S + 1], got ", seg_offsets.sizes(), " ",
      dtype_name(seg_offsets.scalar_type()));
  TORCH_CHECK(seg_offsets.device().is_cpu() && partials.device().is_cpu(),
              "partials and seg_offsets must be on the CPU here");
  at::Tensor so = seg_offsets.contiguous();
  const int64_t* s = so.const_data_ptr<int64_t>();
  std::vector<int64_t> off(s, s + so.numel());
  TORCH_CHECK(off.front() == 0 && off.back() == partials.size(0),
              "seg_offsets must start at 0 and end at the number of partial rows (",
              partials.size(0), "), got ", off.front(), " … ", off.back());
  for (size_t k = 1; k < off.size(); ++k)
    TORCH_CHECK(off[k] >= off[k - 1], "seg_offsets must be non-decreasing (entry ", k, ")");
  return off;
}

// Sum each segment's rows in index order, in double.
template <typename T>
void segment_sums(const at::Tensor& partials, const std::vector<int64_t>& off, T* sums) {
  at::Tensor pc = partials.contiguous();
  const T* v = pc.const_data_ptr<T>();
  for (size_t s = 0; s + 1 < off.size(); ++s) {
    double acc[NUM_STATS] = {0, 0, 0, 0};
    for (int64_t c = off[s]; c < off[s + 1]; ++c)
      for (int k = 0; k < NUM_STATS; ++k) acc[k] += static_cast<double>(v[c * NUM_STATS + k]);
    for (int k = 0; k < NUM_STATS; ++k) sums[s * NUM_STATS + k] = static_cast<T>(acc[k]);
  }
}

at::Tensor segment_sum_cpu(const at::Tensor& partials, const at::Tensor& seg_offsets) {
  const auto off = read_offsets(partials, seg_offsets);
  const int64_t S = static_cast<int64_t>(off.size()) - 1;
  at::Tensor out = at::empty({S, NUM_STATS}, partials.options());
  if (partials.scalar_type() == at::kFloat)
    segment_sums<float>(partials, off, out.data_ptr<float>());
  else
    segment_sums<double>(partials, off, out.data_ptr<double>());
  return out;
}

// Each segment's (ν, initialised) lives in its own float32 [2] tensor (plan.seg_nus): read
// here and, for mag_mode="relative" segments of a step that is not skipped, written back in
// place. The math is finalize_row (sgg_common.h), mirrored by guidance.finalize and the Triton
// _finalize_kernel (kernels/stats.py).
template <typename T>
void finalize_t(const at::Tensor& partials, const std::vector<int64_t>& off,
                const at::Tensor& hyper, const std::vector<float*>& nus, at::Tensor& out) {
  const int64_t S = static_cast<int64_t>(off.size()) - 1;
  std::vector<T> sums(S * NUM_STATS);
  segment_sums<T>(partials, off, sums.data());
  const T* h = hyper.const_data_ptr<T>();
  T* o = out.data_ptr<T>();
  std::vector<T> old(S * NUM_NU);
  for (int64_t s = 0; s < S; ++s)
    for (int k = 0; k < NUM_NU; ++k) old[s * NUM_NU + k] = static_cast<T>(nus[s][k]);
  bool skip = false;
  for (int64_t s = 0; s < S; ++s)
    skip |=
        finalize_row<T>(&sums[s * NUM_STATS], h + s * NUM_HYPER, &old[s * NUM_NU], o + s * NUM_OUT);
  for (int64_t s = 0; s < S; ++s) {  // global skip: ν unchanged, the flag in every row
    T* row = o + s * NUM_OUT;
    if (skip) {
      row[O_NU] = old[s * NUM_NU + N_NU];
      row[O_NUINIT] = old[s * NUM_NU + N_INIT];
    } else if (h[s * NUM_HYPER + H_MODE] == T(MAG_RELATIVE)) {
      nus[s][N_NU] = static_cast<float>(row[O_NU]);
      nus[s][N_INIT] = static_cast<float>(row[O_NUINIT]);
    }
    row[O_SKIP] = skip ? T(1) : T(0);
  }
}

at::Tensor finalize_cpu(const at::Tensor& partials, const at::Tensor& seg_offsets,
                        const at::Tensor& hyper, at::TensorList nu) {
  const auto off = read_offsets(partials, seg_offsets);
  const int64_t S = static_cast<int64_t>(off.size()) - 1;
  TORCH_CHECK(hyper.dim() == 2 && hyper.size(0) == S && hyper.size(1) == NUM_HYPER,
              "hyper must have shape [S, ", NUM_HYPER, "] = [", S, ", ", NUM_HYPER,
              "] (guidance.HYPER_COLS), got ", hyper.sizes());
  TORCH_CHECK(static_cast<int64_t>(nu.size()) == S,
              "nu must hold one (norm_ema, initialised) tensor per segment (", S, "), got ",
              nu.size());
  TORCH_CHECK(hyper.device().is_cpu(), "hyper must be on the CPU here, got ", hyper.device());
  std::vector<float*> nus(S);
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& t = nu[s];
    TORCH_CHECK(
        t.numel() == NUM_NU && t.scalar_type() == at::kFloat && t.is_contiguous() &&
            t.device().is_cpu(),
        "nu[", s,
        "] must be a contiguous float32 CPU tensor of 2 elements (norm_ema, initialised), got ",
        t.sizes(), " ", dtype_name(t.scalar_type()), " on ", t.device());
    nus[s] = t.data_ptr<float>();
  }
  const auto dt = partials.scalar_type();
  at::Tensor h = hyper.to(dt).contiguous();
  at::Tensor out = at::empty({S, NUM_OUT}, partials.options());
  if (dt == at::kFloat)
    finalize_t<float>(partials, off, h, nus, out);
  else
    finalize_t<double>(partials, off, h, nus, out);
  return out;
}

// ---- the finalize output as read by apply / guide -------------------------------------------
struct OutView {
  const float* data;
  int64_t S;
  bool skip;
};

OutView check_out(const at::Tensor& out) {
  TORCH_CHECK(
      out.dim() == 2 && out.size(1) == NUM_OUT && out.scalar_type() == at::kFloat &&
          out.is_contiguous() && out.device().is_cpu(),
      "out must be the contiguous float32 [S, 13] CPU tensor returned by sgg_finalize, got ",
      out.sizes(), " ", dtype_name(out.scalar_type()), " on ", out.device());
  const float* d = out.const_data_ptr<float>();
  const int64_t S = out.size(0);
  return OutView{d, S, S > 0 && d[O_SKIP] != 0.f};
}

// ---- sgg_adamw_apply -----------------------------------------------------------------------
void adamw_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList refs,
                     const at::Tensor& out, at::IntArrayRef seg_index, at::ArrayRef<double> lr,
                     at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                     at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
                     at::ArrayRef<double> ref_beta, at::IntArrayRef ref_mode,
                     const c10::List<std::optional<at::Tensor>>& lr_tensors,
                     at::TensorList max_exp_avg_sqs, const std::optional<at::Tensor>& /*ws*/,
                     const std::optional<at::Tensor>& /*ws_host*/) {
  const int64_t P = params.size();
  check_apply_lengths(P, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), steps.size(),
                      refs.size(), seg_index.size(), lr.size(), beta1.size(), beta2.size(),
                      eps.size(), weight_decay.size(), ref_beta.size(), ref_mode.size(),
                      lr_tensors.size());
  const int64_t n_vmax = static_cast<int64_t>(max_exp_avg_sqs.size());
  TORCH_CHECK(n_vmax == 0 || n_vmax == P,
              "max_exp_avg_sqs must be empty or have one entry per parameter (a tensor with no "
              "elements for amsgrad=False), got ",
              n_vmax, " for ", P, " parameters");
  const OutView ov = check_out(out);

  // every check first: nothing is written unless all inputs are valid
  std::vector<ApplyTask> tasks(P);
  std::vector<int64_t> numels(P);
  std::vector<float> new_steps(P);
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& p = params[i];
    check_first(p, "params", i);
    TORCH_CHECK(p.device().is_cpu(), "params[", i, "] is on ", p.device(),
                "; this is the CPU implementation");
    check_like(grads[i], "grads", i, p, "params");
    check_like(exp_avgs[i], "exp_avgs", i, p, "params");
    check_like(exp_avg_sqs[i], "exp_avg_sqs", i, p, "params");
    void* vmax = nullptr;  // an entry with no elements: amsgrad off for this tensor
    if (n_vmax && max_exp_avg_sqs[i].numel() > 0) {
      check_like(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, p, "params");
      vmax = max_exp_avg_sqs[i].data_ptr();
    }
    const at::Tensor& st = steps[i];
    TORCH_CHECK(
        st.defined() && st.numel() == 1 && st.scalar_type() == at::kFloat && st.device().is_cpu(),
        "steps[", i, "] must be a one-element float32 CPU tensor (state['step']), got ", st.sizes(),
        " ", dtype_name(st.scalar_type()), " on ", st.device());
    check_seg(seg_index, i, ov.S);
    check_ref_mode(ref_mode[i], i);
    const auto r = check_apply_ref(refs[i], ref_mode[i], i, p);
    double lr_i = lr[i];
    if (lr_tensors.size()) {
      if (auto lt = opt_at(lr_tensors, i)) {
        TORCH_CHECK(lt->numel() == 1 && lt->device().is_cpu(), "lr_tensors[", i,
                    "] must be a one-element CPU tensor, got ", lt->sizes(), " on ", lt->device());
        lr_i = lt->item<double>();
      }
    }
    const float t = *st.const_data_ptr<float>() + 1.f;
    new_steps[i] = t;
    const double bc1 = 1.0 - std::pow(beta1[i], static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(beta2[i], static_cast<double>(t));
    const int64_t s = seg_index[i];
    ApplyTask& k = tasks[i];
    k.p = p.data_ptr();
    k.g = grads[i].const_data_ptr();
    k.m = exp_avgs[i].data_ptr();
    k.v = exp_avg_sqs[i].data_ptr();
    k.r = r ? r->data_ptr() : nullptr;
    k.vmax = vmax;
    k.numel = p.numel();
    k.dtype = to_dtype(p.scalar_type());
    k.ref_mode = static_cast<int32_t>(ref_mode[i]);
    k.alpha = ov.data[s * NUM_OUT + O_ALPHA];
    k.beta = ov.data[s * NUM_OUT + O_BETA];
    k.decay = static_cast<float>(1.0 - lr_i * weight_decay[i]);
    k.step_size = static_cast<float>(lr_i / bc1);
    k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    k.eps = static_cast<float>(eps[i]);
    k.beta1 = static_cast<float>(beta1[i]);
    k.one_minus_beta1 = static_cast<float>(1.0 - beta1[i]);
    k.beta2 = static_cast<float>(beta2[i]);
    k.one_minus_beta2 = static_cast<float>(1.0 - beta2[i]);
    k.ref_beta = static_cast<float>(ref_beta[i]);
    k.one_minus_ref_beta = static_cast<float>(1.0 - ref_beta[i]);
    numels[i] = p.numel();
  }
  if (ov.skip) return;  // non-finite statistics somewhere: nothing changes, not even step

  const auto pre = chunk_prefix(numels, kApplyChunk);
  const ApplyFn fn = kernels().apply;
  for_each_chunk(pre, numels, kApplyChunk, [&](int64_t t, int64_t, int64_t b, int64_t e) {
    if (e > b) fn(tasks[t], b, e);
  });
  for (int64_t i = 0; i < P; ++i) *steps[i].data_ptr<float>() = new_steps[i];
}

// ---- sgg_guide_apply -----------------------------------------------------------------------
void guide_apply_cpu(at::TensorList grads, at::TensorList refs, const at::Tensor& out,
                     at::IntArrayRef seg_index, at::ArrayRef<double> ref_beta,
                     at::IntArrayRef ref_mode, const std::optional<at::Tensor>& /*ws*/,
                     const std::optional<at::Tensor>& /*ws_host*/) {
  const int64_t P = grads.size();
  check_lengths("refs", refs.size(), P, "grads");
  check_lengths("seg_index", seg_index.size(), P, "grads");
  check_lengths("ref_beta", ref_beta.size(), P, "grads");
  check_lengths("ref_mode", ref_mode.size(), P, "grads");
  const OutView ov = check_out(out);
  std::vector<GuideTask> tasks(P);
  std::vector<int64_t> numels(P);
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& g = grads[i];
    check_first(g, "grads", i);
    TORCH_CHECK(g.device().is_cpu(), "grads[", i, "] is on ", g.device(),
                "; this is the CPU implementation");
    check_seg(seg_index, i, ov.S);
    check_ref_mode(ref_mode[i], i);
    const auto r = guide_ref(refs[i], i, g);
    TORCH_CHECK(r || ref_mode[i] != REF_EMA || g.numel() == 0, "refs[", i,
                "] is None but ref_mode[", i, "] = 1 (ema) updates it");
    const int64_t s = seg_index[i];
    GuideTask& k = tasks[i];
    k.g = g.data_ptr();
    k.r = r ? r->data_ptr() : nullptr;
    k.numel = g.numel();
    k.dtype = to_dtype(g.scalar_type());
    k.ref_mode = static_cast<int32_t>(ref_mode[i]);
    k.alpha = ov.data[s * NUM_OUT + O_ALPHA];
    k.beta = ov.data[s * NUM_OUT + O_BETA];
    k.ref_beta = static_cast<float>(ref_beta[i]);
    k.one_minus_ref_beta = static_cast<float>(1.0 - ref_beta[i]);
    numels[i] = g.numel();
  }
  if (ov.skip) return;
  const auto pre = chunk_prefix(numels, kApplyChunk);
  const GuideFn fn = kernels().guide;
  for_each_chunk(pre, numels, kApplyChunk, [&](int64_t t, int64_t, int64_t b, int64_t e) {
    if (e > b) fn(tasks[t], b, e);
  });
}

}  // namespace

const char* cpu_isa() { return kernels().isa; }

#ifdef _OPENMP
int64_t openmp_version() { return _OPENMP; }
#else
int64_t openmp_version() { return 0; }
#endif

int64_t debug_threads() { return g_last_threads.load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace sgg_fast

TORCH_LIBRARY_IMPL(sgg_fast, CPU, m) {
  m.impl("sgg_stats", &sgg_fast::cpu::stats_cpu);
  m.impl("sgg_segment_sum", &sgg_fast::cpu::segment_sum_cpu);
  m.impl("sgg_finalize", &sgg_fast::cpu::finalize_cpu);
  m.impl("sgg_adamw_apply", &sgg_fast::cpu::adamw_apply_cpu);
  m.impl("sgg_guide_apply", &sgg_fast::cpu::guide_apply_cpu);
}
