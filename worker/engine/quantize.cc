#include "worker/engine/quantize.h"

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/fold_conv_bn.h>
#include <torch/csrc/jit/passes/quantization/finalize.h>
#include <torch/csrc/jit/passes/quantization/insert_observers.h>
#include <torch/csrc/jit/passes/quantization/insert_quant_dequant.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/runtime/jit_exception.h>

#include "worker/engine/channel_prune.h"
#include "worker/engine/cpu_features.h"
#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/isolate.h"
#include "worker/engine/model_util.h"
#include "worker/engine/quant_passes.h"

namespace pare::engine {
namespace {

// Calibration batches: the arguments of one forward call each.
using Batches = std::vector<std::vector<c10::IValue>>;

}  // namespace

torch::jit::Module ConvertHalf(const torch::jit::Module& input, const HalfPrecisionSpec& spec) {
  const auto& schema = input.get_method("forward").function().getSchema();
  // self + one tensor in, one tensor out: anything else cannot be wrapped transparently.
  if (schema.arguments().size() != 2 || schema.returns().size() != 1 ||
      !schema.arguments()[1].type()->isSubtypeOf(*c10::TensorType::get()) ||
      !schema.returns()[0].type()->isSubtypeOf(*c10::TensorType::get())) {
    throw EngineError(
        Code::kInvalidArgument, "UNSUPPORTED_MODEL",
        "quantize.fp16/bf16 needs a forward that takes one tensor and returns one tensor; this one is " +
            c10::str(schema));
  }
  torch::jit::Module inner = input.clone();
  inner.eval();
  inner.to(spec.bf16 ? at::kBFloat16 : at::kHalf);
  torch::jit::Module wrapper(
      c10::QualifiedName(spec.bf16 ? "__torch__.pare.BFloat16Model" : "__torch__.pare.Float16Model"));
  wrapper.register_attribute("training", c10::BoolType::get(), false);
  wrapper.register_module("model", inner);
  // TorchScript source has no dtype names here: dtypes are their ScalarType numbers.
  wrapper.register_attribute("weight_dtype", c10::IntType::get(),
                             static_cast<int64_t>(spec.bf16 ? at::kBFloat16 : at::kHalf));
  wrapper.register_attribute("io_dtype", c10::IntType::get(), static_cast<int64_t>(at::kFloat));
  wrapper.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    return self.model.forward(x.to(self.weight_dtype)).to(self.io_dtype)
)JIT");
  return wrapper;
}

// Whether static INT8 for `target` must keep activations to 7 bits (0..127): on x86 without
// VNNI, oneDNN's int8 kernels multiply u8*s8 pairs into saturating 16-bit sums (VPMADDUBSW),
// which full-range activations overflow (PyTorch's fbgemm qconfig reduces the range for the
// same reason). QNNPACK sums in 32 bits everywhere.
static bool ReduceRange(const std::string& target, std::string& why) {
  if (target == "avx2") {
    why = "the target is avx2 (x86 without VNNI)";
    return true;
  }
  if (target == "vnni") {
    why = "the target is vnni";
    return false;
  }
  if (target != "auto" && !target.empty()) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                      "quantize.static.target must be auto, avx2 or vnni");
  }
  const CpuFeatures& cpu = HostCpu();
  if (at::globalContext().qEngine() == at::QEngine::QNNPACK) {
    why = "the QNNPACK engine sums in 32 bits";
    return false;
  }
  if (!cpu.x86) {
    why = "this worker's CPU is not x86";
    return false;
  }
  const std::string name = cpu.model.empty() ? "this worker's CPU" : "this worker's CPU (" + cpu.model + ")";
  if (cpu.FastInt8()) {
    why = name + " has " + (cpu.avx512_vnni ? "AVX-512 VNNI" : "AMX");
    return false;
  }
  why = name + " has no AVX-512 VNNI or AMX, so its int8 kernels sum in saturating 16 bits";
  return true;
}

static torch::jit::Module QuantizeStaticOnce(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                             const Batches& calibration, std::vector<std::string>& notes,
                                             const std::set<std::string>& keep_float = {});

// The first `n` inputs of a batch (every tensor argument sliced along its first dimension).
static std::vector<c10::IValue> FirstSamples(const std::vector<c10::IValue>& batch, int64_t n) {
  std::vector<c10::IValue> out;
  for (const auto& v : batch) out.push_back(v.isTensor() ? v.toTensor().slice(0, 0, n) : v);
  return out;
}

