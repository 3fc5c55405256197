// CUDA implementations of the sgg_fast ops (host side: checks, the device table, launches).
// The kernels are in kernels.cu. Only c10/cuda/CUDAStream.h and CUDAGuard.h from torch's CUDA
// headers (ATen/cuda/CUDAContext.h would need the cusparse headers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "../checks.h"
#include "../sgg_common.h"
#include "cuda_table.h"

namespace sgg_fast {
namespace cuda {

std::string cuda_build_info() { return "cudart=" + std::to_string(CUDART_VERSION); }

namespace {

int32_t to_cdt(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CDT_F32;
    case at::kBFloat16:
      return CDT_BF16;
    default:
      return CDT_F16;
  }
}

int64_t as_int(const void* p) { return reinterpret_cast<int64_t>(p); }

void check_on(const at::Tensor& t, const char* name, int64_t i, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, name, "[", i, "] is on ", t.device(), " but the step runs on ",
              dev, "; keep every tensor of one optimizer on one CUDA device");
}

// Make the device table `ws` hold `recs`: compare with the host mirror, upload only on change
// (pinned staging buffer, asynchronous on the current stream: no host sync).
TensorRec* sync_table(const std::vector<TensorRec>& recs, const std::optional<at::Tensor>& ws,
                      const std::optional<at::Tensor>& ws_host, const at::Device& dev,
                      cudaStream_t stream) {
  const int64_t P = static_cast<int64_t>(recs.size());
  TORCH_CHECK(
      ws.has_value() && ws->defined() && ws_host.has_value() && ws_host->defined(),
      "the CUDA implementation needs ws and ws_host: int64 tensors of ", kWsWordsPerTensor,
      " words per tensor (", kWsWordsPerTensor * P,
      " here), ws on the device and ws_host on "
      "the CPU, both zero-initialised and kept across steps (the device table and its mirror)");
  TORCH_CHECK(ws->scalar_type() == at::kLong && ws->is_contiguous() && ws->device() == dev &&
                  ws->numel() >= kWsWordsPerTensor * P,
              "ws must be a contiguous int64 tensor on ", dev, " with at least ",
              kWsWordsPerTensor * P, " words, got ", ws->numel(), " ",
              dtype_name(ws->scalar_type()), " on ", ws->device());
  TORCH_CHECK(ws_host->scalar_type() == at::kLong && ws_host->is_contiguous() &&
                  ws_host->device().is_cpu() && ws_host->numel() >= kRecWords * P,
              "ws_host must be a contiguous int64 CPU tensor with at least ", kRecWords * P,
              " words, got ", ws_host->numel(), " on ", ws_host->device());
  const size_t bytes = recs.size() * sizeof(TensorRec);
  if (std::memcmp(ws_host->const_data_ptr(), recs.data(), bytes) != 0) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    TORCH_CHECK(
        status == cudaStreamCaptureStatusNone,
        "sgg_fast: the tensors (addresses) or hyper-parameters of the step changed during CUDA "
        "graph capture, so the device table would have to be uploaded inside the graph. Run one "
        "eager step with the same tensors and settings before capturing; for an lr schedule "
        "inside a graph, give the param_group a tensor lr.");
    at::Tensor staging =
        at::empty({kRecWords * P}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(staging.data_ptr(), recs.data(), bytes);
    ws->narrow(0, 0, kRecWords * P).copy_(staging, /*non_blocking=*/true);
    std::memcpy(ws_host->data_ptr(), recs.data(), bytes);
  }
  return reinterpret_cast<TensorRec*>(ws->data_ptr());
}

int64_t assign_chunks(std::vector<TensorRec>& recs, int64_t chunk) {
  int64_t C = 0;
  for (auto& r : recs) {
    r.chunk_begin = C;
    r.nchunks = num_chunks(r.numel, chunk);
    C += r.nchunks;
  }
  TORCH_CHECK(C < (int64_t(1) << 31), "sgg_fast: ", C,
              " chunks exceed the CUDA grid limit (2^31 - 1); "
              "pass a larger chunk_size");
  return C;
}

// F_ALIGNED for a record whose present pointers are all 16-byte aligned and whose chunk is a
// whole number of 16-byte vectors (a view into a flat buffer at an odd offset is not: it takes
// the element-by-element path alone, the other tensors keep their vector accesses).
void set_alignment(TensorRec& rec, int64_t chunk, int64_t elem_bytes) {
  bool ok = (chunk * elem_bytes) % 16 == 0;
  for (int64_t a : rec.ptr) ok = ok && (a % 16 == 0);
  rec.flags = ok ? (rec.flags | F_ALIGNED) : (rec.flags & ~F_ALIGNED);
}

// A cache of device tables holds at most `max_entries` that no CUDA graph captured: the oldest
// such entry goes (its table is freed) to make room; a captured one stays for as long as the
// process, because a replay of that graph reads its address.
template <typename Entry>
void evict_oldest_uncaptured(std::vector<Entry>& cache, size_t max_entries) {
  size_t uncaptured = 0;
  for (const Entry& e : cache) uncaptured += e.captured ? 0 : 1;
  if (uncaptured < max_entries) return;
  for (auto it = cache.begin(); it != cache.end(); ++it)
    if (!it->captured) {
      cache.erase(it);
      return;
    }
}

// The chunk → tensor table (int32 [C], device) of records laid out by assign_chunks: built once
// per list of chunk counts and cached, so a steady loop uploads nothing (and a graph captured
// after one eager step reads the same table). Never uploaded inside a CUDA graph capture.
const int32_t* chunk_table(const std::vector<TensorRec>& recs, int64_t C, const at::Device& dev,
                           cudaStream_t stream) {
  struct Entry {
    at::Device dev;
    std::vector<int64_t> nchunks;
    at::Tensor table;
    bool captured;  // a CUDA graph read it: never evicted (the graph keeps its address)
  };
  static std::mutex mu;
  static auto& cache = *new std::vector<Entry>();  // never destroyed: no CUDA frees at exit
  constexpr size_t kMaxEntries = 16;
  std::vector<int64_t> key(recs.size());
  for (size_t t = 0; t < recs.size(); ++t) key[t] = recs[t].nchunks;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  std::lock_guard<std::mutex> lock(mu);
  for (auto& e : cache)
    if (e.dev == dev && e.nchunks == key) {
      e.captured = e.captured || status != cudaStreamCaptureStatusNone;
      return e.table.const_data_ptr<int32_t>();
    }
  TORCH_CHECK(
      status == cudaStreamCaptureStatusNone,
      "sgg_fast: the tensor sizes of the step changed during CUDA graph capture, so the chunk "
      "table would have to be uploaded inside the graph. Run one eager step with the same "
      "parameters before capturing.");
  at::Tensor staging = at::empty({C}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  int32_t* h = staging.data_ptr<int32_t>();
  for (size_t t = 0; t < recs.size(); ++t)
    for (int64_t c = 0; c < recs[t].nchunks; ++c)
      h[recs[t].chunk_begin + c] = static_cast<int32_t>(t);
  at::Tensor table = at::empty({C}, at::TensorOptions().dtype(at::kInt).device(dev));
  table.copy_(staging, /*non_blocking=*/true);
  evict_oldest_uncaptured(cache, kMaxEntries);
  cache.push_back(Entry{dev, std::move(key), table, false});
  return cache.back().table.const_data_ptr<int32_t>();
}

// ---- sgg_stats -----------------------------------------------------------------------------
at::Tensor stats_cuda(at::TensorList grads, const c10::List<std::optional<at::Tensor>>& refs,
                      const c10::List<std::optional<at::Tensor>>& params, int64_t chunk_size,
                      const std::optional<at::Tensor>& ws,
                      const std::optional<at::Tensor>& ws_host) {
  const int64_t P = grads.size();
  check_lengths("refs", refs.size(), P, "grads");
  check_lengths("params", params.size(), P, "grads");
  TORCH_CHECK(chunk_size > 0, "chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(P > 0, "sgg_stats needs at least one gradient");
  const at::Device dev = grads[0].device();
  TORCH_CHECK(dev.is_cuda(), "grads[0] is on ", dev, "; this is the CUDA implementation");
  c10::cuda::CUDAGuard guard(dev);
  std::vector<TensorRec> recs(P);
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& g = grads[i];
    check_first(g, "grads", i);
    check_on(g, "grads", i, dev);
    auto r = opt_at(refs, i);
    auto p = opt_at(params, i);
    if (r) check_like(*r, "refs", i, g, "grads");
    if (p) check_like(*p, "params", i, g, "grads");
    TensorRec& rec = recs[i];
    std::memset(&rec, 0, sizeof(rec));
    rec.ptr[S_G] = as_int(g.const_data_ptr());
    rec.ptr[S_R] = r ? as_int(r->const_data_ptr()) : 0;
    rec.ptr[S_P] = p ? as_int(p->const_data_ptr()) : 0;
    rec.numel = g.numel();
    rec.dtype = to_cdt(g.scalar_type());
    set_alignment(rec, chunk_size, g.element_size());
  }
  const int64_t C = assign_chunks(recs, chunk_size);
  at::Tensor out = at::empty({C, NUM_STATS}, at::TensorOptions().dtype(at::kFloat).device(dev));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int32_t* tab = chunk_table(recs, C, dev, stream);
  const TensorRec* d = sync_table(recs, ws, ws_host, dev, stream);
  launch_stats(d, tab, P, C, chunk_size, out.data_ptr<float>(), stream);
  return out;
}

// ---- sgg_segment_sum / sgg_finalize ------------------------------------------------------------
void check_partials(const at::Tensor& partials, const at::Tensor& seg_offsets) {
  TORCH_CHECK(partials.dim() == 2 && partials.size(1) == NUM_STATS,
              "partials must have shape [C, 4] (gg, rr, gr, pp per chunk), got ", partials.sizes());
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble,
              "partials must be float32 or float64, got ", dtype_name(partials.scalar_type()));
  TORCH_CHECK(seg_offsets.dim() == 1 && seg_offsets.size(0) >= 1 &&
                  seg_offsets.scalar_type() == at::kLong && seg_offsets.is_contiguous(),
              "seg_offsets must be a contiguous 1-D int64 tensor [S + 1], got ",
              seg_offsets.sizes());
  TORCH_CHECK(partials.is_cuda() && seg_offsets.device() == partials.device(),
              "partials and seg_offsets must be on the same CUDA device, got ", partials.device(),
              " and ", seg_offsets.device());
}

at::Tensor segment_sum_cuda(const at::Tensor& partials, const at::Tensor& seg_offsets) {
  check_partials(partials, seg_offsets);
  c10::cuda::CUDAGuard guard(partials.device());
  const int64_t S = seg_offsets.size(0) - 1, C = partials.size(0);
  at::Tensor pc = partials.contiguous();
  at::Tensor out = at::empty({S, NUM_STATS}, partials.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(partials.device().index()).stream();
  if (partials.scalar_type() == at::kFloat)
    launch_segment_sum<float>(pc.const_data_ptr<float>(), seg_offsets.const_data_ptr<int64_t>(), C,
                              S, out.data_ptr<float>(), stream);
  else
    launch_segment_sum<double>(pc.const_data_ptr<double>(), seg_offsets.const_data_ptr<int64_t>(),
                               C, S, out.data_ptr<double>(), stream);
  return out;
}

// The device table of the segments' ν tensors (float* each): built once per list of addresses
// and cached (plan.seg_nus are the same tensors step after step), so a step uploads nothing.
// A new table is copied from pinned memory on the current stream (the caching host allocator
// keeps the staging buffer until the copy is done); never inside a CUDA graph capture.
float* const* nu_table(at::TensorList nu, const at::Device& dev, cudaStream_t stream) {
  struct Entry {
    at::Device dev;
    std::vector<int64_t> addrs;
    at::Tensor table;
    bool captured;  // a CUDA graph read it: never evicted (the graph keeps its address)
  };
  static std::mutex mu;
  static auto& cache = *new std::vector<Entry>();  // never destroyed: no CUDA frees at exit
  constexpr size_t kMaxEntries = 16;
  std::vector<int64_t> addrs(nu.size());
  for (size_t s = 0; s < nu.size(); ++s) addrs[s] = as_int(nu[s].data_ptr());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  std::lock_guard<std::mutex> lock(mu);
  for (auto& e : cache)
    if (e.dev == dev && e.addrs == addrs) {
      e.captured = e.captured || status != cudaStreamCaptureStatusNone;
      return reinterpret_cast<float* const*>(e.table.data_ptr());
    }
  TORCH_CHECK(
      status == cudaStreamCaptureStatusNone,
      "sgg_fast: the norm_ema tensors of the step changed during CUDA graph capture, so their "
      "address table would have to be uploaded inside the graph. Run one eager step with the "
      "same parameters before capturing.");
  const int64_t S = static_cast<int64_t>(addrs.size());
  at::Tensor staging = at::empty({S}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(staging.data_ptr(), addrs.data(), addrs.size() * sizeof(int64_t));
  at::Tensor table = at::empty({S}, at::TensorOptions().dtype(at::kLong).device(dev));
  table.copy_(staging, /*non_blocking=*/true);
  evict_oldest_uncaptured(cache, kMaxEntries);
  cache.push_back(Entry{dev, std::move(addrs), table, false});
  return reinterpret_cast<float* const*>(cache.back().table.data_ptr());
}

// Each segment's (ν, initialised) is its own float32 [2] tensor (plan.seg_nus): the kernel
// reads it and, for mag_mode="relative" segments of a step that is not skipped, writes it back.
// The math is finalize_row (sgg_common.h), mirrored by guidance.finalize and the Triton
// _finalize_kernel (kernels/stats.py).
at::Tensor finalize_cuda(const at::Tensor& partials, const at::Tensor& seg_offsets,
                         const at::Tensor& hyper, at::TensorList nu) {
  check_partials(partials, seg_offsets);
  const int64_t S = seg_offsets.size(0) - 1, C = partials.size(0);
  TORCH_CHECK(hyper.dim() == 2 && hyper.size(0) == S && hyper.size(1) == NUM_HYPER,
              "hyper must have shape [S, ", NUM_HYPER, "] = [", S, ", ", NUM_HYPER,
              "] (guidance.HYPER_COLS), got ", hyper.sizes());
  TORCH_CHECK(hyper.device() == partials.device(), "hyper must be on ", partials.device(), ", got ",
              hyper.device());
  TORCH_CHECK(static_cast<int64_t>(nu.size()) == S,
              "nu must hold one (norm_ema, initialised) tensor per segment (", S, "), got ",
              nu.size());
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& t = nu[s];
    TORCH_CHECK(t.numel() == NUM_NU && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.device() == partials.device(),
                "nu[", s,
                "] must be a contiguous float32 tensor of 2 elements (norm_ema, initialised) on ",
                partials.device(), ", got ", t.sizes(), " ", dtype_name(t.scalar_type()), " on ",
                t.device());
  }
  c10::cuda::CUDAGuard guard(partials.device());
  const auto dt = partials.scalar_type();
  at::Tensor pc = partials.contiguous();
  at::Tensor h = hyper.to(dt).contiguous();
  at::Tensor out = at::empty({S, NUM_OUT}, partials.options());
  if (S == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(partials.device().index()).stream();
  float* const* nus = nu_table(nu, partials.device(), stream);
  if (dt == at::kFloat)
    launch_finalize<float>(pc.const_data_ptr<float>(), seg_offsets.const_data_ptr<int64_t>(), C,
                           h.const_data_ptr<float>(), nus, S, out.data_ptr<float>(), stream);
  else
    launch_finalize<double>(pc.const_data_ptr<double>(), seg_offsets.const_data_ptr<int64_t>(), C,
                            h.const_data_ptr<double>(), nus, S, out.data_ptr<double>(), stream);
  return out;
}

void check_out_cuda(const at::Tensor& out, const at::Device& dev) {
  TORCH_CHECK(out.dim() == 2 && out.size(1) == NUM_OUT && out.scalar_type() == at::kFloat &&
                  out.is_contiguous() && out.device() == dev,
              "out must be the contiguous float32 [S, 14] tensor on ", dev,
              " returned by sgg_finalize, got ", out.sizes(), " ", dtype_name(out.scalar_type()),
              " on ", out.device());
}

// ---- sgg_adamw_apply -----------------------------------------------------------------------
void adamw_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList refs,
                      const at::Tensor& out, at::IntArrayRef seg_index, at::ArrayRef<double> lr,
                      at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                      at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay,
                      at::ArrayRef<double> ref_beta, at::IntArrayRef ref_mode,
                      const c10::List<std::optional<at::Tensor>>& lr_tensors,
                      at::TensorList max_exp_avg_sqs, const std::optional<at::Tensor>& ws,
                      const std::optional<at::Tensor>& ws_host) {
  const int64_t P = params.size();
  TORCH_CHECK(max_exp_avg_sqs.empty(),
              "amsgrad (max_exp_avg_sqs) is not implemented by the CUDA sgg_adamw_apply; pass [] "
              "(SGGAdamW falls back to backend='torch' for amsgrad=True on CUDA)");
  check_apply_lengths(P, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), steps.size(),
                      refs.size(), seg_index.size(), lr.size(), beta1.size(), beta2.size(),
                      eps.size(), weight_decay.size(), ref_beta.size(), ref_mode.size(),
                      lr_tensors.size());
  if (P == 0) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), "params[0] is on ", dev, "; this is the CUDA implementation");
  check_out_cuda(out, dev);
  c10::cuda::CUDAGuard guard(dev);
  const int64_t S = out.size(0);
  std::vector<TensorRec> recs(P);
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& p = params[i];
    check_first(p, "params", i);
    check_on(p, "params", i, dev);
    check_like(grads[i], "grads", i, p, "params");
    check_like(exp_avgs[i], "exp_avgs", i, p, "params");
    check_like(exp_avg_sqs[i], "exp_avg_sqs", i, p, "params");
    const at::Tensor& st = steps[i];
    TORCH_CHECK(
        st.defined() && st.numel() == 1 && st.scalar_type() == at::kFloat && st.device() == dev,
        "steps[", i, "] must be a one-element float32 tensor on ", dev, " (state['step']), got ",
        st.sizes(), " ", dtype_name(st.scalar_type()), " on ", st.device());
    check_seg(seg_index, i, S);
    check_ref_mode(ref_mode[i], i);
    const auto r = check_apply_ref(refs[i], ref_mode[i], i, p);
    int64_t lr_ptr = 0;
    if (lr_tensors.size()) {
      if (auto lt = opt_at(lr_tensors, i)) {
        TORCH_CHECK(lt->numel() == 1 && lt->scalar_type() == at::kFloat && lt->device() == dev,
                    "lr_tensors[", i, "] must be a one-element float32 tensor on ", dev, ", got ",
                    lt->sizes(), " ", dtype_name(lt->scalar_type()), " on ", lt->device());
        lr_ptr = as_int(lt->const_data_ptr());
      }
    }
    TensorRec& rec = recs[i];
    std::memset(&rec, 0, sizeof(rec));
    rec.ptr[S_P] = as_int(p.data_ptr());
    rec.ptr[S_G] = as_int(grads[i].const_data_ptr());
    rec.ptr[S_M] = as_int(exp_avgs[i].data_ptr());
    rec.ptr[S_V] = as_int(exp_avg_sqs[i].data_ptr());
    rec.ptr[S_R] = r ? as_int(r->data_ptr()) : 0;
    rec.ptr[S_STEP] = as_int(st.data_ptr());
    rec.numel = p.numel();
    rec.lr_ptr = lr_ptr;
    rec.seg = static_cast<int32_t>(seg_index[i]);
    rec.dtype = to_cdt(p.scalar_type());
    rec.ref_mode = static_cast<int32_t>(ref_mode[i]);
    rec.lr = static_cast<float>(lr[i]);
    rec.beta1 = static_cast<float>(beta1[i]);
    rec.beta2 = static_cast<float>(beta2[i]);
    rec.eps = static_cast<float>(eps[i]);
    rec.weight_decay = static_cast<float>(weight_decay[i]);
    rec.ref_beta = static_cast<float>(ref_beta[i]);
    set_alignment(rec, kCudaApplyChunk, p.element_size());
  }
  const int64_t C = assign_chunks(recs, kCudaApplyChunk);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int32_t* tab = chunk_table(recs, C, dev, stream);
  TensorRec* d = sync_table(recs, ws, ws_host, dev, stream);
  auto* counters =
      reinterpret_cast<unsigned long long*>(reinterpret_cast<int64_t*>(d) + kRecWords * P);
  launch_apply(d, tab, P, C, kCudaApplyChunk, out.const_data_ptr<float>(), counters, stream);
}

