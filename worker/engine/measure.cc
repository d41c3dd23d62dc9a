#include "worker/engine/measure.h"

#ifdef PARE_HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif
#include <zlib.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>

#include "worker/engine/error.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine {

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  double idx = p * static_cast<double>(v.size() - 1);
  size_t lo = static_cast<size_t>(idx);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
}

namespace {

using Clock = std::chrono::steady_clock;

// Forces completion of queued device work (a device-to-host copy waits for it).
void Sync(const at::Tensor& t) { (void)t.sum().item<double>(); }

// Collects each run's outputs (every tensor forward returns, as float on the CPU) and joins
// them along the batch dimension.
class OutputCollector {
 public:
  void Add(const c10::IValue& result) {
    auto outs = OutputTensors(result);
    if (parts_.empty()) {
      for (const auto& o : outs) names_.push_back(o.first);
      parts_.resize(outs.size());
    } else if (outs.size() != names_.size()) {
      throw EngineError(Code::kInvalidArgument, "MODEL_OUTPUT",
                        "the model returned " + std::to_string(names_.size()) +
                            " tensors for the first batch and " + std::to_string(outs.size()) +
                            " for a later one");
    }
    for (size_t k = 0; k < outs.size(); ++k) {
      at::Tensor y = outs[k].second;
      if (y.is_quantized()) y = y.dequantize();
      parts_[k].push_back(y.to(at::kFloat).cpu());
    }
  }
  NamedOutputs Take() {
    NamedOutputs result;
    for (size_t k = 0; k < names_.size(); ++k) {
      // An output without a batch dimension (a scalar, a per-model tensor) is compared as it is.
      bool batched = true;
      for (const auto& t : parts_[k]) batched &= t.dim() >= 1;
      result.emplace_back(names_[k], batched ? at::cat(parts_[k]) : parts_[k].front());
    }
    return result;
  }