// LibTorch's own complaint inside a QUANTIZE_UNSUPPORTED message, its first line, for notes.
static std::string LibTorchReason(const std::string& message) {
  static const std::string kPrefix = "cannot handle this model (";
  std::string why = message;
  if (auto at = why.find(kPrefix); at != std::string::npos) why = why.substr(at + kPrefix.size());
  return why.substr(
      0, std::min({why.find('\n'), why.find(", if node"), why.find("); quantize.dynamic"), size_t{200}}));
}

// Submodules (by path) whose own forward branches or loops on something other than an
// assertion, grouped by class name: the parts graph-mode quantization may refuse to observe
// (Swin's shifted-window attention, nn.MultiheadAttention), after eval specialization.
static std::map<std::string, std::vector<std::string>> ControlFlowModules(const torch::jit::Module& input) {
  torch::jit::Module m = input.clone();
  m.eval();
  SpecializeForEval(m);
  std::map<std::string, std::vector<std::string>> out;
  for (const auto& item : m.named_modules()) {
    if (item.name.empty() || !item.value.find_method("forward")) continue;
    bool flow = false;
    std::function<void(torch::jit::Node*)> visit = [&](torch::jit::Node* n) {
      if (n->kind() == c10::prim::CallFunction) {
        // torch.nn.functional's calls stay calls (F.interpolate branches on rank and mode).
        auto fn_type = n->input(0)->type()->cast<c10::FunctionType>();
        torch::jit::GraphFunction* fn =
            fn_type ? torch::jit::tryToGraphFunction(*fn_type->function()) : nullptr;
        if (fn) ForEachNode(fn->graph()->block(), visit);
        return;
      }
      if (n->kind() == c10::prim::Loop) flow = true;
      if (n->kind() != c10::prim::If) return;
      bool raises = false;
      for (torch::jit::Block* b : n->blocks()) {
        for (torch::jit::Node* inner : b->nodes()) raises |= inner->kind() == c10::prim::RaiseException;
      }
      flow |= !raises;
    };
    ForEachNode(item.value.get_method("forward").graph()->block(), visit);
    if (!flow) continue;
    auto type = item.value.type()->name();
    out[type ? type->name() : "?"].push_back(item.name);
  }
  return out;
}

// When the whole model cannot be quantized: the same with the submodules that have control
// flow kept float (qconfig None for their paths), then each kind of them quantized again where
// the model still converts. Throws the original error when even that fails.
static torch::jit::Module QuantizeAroundControlFlow(const torch::jit::Module& input,
                                                    const StaticQuantSpec& spec, const Batches& calibration,
                                                    std::vector<std::string>& notes, const EngineError& first,
                                                    const std::set<std::string>& always_float) {
  auto kinds = ControlFlowModules(input);
  std::set<std::string> keep = always_float;
  for (const auto& [kind, paths] : kinds) keep.insert(paths.begin(), paths.end());
  if (keep.size() == always_float.size()) throw first;
  const size_t before = notes.size();
  torch::jit::Module best;
  try {
    best = QuantizeStaticOnce(input, spec, calibration, notes, keep);
  } catch (const std::exception&) {
    notes.resize(before);
    throw first;
  }
  std::vector<std::string> best_notes(notes.begin() + static_cast<long>(before), notes.end());
  std::map<std::string, std::vector<std::string>> kept_float = kinds;
  for (const auto& [kind, paths] : kinds) {
    std::set<std::string> fewer = keep;
    for (const auto& p : paths) fewer.erase(p);
    std::vector<std::string> trial_notes;
    try {
      torch::jit::Module q = QuantizeStaticOnce(input, spec, calibration, trial_notes, fewer);
      // The module-form result is checked as a whole by the caller; here it must at least run.
      torch::NoGradGuard no_grad;
      q.forward(calibration.front());
      best = q;
      best_notes = trial_notes;
      keep = fewer;
      kept_float.erase(kind);
    } catch (const std::exception&) {
    }
  }
  notes.resize(before);
  notes.insert(notes.end(), best_notes.begin(), best_notes.end());
  // The first line of LibTorch's complaint, without Pare's wrapping around it.
  const std::string why = LibTorchReason(first.what());
  for (const auto& [kind, paths] : kept_float) {
    notes.push_back("kept float: " + std::to_string(paths.size()) + " " + kind + " module(s) (" +
                    paths.front() + (paths.size() > 1 ? ", ..." : "") +
                    "): LibTorch's graph-mode quantization cannot observe their control flow (" + why + ")");
  }
  return best;
}