// ---- sgg_guide_apply -----------------------------------------------------------------------
void guide_apply_cuda(at::TensorList grads, at::TensorList refs, const at::Tensor& out,
                      at::IntArrayRef seg_index, at::ArrayRef<double> ref_beta,
                      at::IntArrayRef ref_mode, const std::optional<at::Tensor>& ws,
                      const std::optional<at::Tensor>& ws_host) {
  const int64_t P = grads.size();
  check_lengths("refs", refs.size(), P, "grads");
  check_lengths("seg_index", seg_index.size(), P, "grads");
  check_lengths("ref_beta", ref_beta.size(), P, "grads");
  check_lengths("ref_mode", ref_mode.size(), P, "grads");
  if (P == 0) return;
  const at::Device dev = grads[0].device();
  TORCH_CHECK(dev.is_cuda(), "grads[0] is on ", dev, "; this is the CUDA implementation");
  check_out_cuda(out, dev);
  c10::cuda::CUDAGuard guard(dev);
  const int64_t S = out.size(0);
  std::vector<TensorRec> recs(P);
  for (int64_t i = 0; i < P; ++i) {
    const at::Tensor& g = grads[i];
    check_first(g, "grads", i);
    check_on(g, "grads", i, dev);
    check_seg(seg_index, i, S);
    check_ref_mode(ref_mode[i], i);
    const auto r = guide_ref(refs[i], i, g);
    TORCH_CHECK(r || ref_mode[i] != REF_EMA || g.numel() == 0, "refs[", i,
                "] is None but ref_mode[", i, "] = 1 (ema) updates it");
    TensorRec& rec = recs[i];
    std::memset(&rec, 0, sizeof(rec));
    rec.ptr[S_G] = as_int(g.data_ptr());
    rec.ptr[S_R] = r ? as_int(r->data_ptr()) : 0;
    rec.numel = g.numel();
    rec.seg = static_cast<int32_t>(seg_index[i]);
    rec.dtype = to_cdt(g.scalar_type());
    rec.ref_mode = static_cast<int32_t>(ref_mode[i]);
    rec.ref_beta = static_cast<float>(ref_beta[i]);
    set_alignment(rec, kCudaApplyChunk, g.element_size());
  }
  const int64_t C = assign_chunks(recs, kCudaApplyChunk);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int32_t* tab = chunk_table(recs, C, dev, stream);
  const TensorRec* d = sync_table(recs, ws, ws_host, dev, stream);
  launch_guide(d, tab, P, C, kCudaApplyChunk, out.const_data_ptr<float>(), stream);
}

}  // namespace
}  // namespace cuda
}  // namespace sgg_fast

TORCH_LIBRARY_IMPL(sgg_fast, CUDA, m) {
  m.impl("sgg_stats", &sgg_fast::cuda::stats_cuda);
  m.impl("sgg_segment_sum", &sgg_fast::cuda::segment_sum_cuda);
  m.impl("sgg_finalize", &sgg_fast::cuda::finalize_cuda);
  m.impl("sgg_adamw_apply", &sgg_fast::cuda::adamw_apply_cuda);
  m.impl("sgg_guide_apply", &sgg_fast::cuda::guide_apply_cuda);
}
