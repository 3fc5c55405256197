// The sgg_fast op schema: one definition, implemented for CPU (cpu/ops_cpu.cpp) and CUDA
// (cuda/ops_cuda.cpp + cuda/kernels.cu). Fake (meta) implementations for torch.compile are
// registered from Python (sgg_fast/_ops.py). One SGG step is
//
//   partials = sgg_stats(grads, refs, params, chunk_size)            # [C, 4] per-chunk sums
//   out      = sgg_finalize(partials, seg_offsets, hyper, nu)        # [S, 14] α, β, ν, skip, stats
//   sgg_adamw_apply(params, grads, exp_avgs, exp_avg_sqs, steps, refs, out, ...)   # SGGAdamW
//   sgg_guide_apply(grads, refs, out, ...)                           # GradientGuidance
//
// Layouts (columns) are those of sgg_fast/guidance.py; see csrc/sgg_common.h.
#include <ATen/ATen.h>
#include <Python.h>
#include <torch/library.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "sgg_common.h"

namespace sgg_fast {
namespace cpu {
const char* cpu_isa();
int64_t openmp_version();  // _OPENMP of the CPU kernels' translation unit, 0 without OpenMP
int64_t debug_threads();
}  // namespace cpu
#ifdef SGG_FAST_WITH_CUDA
namespace cuda {
std::string cuda_build_info();
}
#endif

namespace {
#define SGG_STR_(x) #x
#define SGG_STR(x) SGG_STR_(x)

std::string fmt(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

// The layout fingerprint of a prepared step (sgg_fast/plan.py, fingerprint): for each entry of
// `fixed`, every fact a step was checked against (data address, storage offset, dtype, device,
// layout, sizes, strides); for each entry of `per_step` the same without the address (a new
// gradient each step is expected). -1 stands for None. Metadata only: no tensor data is read, so
// it runs for tensors of any device without a sync. Two steps' fingerprints are equal exactly
// when none of these facts changed (a `.data` swap, `resize_`, `t_()`, retyping all change it).
void append_fingerprint(std::vector<int64_t>& out, const std::optional<at::Tensor>& o,
                        bool address) {
  if (!o.has_value() || !o->defined()) {
    out.push_back(-1);
    return;
  }
  const at::Tensor& t = *o;
  const bool strided = t.layout() == at::kStrided;
  out.push_back(t.dim());
  out.push_back(static_cast<int64_t>(t.layout()));
  out.push_back(static_cast<int64_t>(t.scalar_type()));
  out.push_back(static_cast<int64_t>(t.device().type()));
  out.push_back(static_cast<int64_t>(t.device().index()));
  for (int64_t s : t.sizes()) out.push_back(s);
  if (!strided) return;  // a sparse tensor has no strides (build_plan rejects it)
  for (int64_t s : t.strides()) out.push_back(s);
  out.push_back(t.storage_offset());
  if (address) {
    out.push_back(t.has_storage() ? reinterpret_cast<int64_t>(t.storage().data()) : 0);
  }
}

at::Tensor layout_fingerprint(const c10::List<std::optional<at::Tensor>>& fixed,
                              const c10::List<std::optional<at::Tensor>>& per_step) {
  std::vector<int64_t> out;
  out.reserve((fixed.size() + per_step.size()) * 12 + 2);
  out.push_back(static_cast<int64_t>(fixed.size()));
  for (const std::optional<at::Tensor>& o : fixed) append_fingerprint(out, o, true);
  out.push_back(static_cast<int64_t>(per_step.size()));
  for (const std::optional<at::Tensor>& o : per_step) append_fingerprint(out, o, false);
  return at::tensor(out, at::TensorOptions().dtype(at::kLong));
}

std::string build_info() {
  std::string s = "cpu_isa=" + std::string(cpu::cpu_isa());
  s += ";openmp=" + std::to_string(cpu::openmp_version());
#ifdef SGG_FAST_WITH_CUDA
  s += ";cuda=1;" + cuda::cuda_build_info();
#else
  s += ";cuda=0";
#endif
  s += ";num_out=" + std::to_string(NUM_OUT) + ";num_hyper=" + std::to_string(NUM_HYPER);
  s += ";blend_eps=" + fmt(BLEND_EPS) + ";cancel_eps=" + fmt(CANCEL_EPS);
  s += ";param_norm_floor=" + fmt(PARAM_NORM_FLOOR);
#ifdef SGG_FAST_SOURCE_HASH
  s += ";source_hash=" SGG_STR(SGG_FAST_SOURCE_HASH);
#endif
  return s;
}
}  // namespace
}  // namespace sgg_fast

TORCH_LIBRARY(sgg_fast, m) {
  // fake (meta) implementations for torch.compile live in this Python module
  m.set_python_module("sgg_fast._ops");
  // Per-chunk statistics (gg, rr, gr, pp) of every tensor. Tensor i owns
  // max(1, ceil(numel_i / chunk_size)) consecutive rows, in list order. refs[i] None: r = 0;
  // params[i] None: pp not needed (0). ws / ws_host: the CUDA implementation's device table and
  // its host mirror (int64, 17 words per tensor, zero-initialised, reused across steps);
  // the CPU implementation ignores them.
  m.def(
      "sgg_stats(Tensor[] grads, Tensor?[] refs, Tensor?[] params, int chunk_size, "
      "Tensor(a!)? ws=None, Tensor(b!)? ws_host=None) -> Tensor");
  // Sum the rows seg_offsets[s]:seg_offsets[s+1] of each segment, in row order (deterministic).
  m.def("sgg_segment_sum(Tensor partials, Tensor seg_offsets) -> Tensor");
  // sgg_segment_sum then guidance.finalize: [S, 14] (OUT_COLS), with the global skip flag.
  // hyper: [S, 10] (HYPER_COLS). nu: one float32 [2] tensor (norm_ema, initialised) per segment
  // (plan.seg_nus), on the partials' device; read, and written back in place for
  // mag_mode="relative" segments unless the step is skipped (finalize_row in sgg_common.h).
  m.def(
      "sgg_finalize(Tensor partials, Tensor seg_offsets, Tensor hyper, Tensor(a!)[] nu) -> Tensor");
  // AdamW on u = α·g + β·r (α, β from out[seg_index[i]]), one pass; also step += 1 and, for
  // ref_mode 1 (ema), refs[i] ← ref_beta·r + (1-ref_beta)·g. Does nothing when out says skip.
  // ref_mode 0 (momentum): r is exp_avgs[i] before the step and refs[i] is a placeholder with
  // no elements. (The mutable lists take no None: torch.compile's functionalization of a
  // mutable Tensor?[] with None entries fails in torch 2.14.)
  // lr_tensors: [] or one entry per tensor; a tensor entry overrides lr[i] (read on the device).
  // max_exp_avg_sqs (amsgrad, torch's state name): [] or one entry per tensor; an entry with
  // elements is that tensor's running maximum of exp_avg_sq (updated, and used in the
  // denominator), one with no elements means amsgrad=False for that tensor. (The CUDA
  // implementation accepts only [].)
  m.def(
      "sgg_adamw_apply(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] refs, Tensor out, "
      "int[] seg_index, float[] lr, float[] beta1, float[] beta2, float[] eps, "
      "float[] weight_decay, float[] ref_beta, int[] ref_mode, Tensor?[] lr_tensors, "
      "Tensor(h!)[] max_exp_avg_sqs, Tensor(f!)? ws=None, Tensor(g!)? ws_host=None) -> ()");
  // GradientGuidance: grads[i] ← α·g + β·r in place; ref_mode 1 (ema) also updates refs[i]
  // with the raw g. Does nothing when out says skip. refs[i] with no elements: r = 0.
  m.def(
      "sgg_guide_apply(Tensor(a!)[] grads, Tensor(b!)[] refs, Tensor out, int[] seg_index, "
      "float[] ref_beta, int[] ref_mode, Tensor(c!)? ws=None, Tensor(d!)? ws_host=None) -> ()");
  // Layout fingerprint of a prepared step: int64 [K] of metadata only (layout_fingerprint above).
  m.def("sgg_layout_fingerprint(Tensor?[] fixed, Tensor?[] per_step) -> Tensor",
        &sgg_fast::layout_fingerprint);
  // "key=value;..." : the CPU instruction set in use, whether CUDA was compiled in, constants.
  m.def("sgg_build_info() -> str", &sgg_fast::build_info);
  // Introspection for tests: the number of distinct threads that ran chunks in the last CPU
  // stats/apply/guide call (1 when the call ran serially).
  m.def("sgg_cpu_debug_threads() -> int", &sgg_fast::cpu::debug_threads);
}

// A Python module of the extension's name, so `import sgg_fast._C` works; the ops are
// registered by the static initialisers above when the library is loaded.
#define SGG_CAT_(a, b) a##b
#define SGG_CAT(a, b) SGG_CAT_(a, b)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
extern "C" PyMODINIT_FUNC SGG_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, SGG_STR(TORCH_EXTENSION_NAME),
                                   "sgg_fast compiled ops (registered as torch.ops.sgg_fast)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