// The last resort when the model still does not convert (a quantized kernel that fails on
// some layers: oneDNN's conv2d_relu on some grouped convolutions at batch 1). Layers are grouped
// into kinds (type, weight shape, groups: a kernel that fails on one layer fails on the others of
// its kind), the kinds whose quantization breaks the model are found by bisection in module
// order (the smallest failing prefix, then on from there), their layers kept float, and the rest
// is quantized.
static torch::jit::Module QuantizeAroundBrokenLayers(const torch::jit::Module& input,
                                                     const StaticQuantSpec& spec, const Batches& calibration,
                                                     std::vector<std::string>& notes,
                                                     const EngineError& first,
                                                     const std::set<std::string>& always_float) {
  std::vector<std::string> kinds;                          // in order of first appearance
  std::map<std::string, std::vector<std::string>> layers;  // kind -> layer paths
  for (const auto& item : input.named_modules()) {
    auto type = item.value.type()->name();
    const std::string t = type ? type->name() : "";
    if (item.name.empty() || always_float.count(item.name) ||
        !(t.rfind("Conv", 0) == 0 || t == "Linear" || t.find("LinearWithBias") != std::string::npos)) {
      continue;
    }
    std::string k = t;
    if (item.value.hasattr("weight") && item.value.attr("weight").isTensor()) {
      k += c10::str(item.value.attr("weight").toTensor().sizes());
    }
    if (item.value.hasattr("groups") && item.value.attr("groups").isInt()) {
      k += " groups " + std::to_string(item.value.attr("groups").toInt());
    }
    if (!layers.count(k)) kinds.push_back(k);
    layers[k].push_back(item.name);
  }
  constexpr int kMaxTrials = 40;
  std::vector<std::string> trial_notes;
  // Quantizes the layers of the kinds in `with` (and what is not a layer), the others float.
  auto attempt = [&](const std::vector<size_t>& with, torch::jit::Module* out) {
    std::set<std::string> keep = always_float;
    for (const auto& [k, paths] : layers) keep.insert(paths.begin(), paths.end());
    for (size_t k : with) {
      for (const auto& p : layers[kinds[k]]) keep.erase(p);
    }
    trial_notes.clear();
    try {
      torch::jit::Module q = QuantizeStaticOnce(input, spec, calibration, trial_notes, keep);
      if (out) *out = q;
      return std::string();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
  };
  const Isolated found =
      IsolateFailures(kinds.size(), first.what(), kMaxTrials,
                      [&](const std::vector<size_t>& with) { return attempt(with, nullptr); });
  const std::vector<size_t>& allowed = found.allowed;
  torch::jit::Module best;
  if (allowed.empty() || !attempt(allowed, &best).empty()) throw first;
  notes.insert(notes.end(), trial_notes.begin(), trial_notes.end());
  size_t quantized = 0, total = 0;
  for (const auto& [k, paths] : layers) total += paths.size();
  for (size_t k : allowed) quantized += layers[kinds[k]].size();
  const std::string why = found.culprits.empty() ? "" : LibTorchReason(found.culprits.begin()->second);
  const std::string first_layer =
      found.culprits.empty() ? "" : layers[kinds[found.culprits.begin()->first]].front();
  notes.push_back(
      "kept float: " + std::to_string(total - quantized) + " of " + std::to_string(total) +
      " conv/linear layers, " + std::to_string(found.culprits.size()) +
      " kind(s) whose quantization broke the model (" + first_layer + (total - quantized > 1 ? ", ..." : "") +
      ": " + why + ")" +
      (found.exhausted ? " and the kinds not tried in " + std::to_string(kMaxTrials) + " conversions" : ""));
  return best;
}

// Transposed convolution submodules with a non-zero output_padding: oneDNN has no quantized
// kernel for them ("ONEDNN only supports zero output_padding"), so they stay float.
static std::set<std::string> PaddedTransposedConvolutions(const torch::jit::Module& input) {
  std::set<std::string> out;
  if (at::globalContext().qEngine() != at::QEngine::ONEDNN) return out;
  for (const auto& item : input.named_modules()) {
    auto type = item.value.type()->name();
    if (!type || type->name().rfind("ConvTranspose", 0) != 0 || !item.value.hasattr("output_padding"))
      continue;
    auto padding = item.value.attr("output_padding");
    bool padded = false;
    if (padding.isTuple()) {
      for (const auto& e : padding.toTupleRef().elements()) padded |= e.isInt() && e.toInt() != 0;
    } else if (padding.isIntList()) {
      for (int64_t v : padding.toIntVector()) padded |= v != 0;
    }
    if (padded) out.insert(item.name);
  }
  return out;
}

// The excluded paths, each checked to name a submodule of `input` that holds a conv or linear layer
// (itself or below it). BAD_RECIPE names the entry and what the model has instead.
static std::set<std::string> CheckExcluded(const torch::jit::Module& input,
                                           const std::vector<std::string>& exclude,
                                           const std::string& what = "quantize.static.exclude") {
  std::set<std::string> layers;  // conv and linear submodules
  std::set<std::string> modules;
  for (const auto& item : input.named_modules()) {
    if (item.name.empty()) continue;
    modules.insert(item.name);
    auto type = item.value.type()->name();
    const std::string t = type ? type->name() : "";
    if (t.rfind("Conv", 0) == 0 || t.find("Linear") != std::string::npos) layers.insert(item.name);
  }
  std::set<std::string> out;
  for (size_t i = 0; i < exclude.size(); ++i) {
    const std::string& path = exclude[i];
    const std::string field = what + "[" + std::to_string(i) + "]";
    if (!modules.count(path)) {
      std::string some;
      int shown = 0;
      for (const auto& l : layers) {
        if (shown++ == 6) {
          some += ", ...";
          break;
        }
        some += (some.empty() ? "" : ", ") + l;
      }
      throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                        field + ": the model has no submodule '" + path + "'" +
                            (some.empty() ? "" : " (its conv and linear layers: " + some + ")"));
    }
    if (std::none_of(layers.begin(), layers.end(),
                     [&](const std::string& l) { return UnderAny(l, {path}); })) {
      throw EngineError(
          Code::kInvalidArgument, kReasonBadRecipe,
          field + ": '" + path + "' holds no conv or linear layer, so there is nothing to keep float");
    }
    out.insert(path);
  }
  return out;
}