 private:
  std::vector<std::string> names_;
  std::vector<std::vector<at::Tensor>> parts_;
};

// Forward's inputs for samples [begin, end) on `device`.
std::vector<c10::IValue> SampleArgs(const at::Tensor& inputs, const std::vector<at::Tensor>& more,
                                    int64_t begin, int64_t end, c10::Device device) {
  std::vector<at::Tensor> rest;
  for (const at::Tensor& t : more) rest.push_back(t.slice(0, begin, end).to(device));
  return ForwardArgs(inputs.slice(0, begin, end).to(device), rest);
}

// Times `run(i)` (i counts from 0): two untimed warm-up calls, then at least 3 timed ones and
// more until the budget (which the warm-up spends too) is spent and `must_run` calls were made,
// at most 200 timed. `keep` sees every call's result, untimed.
Latency TimeRuns(const MeasureContext& ctx, int batch, const std::function<c10::IValue(int64_t)>& run,
                 const std::function<void(int64_t, const c10::IValue&)>& keep, int64_t must_run = 0) {
  std::vector<double> ms;
  const auto start = Clock::now();
  const auto budget_end = start + std::chrono::duration<double>(ctx.latency_budget_seconds);
  int64_t i = 0;
  for (; i < 2; ++i) {
    c10::IValue out = run(i);
    Sync(OutputTensor(out));
    keep(i, out);
  }
  while (ms.size() < 3 || (ms.size() < 200 && (i < must_run || Clock::now() < budget_end))) {
    if (ctx.check_cancel) ctx.check_cancel();
    auto t0 = Clock::now();
    c10::IValue out = run(i);
    Sync(OutputTensor(out));
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    keep(i++, out);
  }
  Latency l;
  l.batch = batch;
  l.p50_ms = Percentile(ms, 0.5);
  l.p95_ms = Percentile(ms, 0.95);
  l.iterations = static_cast<int>(ms.size());
  l.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return l;
}

Latency TimeBatch(torch::jit::Module& module, const MeasureContext& ctx, int batch) {
  std::vector<int64_t> shape = ctx.input_shape;
  shape[0] = batch;
  std::vector<c10::IValue> input = ForwardArgs(at::randn(shape, at::TensorOptions().device(ctx.device)),
                                               RandomInputs(ctx.more_shapes, batch, ctx.device));
  c10::InferenceMode guard;
  return TimeRuns(
      ctx, batch, [&](int64_t) { return module.forward(input); }, [](int64_t, const c10::IValue&) {});
}

// Whether the agreement samples are inputs of the timed shape (batch 1 of them can be timed).
bool SamplesFitTheShape(const MeasureContext& ctx) {
  if (!ctx.samples.defined() || ctx.samples.size(0) == 0) return false;
  if (ctx.samples.sizes().slice(1) != at::IntArrayRef(ctx.input_shape).slice(1)) return false;
  if (ctx.more_samples.size() != ctx.more_shapes.size()) return false;
  for (size_t k = 0; k < ctx.more_shapes.size(); ++k) {
    if (ctx.more_samples[k].sizes().slice(1) != at::IntArrayRef(ctx.more_shapes[k]).slice(1)) return false;
  }
  return true;
}

// Batch-1 latency timed on the agreement samples, one at a time and in turn: the timed runs are
// also the agreement runs, so the samples cost no time of their own, and every sample runs in them
// even past the budget (it has to run anyway): the first two as the warm-up, the rest timed.
// Beyond 200 timed runs the rest go through in batches of 8, untimed.
Latency TimeOnSamples(torch::jit::Module& module, const MeasureContext& ctx, c10::Device device,
                      NamedOutputs& outputs) {
  const int64_t n = ctx.samples.size(0);
  std::vector<std::vector<c10::IValue>> args;
  for (int64_t k = 0; k < n; ++k) args.push_back(SampleArgs(ctx.samples, ctx.more_samples, k, k + 1, device));
  OutputCollector collected;
  int64_t kept = 0;
  c10::InferenceMode guard;
  Latency l = TimeRuns(
      ctx, 1, [&](int64_t i) { return module.forward(args[static_cast<size_t>(i % n)]); },
      [&](int64_t i, const c10::IValue& out) {
        if (i < n) {
          collected.Add(out);
          ++kept;
        }
      },
      n);
  for (int64_t i = kept; i < n; i += 8) {
    if (ctx.check_cancel) ctx.check_cancel();
    collected.Add(module.forward(SampleArgs(ctx.samples, ctx.more_samples, i, std::min(i + 8, n), device)));
  }
  outputs = collected.Take();
  return l;
}

// The deflated size of one block at level 6: libdeflate where the build has it (several times
// zlib's speed), else zlib.
constexpr size_t kDeflateBlock = 4u << 20;
uint64_t DeflateBlock(const char* data, size_t n) {
#ifdef PARE_HAVE_LIBDEFLATE
  struct Free {
    void operator()(libdeflate_compressor* c) const { libdeflate_free_compressor(c); }
  };
  std::unique_ptr<libdeflate_compressor, Free> c(libdeflate_alloc_compressor(6));
  if (!c) throw EngineError(Code::kInternal, "IO", "libdeflate_alloc_compressor failed");
  std::vector<char> out(libdeflate_deflate_compress_bound(c.get(), n));
  const size_t got = libdeflate_deflate_compress(c.get(), data, n, out.data(), out.size());
  if (got == 0) throw EngineError(Code::kInternal, "IO", "libdeflate_deflate_compress failed");
  return got;
#else
  uLongf bound = compressBound(static_cast<uLong>(n));
  std::vector<Bytef> out(bound);
  if (compress2(out.data(), &bound, reinterpret_cast<const Bytef*>(data), static_cast<uLong>(n), 6) != Z_OK)
    throw EngineError(Code::kInternal, "IO", "zlib compress2 failed");
  return bound;
#endif
}

}  // namespace

