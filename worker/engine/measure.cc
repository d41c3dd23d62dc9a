#include "worker/engine/measure.h"

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>

#include "worker/engine/error.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  double idx = p * static_cast<double>(v.size() - 1);
  size_t lo = static_cast<size_t>(idx);
  size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
}

// Forces completion of queued device work (a device-to-host copy waits for it).
void Sync(const at::Tensor& t) { (void)t.sum().item<double>(); }

Latency TimeBatch(torch::jit::Module& module, const MeasureContext& ctx, int batch) {
  std::vector<int64_t> shape = ctx.input_shape;
  shape[0] = batch;
  std::vector<c10::IValue> input = ForwardArgs(at::randn(shape, at::TensorOptions().device(ctx.device)),
                                               RandomInputs(ctx.more_shapes, batch, ctx.device));
  std::vector<double> ms;
  c10::InferenceMode guard;
  for (int i = 0; i < 2; ++i) Sync(OutputTensor(module.forward(input)));
  auto budget_end = Clock::now() + std::chrono::duration<double>(ctx.latency_budget_seconds);
  while (ms.size() < 3 || (ms.size() < 200 && Clock::now() < budget_end)) {
    if (ctx.check_cancel) ctx.check_cancel();
    auto t0 = Clock::now();
    Sync(OutputTensor(module.forward(input)));
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  Latency l;
  l.batch = batch;
  l.p50_ms = Percentile(ms, 0.5);
  l.p95_ms = Percentile(ms, 0.95);
  l.iterations = static_cast<int>(ms.size());
  return l;
}

}  // namespace

uint64_t DeflatedSize(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw EngineError(Code::kInternal, "IO", "cannot read " + path);
  z_stream zs{};
  if (deflateInit(&zs, 6) != Z_OK) throw EngineError(Code::kInternal, "IO", "deflateInit failed");
  std::vector<unsigned char> inbuf(1 << 20), outbuf(1 << 20);
  uint64_t total = 0;
  int flush = Z_NO_FLUSH;
  do {
    in.read(reinterpret_cast<char*>(inbuf.data()), static_cast<std::streamsize>(inbuf.size()));
    zs.avail_in = static_cast<uInt>(in.gcount());
    zs.next_in = inbuf.data();
    flush = in.eof() ? Z_FINISH : Z_NO_FLUSH;
    do {
      zs.avail_out = static_cast<uInt>(outbuf.size());
      zs.next_out = outbuf.data();
      deflate(&zs, flush);
      total += outbuf.size() - zs.avail_out;
    } while (zs.avail_out == 0);
  } while (flush != Z_FINISH);
  deflateEnd(&zs);
  return total;
}

NamedOutputs RunBatchedOutputs(torch::jit::Module& module, const at::Tensor& inputs, c10::Device device,
                               int64_t batch, const std::function<void()>& check_cancel,
                               const std::vector<at::Tensor>& more) {
  c10::InferenceMode guard;
  std::vector<std::string> names;
  std::vector<std::vector<at::Tensor>> parts;
  for (int64_t i = 0; i < inputs.size(0); i += batch) {
    if (check_cancel) check_cancel();
    const int64_t end = std::min(i + batch, inputs.size(0));
    std::vector<at::Tensor> rest;
    for (const at::Tensor& t : more) rest.push_back(t.slice(0, i, end).to(device));
    auto outs = OutputTensors(module.forward(ForwardArgs(inputs.slice(0, i, end).to(device), rest)));
    if (i == 0) {
      for (const auto& o : outs) names.push_back(o.first);
      parts.resize(outs.size());
    } else if (outs.size() != names.size()) {
      throw EngineError(Code::kInvalidArgument, "MODEL_OUTPUT",
                        "the model returned " + std::to_string(names.size()) +
                            " tensors for the first batch and " + std::to_string(outs.size()) +
                            " for a later one");
    }
    for (size_t k = 0; k < outs.size(); ++k) {
      at::Tensor y = outs[k].second;
      if (y.is_quantized()) y = y.dequantize();
      if (!y.is_floating_point()) y = y.to(at::kFloat);
      parts[k].push_back(y.to(at::kFloat).cpu());
    }
  }
  NamedOutputs result;
  for (size_t k = 0; k < names.size(); ++k) {
    // An output without a batch dimension (a scalar, a per-model tensor) is compared as it is.
    bool batched = true;
    for (const auto& t : parts[k]) batched &= t.dim() >= 1;
    result.emplace_back(names[k], batched ? at::cat(parts[k]) : parts[k].front());
  }
  return result;
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
void CompareOutputs(const NamedOutputs& outs, const MeasureContext& ctx, ModelStats& s) {
  if (outs.size() != ctx.reference.size()) {
    throw EngineError(Code::kInternal, "OUTPUT_SHAPE",
                      "the compressed model returns " + std::to_string(outs.size()) +
                          " tensors, the original " + std::to_string(ctx.reference.size()));
  }
  for (size_t k = 0; k < outs.size(); ++k) {
    const auto& [name, out] = outs[k];
    const at::Tensor& ref = ctx.reference[k].second;
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
  const at::Tensor& ref = ctx.reference[0].second;
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

ModelStats Measure(torch::jit::Module& module, const std::string& path, const MeasureContext& ctx) {
  ModelStats s;
  s.size_bytes = std::filesystem::file_size(path);
  s.deflated_bytes = DeflatedSize(path);
  const auto packed = PackedWeights(module);
  CountParameters(module, packed, s);
  if (auto macs = CountMacs(module, ctx.input_shape, ctx.more_shapes)) s.macs = macs->macs;
  // Packed quantized weights run on the CPU only.
  c10::Device device = packed.empty() ? ctx.device : c10::Device(c10::kCPU);
  module.to(device);
  for (int b : ctx.latency_batches) s.latency.push_back(TimeBatch(module, ctx, b));
  CompareOutputs(RunBatchedOutputs(module, ctx.samples, device, 8, ctx.check_cancel, ctx.more_samples), ctx,
                 s);
  if (ctx.eval && ctx.eval->labels.defined()) Accuracy(module, device, ctx, s);
  return s;
}

Latency TimeLatency(torch::jit::Module& module, const MeasureContext& ctx, int batch) {
  MeasureContext on = ctx;
  if (!PackedWeights(module).empty()) on.device = c10::kCPU;
  module.to(on.device);
  return TimeBatch(module, on, batch);
}

}  // namespace pare::engine