torch::jit::Module QuantizeStatic(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                  const std::vector<at::Tensor>& inputs, std::vector<std::string>* notes,
                                  const std::vector<std::vector<at::Tensor>>& more) {
  Batches calibration;
  for (size_t i = 0; i < inputs.size(); ++i) {
    calibration.push_back(ForwardArgs(inputs[i], i < more.size() ? more[i] : std::vector<at::Tensor>{}));
  }
  std::vector<std::string> local;
  std::vector<std::string>& out = notes ? *notes : local;
  const std::set<std::string> padded = PaddedTransposedConvolutions(input);
  std::set<std::string> always_float = padded;  // and the layers the recipe excludes
  if (!padded.empty()) {
    out.push_back("kept float: " + std::to_string(padded.size()) +
                  " transposed convolution(s) with output_padding (" + *padded.begin() +
                  (padded.size() > 1 ? ", ..." : "") +
                  "): the onednn engine has no quantized kernel for them");
  }
  if (!spec.exclude.empty()) {
    const std::set<std::string> excluded = CheckExcluded(input, spec.exclude);
    std::string names;
    for (const auto& e : spec.exclude) names += (names.empty() ? "" : ", ") + e;
    out.push_back("kept float as asked (quantize.static.exclude): " + names);
    always_float.insert(excluded.begin(), excluded.end());
  }
  if (!spec.also_float.empty()) {  // accuracy control's choice, named in its own note
    const std::set<std::string> chosen =
        CheckExcluded(input, spec.also_float, "accuracy control's float layers");
    always_float.insert(chosen.begin(), chosen.end());
  }
  const size_t before = out.size();
  try {
    return QuantizeStaticOnce(input, spec, calibration, out, always_float);
  } catch (const EngineError& e) {
    if (e.reason() != kReasonQuantizeUnsupported || !CallsSubmodules(input)) throw;
    // LibTorch's passes follow the model's submodule calls, and some structures defeat them
    // (GoogLeNet's optional auxiliary heads: "isObject() INTERNAL ASSERT FAILED"). The same
    // model as one inlined graph, configuration folded (what channel pruning produces), often
    // quantizes: try that before refusing, and refuse with the first error if it fails too.
    out.resize(before);
    torch::jit::Module flat = input.clone();
    flat.eval();
    try {
      InlineForward(flat);
      return QuantizeStaticOnce(flat, spec, calibration, out, always_float);
    } catch (const std::exception&) {
      out.resize(before);
    }
    // Some parts defeat both (data-dependent branches: Swin's shifted windows): quantize the
    // rest and keep those float.
    try {
      return QuantizeAroundControlFlow(input, spec, calibration, out, e, always_float);
    } catch (const std::exception&) {
      out.resize(before);
    }
    // A layer whose quantized kernel fails: keep it float, quantize the rest.
    return QuantizeAroundBrokenLayers(input, spec, calibration, out, e, always_float);
  }
}