uint64_t DeflatedSize(const std::string& path) {
  const uint64_t size = std::filesystem::file_size(path);
  const size_t blocks = static_cast<size_t>((size + kDeflateBlock - 1) / kDeflateBlock);
  std::vector<uint64_t> sizes(blocks, 0);
  // Blocks are compressed on up to as many threads as the job's intra-op threads, each taking the
  // next block until none is left. Plain threads: at::parallel_for's OpenMP region is compiled
  // into the caller, and this engine is built without -fopenmp (it would run on one thread).
  const size_t threads =
      std::max<size_t>(1, std::min<size_t>(blocks, static_cast<size_t>(at::get_num_threads())));
  std::atomic<size_t> next{0};
  std::vector<std::exception_ptr> failed(threads);
  auto work = [&](size_t t) {
    try {
      std::ifstream in(path, std::ios::binary);
      std::vector<char> block(kDeflateBlock);
      for (size_t i = next++; i < blocks; i = next++) {
        in.clear();
        in.seekg(static_cast<std::streamoff>(static_cast<uint64_t>(i) * kDeflateBlock));
        in.read(block.data(), static_cast<std::streamsize>(block.size()));
        const auto got = in.gcount();
        if (got <= 0) throw EngineError(Code::kInternal, "IO", "cannot read " + path);
        sizes[i] = DeflateBlock(block.data(), static_cast<size_t>(got));
      }
    } catch (...) {
      failed[t] = std::current_exception();
      next = blocks;  // the others stop at their next block
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (size_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(work, t);
    } catch (...) {
      break;  // no more threads to be had: the ones running (and this one) take every block
    }
  }
  work(0);
  for (auto& th : pool) th.join();
  for (const auto& e : failed) {
    if (e) std::rethrow_exception(e);
  }
  uint64_t total = 0;
  for (uint64_t n : sizes) total += n;
  return total;
}

NamedOutputs RunBatchedOutputs(torch::jit::Module& module, const at::Tensor& inputs, c10::Device device,
                               int64_t batch, const std::function<void()>& check_cancel,
                               const std::vector<at::Tensor>& more) {
  c10::InferenceMode guard;
  OutputCollector collected;
  for (int64_t i = 0; i < inputs.size(0); i += batch) {
    if (check_cancel) check_cancel();
    collected.Add(module.forward(SampleArgs(inputs, more, i, std::min(i + batch, inputs.size(0)), device)));
  }
  return collected.Take();
}

at::Tensor RunBatched(torch::jit::Module& module, const at::Tensor& inputs, c10::Device device, int64_t batch,
                      const std::function<void()>& check_cancel, const std::vector<at::Tensor>& more) {
  return RunBatchedOutputs(module, inputs, device, batch, check_cancel, more).front().second;
}

std::pair<double, double> OutputCosines(const at::Tensor& out, const at::Tensor& reference) {
  at::Tensor a = out.dim() >= 2 ? out.flatten(1) : out.reshape({1, -1});
  at::Tensor r = reference.dim() >= 2 ? reference.flatten(1) : reference.reshape({1, -1});
  const double plain = at::cosine_similarity(a, r, 1, 1e-12).mean().item<double>();
  if (r.size(0) < 2) return {plain, plain};
  at::Tensor mean = r.mean(0, true);
  const double centred = at::cosine_similarity(a - mean, r - mean, 1, 1e-12).mean().item<double>();
  return {plain, centred};
}

bool IsQuantized(const torch::jit::Module& module) { return !PackedWeights(module).empty(); }

namespace {

// Parameter counts and each layer's zeros: module parameters, frozen graph constants and packed
// quantized weights alike.
void CountParameters(const torch::jit::Module& module, const std::vector<PackedWeight>& packed,
                     ModelStats& s) {
  for (const auto& p : module.parameters()) {
    s.parameters += static_cast<uint64_t>(p.numel());
    s.nonzero_parameters += static_cast<uint64_t>(p.count_nonzero().item<int64_t>());
  }
  for (const auto& w : PrunableWeights(module)) {
    uint64_t n = static_cast<uint64_t>(w.weight.numel());
    s.layers.push_back({w.name, n, n - static_cast<uint64_t>(w.weight.count_nonzero().item<int64_t>())});
  }
  // A frozen module (quantization's Finalize freezes) keeps its weights as graph constants.
  auto add = [&](const std::string& name, const at::Tensor& weight, bool layer) {
    uint64_t n = static_cast<uint64_t>(weight.numel());
    uint64_t zeros = n - static_cast<uint64_t>(weight.count_nonzero().item<int64_t>());
    s.parameters += n;
    s.nonzero_parameters += n - zeros;
    if (layer) s.layers.push_back({name, n, zeros});
  };
  for (const auto& w : FrozenWeights(module)) add(w.name, w.weight, w.weight.dim() >= 2);
  for (const auto& w : packed) add(w.name, w.weight.dequantize(), true);
}

// Agreement with the original's outputs on the samples: cosines per output (the whole's figure is
// the worst output's) and top-1 agreement of the primary one.
void CompareOutputs(const NamedOutputs& outs, const NamedOutputs& reference, ModelStats& s) {
  if (outs.size() != reference.size()) {
    throw EngineError(Code::kInternal, "OUTPUT_SHAPE",
                      "the compressed model returns " + std::to_string(outs.size()) +
                          " tensors, the original " + std::to_string(reference.size()));
  }
  for (size_t k = 0; k < outs.size(); ++k) {
    const auto& [name, out] = outs[k];
    const at::Tensor& ref = reference[k].second;
    const std::string which = outs.size() > 1 ? "output '" + name + "'" : "output";
    if (out.sizes() != ref.sizes()) {
      throw EngineError(Code::kInternal, "OUTPUT_SHAPE",
                        "the compressed model's " + which + " shape " + c10::str(out.sizes()) +
                            " differs from the original's " + c10::str(ref.sizes()));
    }
    auto [plain, centred] = OutputCosines(out, ref);
    if (outs.size() > 1) s.outputs.push_back({name, plain, centred});
    if (k == 0 || plain < s.output_cosine) s.output_cosine = plain;
    if (k == 0 || centred < s.output_centred_cosine) s.output_centred_cosine = centred;
  }
  // Classes along dimension 1: one arg-max per sample, or per position of a dense output (a
  // segmentation map's pixels).
  const at::Tensor& out = outs[0].second;
  const at::Tensor& ref = reference[0].second;
  at::Tensor a = out.dim() >= 2 ? out : out.reshape({1, -1});
  at::Tensor r = ref.dim() >= 2 ? ref : ref.reshape({1, -1});
  s.top1_agreement = (a.argmax(1) == r.argmax(1)).to(at::kFloat).mean().item<double>();
}

// Top-1 (and top-5) accuracy on the labelled eval set. One label per sample scores a classifier's
// [N, classes] (or [N, classes, 1, 1]) output; a dense output (a segmentation map) has no such
// score, and accuracy is left out.
void Accuracy(torch::jit::Module& module, c10::Device device, const MeasureContext& ctx, ModelStats& s) {
  at::Tensor logits =
      RunBatched(module, ctx.eval->images, device, 64, ctx.check_cancel, ctx.eval->more_images);
  if (logits.dim() < 2 || logits.numel() != logits.size(0) * logits.size(1)) return;
  logits = logits.flatten(1);
  const at::Tensor& labels = ctx.eval->labels;
  if (labels.max().item<int64_t>() >= logits.size(1)) {
    throw EngineError(Code::kInvalidArgument, "BAD_DATASET",
                      "eval labels go up to " + std::to_string(labels.max().item<int64_t>()) +
                          " but the model has " + std::to_string(logits.size(1)) + " outputs");
  }
  s.top1_accuracy = (logits.argmax(1) == labels).to(at::kFloat).mean().item<double>();
  if (logits.size(1) >= 5) {
    at::Tensor top5 = std::get<1>(logits.topk(5, 1));
    s.top5_accuracy = (top5 == labels.unsqueeze(1)).any(1).to(at::kFloat).mean().item<double>();
  }
}

}  // namespace

ModelStats Measure(torch::jit::Module& module, const std::string& path, const MeasureContext& ctx,
                   NamedOutputs* outputs_out) {
  ModelStats s;
  s.size_bytes = std::filesystem::file_size(path);
  s.deflated_bytes = DeflatedSize(path);
  const auto packed = PackedWeights(module);
  CountParameters(module, packed, s);
  if (auto macs = CountMacs(module, ctx.input_shape, ctx.more_shapes)) s.macs = macs->macs;
  // Packed quantized weights run on the CPU only.
  c10::Device device = packed.empty() ? ctx.device : c10::Device(c10::kCPU);
  module.to(device);
  NamedOutputs outputs;
  const bool on_samples = SamplesFitTheShape(ctx);
  for (int b : ctx.latency_batches) {
    s.latency.push_back(b == 1 && on_samples && outputs.empty() ? TimeOnSamples(module, ctx, device, outputs)
                                                                : TimeBatch(module, ctx, b));
  }
  if (outputs.empty())
    outputs = RunBatchedOutputs(module, ctx.samples, device, 8, ctx.check_cancel, ctx.more_samples);
  // Without a reference this is the original: its outputs are the reference.
  CompareOutputs(outputs, ctx.reference.empty() ? outputs : ctx.reference, s);
  if (ctx.eval && ctx.eval->labels.defined()) Accuracy(module, device, ctx, s);
  if (outputs_out) *outputs_out = std::move(outputs);
  return s;
}

Latency TimeLatency(torch::jit::Module& module, const MeasureContext& ctx, int batch) {
  MeasureContext on = ctx;
  if (!PackedWeights(module).empty()) on.device = c10::kCPU;
  module.to(on.device);
  return TimeBatch(module, on, batch);
}

}  // namespace pare::engine