// A copy of `input` ready for InsertObservers: conv-bn folded, specialized for eval, ranks folded.
// A model whose forward is one inlined graph (channel-pruned ones) is folded by Pare's own pass
// on that graph. LibTorch's FoldConvBatchNorm must not see it: it folds the conv/bn submodule
// calls of the submodules' own (now unused) methods into the shared weights, leaving the inlined
// graph's batch norms in place, so their effect would be applied twice. Both return or work on a
// copy: the input stays unchanged, and the later passes work in place on that copy (Python's
// quantize_jit copies the model twice more).
static torch::jit::Module FoldedForObservers(const torch::jit::Module& input, const Batches& calibration) {
  torch::jit::Module module = CallsSubmodules(input) ? torch::jit::FoldConvBatchNorm(input) : input.clone();
  FoldInlinedConvBatchNorm(module);
  module.eval();
  SpecializeForEval(module);
  auto forward = module.get_method("forward").graph();
  FoldRanks(module, forward, FirstSamples(calibration.front(), 1));  // ranks do not depend on the batch
  HoistReluOverMaxPool(forward);
  return module;
}

// Checks the converted model as it will be served: loaded afresh from its saved form, called twice
// on one input of `batch` (batch 1, the commonest serving shape), the second call must run and give
// what the first gave; then called once on the batch's first two inputs, so that a batch runs too.
// LibTorch 1.13's oneDNN convolution prepares its kernel on the first call of a shape and takes a
// cached one from the second on; on some grouped convolutions (RegNet-X/Y-32GF's: 4 to 15 groups of
// 168 channels, at batch 1) the cached one fails ("negative dimension"), so a model that ran once
// fails when it is served. Throws, so that the fallbacks keep such layers float. One load and small
// batches: 55 ms of a ResNet-18 step on a 2-core AVX-512 EPYC, where a load per shape and the whole
// calibration batch took 120 ms.
static void ServesRepeatedCalls(const std::string& saved, const std::vector<c10::IValue>& batch) {
  std::istringstream in(saved);
  torch::jit::Module module = torch::jit::load(in);
  const std::vector<c10::IValue> one = FirstSamples(batch, 1);
  const auto first = OutputTensors(module.forward(one));
  const auto second = OutputTensors(module.forward(one));
  auto as_float = [](const at::Tensor& t) { return (t.is_quantized() ? t.dequantize() : t).to(at::kFloat); };
  for (size_t i = 0; i < first.size() && i < second.size(); ++i) {
    const at::Tensor a = as_float(first[i].second), b = as_float(second[i].second);
    if (a.sizes() != b.sizes() || !at::allclose(a, b, 1e-4, 1e-5, /*equal_nan=*/true)) {
      throw std::runtime_error("the quantized model gives different outputs (" + first[i].first +
                               ") when called twice on the same input: a cached quantized kernel differs");
    }
  }
  const bool batched = !batch.empty() && batch.front().isTensor() && batch.front().toTensor().dim() > 0 &&
                       batch.front().toTensor().size(0) > 1;
  if (batched) module.forward(FirstSamples(batch, 2));
}

// Thrown when calibrating in channels-last layout fails: the caller calibrates again in the
// model's own layout, from a fresh copy (the observers may have seen part of a batch).
struct ChannelsLastRefused {};

// The 4-d tensors `module` holds (conv weights, folded or not), by owning module and name.
struct HeldTensor {
  torch::jit::Module owner;
  std::string name;
  at::Tensor value;
};

static std::vector<HeldTensor> FourDimensionalTensors(const torch::jit::Module& module) {
  std::vector<HeldTensor> out;
  for (const auto& item : module.named_modules()) {
    for (const auto& attr : item.value.named_attributes(/*recurse=*/false)) {
      if (attr.value.isTensor() && attr.value.toTensor().dim() == 4) {
        out.push_back({item.value, attr.name, attr.value.toTensor()});
      }
    }
  }
  return out;
}

static c10::IValue ChannelsLast(const c10::IValue& v) {
  if (!v.isTensor() || v.toTensor().dim() != 4) return v;
  return v.toTensor().contiguous(at::MemoryFormat::ChannelsLast);
}

// Runs the calibration batches through `observed`. In channels-last layout (4-d inputs and
// weights; the weights are put back afterwards): oneDNN's float convolutions then skip the
// reorders of every activation in and out of each layer, which makes ResNet-18's calibration
// about 30% faster on a 2-core AVX-512 EPYC; the observers see the same values. A model whose forward cannot
// take that layout (a view of a convolution's output) throws ChannelsLastRefused.
static void Calibrate(torch::jit::Module& observed, const Batches& calibration, bool channels_last) {
  torch::NoGradGuard no_grad;
  // A few runs of a graph that is thrown away afterwards: the executor's profiling and optimizing
  // would cost more than they save.
  torch::jit::GraphOptimizerEnabledGuard no_optimizer(false);
  if (!channels_last) {
    for (const auto& batch : calibration) observed.forward(batch);
    return;
  }
  std::vector<HeldTensor> held = FourDimensionalTensors(observed);
  bool refused = false;
  try {
    for (auto& h : held) h.owner.setattr(h.name, h.value.contiguous(at::MemoryFormat::ChannelsLast));
    for (const auto& batch : calibration) {
      std::vector<c10::IValue> args;
      args.reserve(batch.size());
      for (const auto& v : batch) args.push_back(ChannelsLast(v));
      observed.forward(args);
    }
  } catch (const std::exception&) {
    refused = true;
  }
  // Put back last-first: a module reached twice (shared) was held twice, the second time with the
  // channels-last copy as its value.
  for (auto h = held.rbegin(); h != held.rend(); ++h) h->owner.setattr(h->name, h->value);
  if (refused) throw ChannelsLastRefused{};
}

struct Converted {
  torch::jit::Module module;
  int transposed = 0;  // transposed convolution weights observed per tensor
  int recentred = 0;   // linear outputs given the middle zero point
};

// Observes `module` (in place) on the calibration batches, converts it to quantized ops and runs
// the result on a calibration batch and on one input of it: some refusals only show when the
// quantized ops run (a kernel the engine lacks, or one that fails at batch 1 only: oneDNN's
// conv2d_relu on RegNet-Y-16GF's grouped convs). Throws what LibTorch throws.
static Converted ObserveAndConvert(torch::jit::Module& module, const StaticQuantSpec& spec,
                                   const torch::jit::QConfigDict& qconfig,
                                   const std::set<std::string>& keep_float, bool reduce_range,
                                   const Batches& calibration, bool channels_last) {
  Converted out;
  torch::jit::Module observed = torch::jit::InsertObservers(module, "forward", qconfig, /*inplace=*/true,
                                                            torch::jit::QuantType::STATIC);
  ObserveAfterConvRelu(observed.get_method("forward").graph());
  UnobserveWeights(observed, keep_float);
  if (spec.per_channel) out.transposed = PerTensorTransposedWeights(observed);
  Calibrate(observed, calibration, channels_last);
  out.module = torch::jit::InsertQuantDeQuant(observed, "forward", /*inplace=*/true,
                                              /*debug=*/false, torch::jit::QuantType::STATIC);
  out.module = torch::jit::Finalize(out.module, torch::jit::QuantType::STATIC, {});
  auto final_graph = out.module.get_method("forward").graph();
  DequantizeTupleElements(final_graph);
  ContiguousBeforeView(final_graph);
  out.recentred = MiddleOutputZeroPoints(final_graph, reduce_range ? 127 : 255);
  // The final graph is folded before the checks below, so that they run what is returned.
  torch::jit::ConstantPropagation(final_graph);
  torch::jit::EliminateDeadCode(final_graph);
  c10::InferenceMode inference;  // as the model is measured and served
  std::ostringstream saved;
  out.module.save(saved);
  ServesRepeatedCalls(saved.str(), calibration.front());
  return out;
}

static torch::jit::Module QuantizeStaticOnce(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                             const Batches& calibration, std::vector<std::string>& notes,
                                             const std::set<std::string>& keep_float) {
  if (!input.find_method("forward")) {
    throw EngineError(Code::kInvalidArgument, "MODEL_FORMAT", "the model has no forward method");
  }
  const std::string& k = spec.observer;
  if (!(k == "MINMAX" || k == "MOVING_AVERAGE" || k == "HISTOGRAM" || k == "PERCENTILE")) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                      "quantize.static.observer must be MINMAX, MOVING_AVERAGE, HISTOGRAM or PERCENTILE");
  }
  if (calibration.empty()) {
    throw EngineError(Code::kInvalidArgument, "NO_CALIBRATION", "quantize.static needs calibration inputs");
  }
  std::string range_why;
  const bool reduce_range = ReduceRange(spec.target, range_why);
  torch::jit::QConfigDict qconfig;
  qconfig[""] =
      std::make_tuple(MakeActivationObserver(k, reduce_range), MakeWeightObserver(spec.per_channel));
  torch::jit::QConfigDict by_path = qconfig;  // layers kept float through the dict too
  for (const auto& path : keep_float) by_path[path] = c10::nullopt;
  auto unsupported = [](const std::exception& e) {
    // Graph-mode quantization refuses some models: control flow whose branches it cannot observe
    // alike (Swin's shifted-window masks), observers on values that turn out to be lists
    // (torchvision's ViT attention). A limit of the technique for that model, not a fault of the
    // job: say so, and what works instead.
    return EngineError(Code::kFailedPrecondition, kReasonQuantizeUnsupported,
                       "quantize.static: LibTorch's graph-mode quantization cannot handle this model (" +
                           ErrorText(e) + "); quantize.dynamic converts its linear layers instead");
  };
  Converted converted;
  torch::jit::Module module = FoldedForObservers(input, calibration);
  const bool inlined = !CallsSubmodules(module);
  // Calibrates in channels-last layout first, in the model's own where that fails.
  auto observe = [&](const torch::jit::QConfigDict& dict) {
    try {
      return ObserveAndConvert(module, spec, dict, keep_float, reduce_range, calibration,
                               /*channels_last=*/true);
    } catch (const ChannelsLastRefused&) {
      module = FoldedForObservers(input, calibration);
      return ObserveAndConvert(module, spec, dict, keep_float, reduce_range, calibration,
                               /*channels_last=*/false);
    }
  };
  try {
    converted = observe(by_path);
  } catch (const std::exception& e) {
    // In an inlined forward, layers kept float by path (their observers and their outputs') may
    // share a class type with quantized ones, which InsertObservers refuses ("... is not
    // compatible with the type ..."): then per node only, their outputs quantized after them.
    if (!inlined || keep_float.empty()) throw unsupported(e);
    try {
      module = FoldedForObservers(input, calibration);
      converted = observe(qconfig);
    } catch (const std::exception&) {
      throw unsupported(e);
    }
  }
  notes.push_back(std::string("activations: ") + (reduce_range ? "7-bit (0..127), since " : "8-bit, since ") +
                  range_why);
  if (converted.recentred) {
    notes.push_back(
        std::to_string(converted.recentred) + " linear output(s) given the middle zero point (" +
        std::to_string(reduce_range ? 64 : 128) +
        "): LibTorch 1.13's oneDNN linear kernels otherwise mix up layers of one shape whose zero "
        "points differ, in one model or across models in one process");
  }
  if (converted.transposed) {
    notes.push_back(std::to_string(converted.transposed) +
                    " transposed convolution weight(s) quantized per tensor (LibTorch has no per-channel "
                    "quantized transposed convolution)");
  }
  auto left = FloatLayers(converted.module.get_method("forward").graph());
  if (!left.empty()) {
    std::string s = "stayed float: ";
    for (size_t i = 0; i < left.size(); ++i) s += (i ? ", " : "") + left[i];
    notes.push_back(s);
  }
  auto between = FloatBetweenQuantized(converted.module.get_method("forward").graph());
  if (!between.empty()) {
    std::string s = "ran in float between quantized ops (LibTorch has no quantized kernel for them): ";
    for (size_t i = 0; i < between.size(); ++i) s += (i ? ", " : "") + between[i];
    notes.push_back(s);
  }
  return converted.module;
}

}  // namespace pare::engine
