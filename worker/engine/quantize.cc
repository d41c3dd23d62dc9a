#include "worker/engine/quantize.h"

#include <algorithm>
#include <functional>
#include <map>
#include <set>

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
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

// Calibration batches: the arguments of one forward call each.
using Batches = std::vector<std::vector<c10::IValue>>;

// Activation observer for static quantization (affine uint8). All four kinds track the
// running range; HISTOGRAM and PERCENTILE also keep a bounded, evenly thinned sample of
// the values, from which calculate_qparams picks the range.
torch::jit::Module MakeActivationObserver(const std::string& kind, bool reduce_range) {
  int64_t k = kind == "MINMAX" ? 0 : kind == "MOVING_AVERAGE" ? 1 : kind == "HISTOGRAM" ? 2 : 3;
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.ActivationObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("min_val", c10::TensorType::get(), at::full({}, INFINITY), false, true);
  obs.register_attribute("max_val", c10::TensorType::get(), at::full({}, -INFINITY), false, true);
  obs.register_attribute("samples", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQUInt8));
  obs.register_attribute("qscheme", c10::IntType::get(), static_cast<int64_t>(at::kPerTensorAffine));
  obs.register_attribute("quant_min", c10::IntType::get(), int64_t{0});
  obs.register_attribute("quant_max", c10::IntType::get(), int64_t{reduce_range ? 127 : 255});
  obs.register_attribute("eps", c10::FloatType::get(), 1.1920928955078125e-07);
  obs.register_attribute("is_dynamic", c10::BoolType::get(), false);
  obs.register_attribute("kind", c10::IntType::get(), k);
  obs.register_attribute("seen", c10::BoolType::get(), false);
  obs.register_attribute("averaging_constant", c10::FloatType::get(), 0.01);
  obs.register_attribute("per_batch_samples", c10::IntType::get(), int64_t{16384});
  obs.register_attribute("max_samples", c10::IntType::get(), int64_t{131072});
  obs.register_attribute("percentile", c10::FloatType::get(), 0.9999);
  obs.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    if x.numel() == 0:
        return x
    v = x.detach().float()
    lo, hi = torch.aminmax(v)
    if self.kind == 1 and self.seen:
        self.min_val = self.min_val + self.averaging_constant * (lo - self.min_val)
        self.max_val = self.max_val + self.averaging_constant * (hi - self.max_val)
    else:
        self.min_val = torch.minimum(lo, self.min_val.to(lo.device))
        self.max_val = torch.maximum(hi, self.max_val.to(hi.device))
    self.seen = True
    if self.kind >= 2:
        flat = v.flatten()
        step = max(1, flat.numel() // self.per_batch_samples)
        kept = torch.cat([self.samples.to(flat.device), flat[::step]])
        while kept.numel() > self.max_samples:
            kept = kept[::2]
        self.samples = kept
    return x

def _affine(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / float(self.quant_max - self.quant_min), min=self.eps)
    zero_point = torch.clamp(self.quant_min - torch.round(lo / scale), self.quant_min, self.quant_max)
    return scale.reshape([1]), zero_point.long().reshape([1])

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    lo = self.min_val
    hi = self.max_val
    s = self.samples
    if self.kind == 3 and s.numel() > 0:
        n = s.numel()
        k_hi = max(1, min(n, int(self.percentile * n + 0.5)))
        k_lo = max(1, min(n, n + 1 - k_hi))
        lo = torch.kthvalue(s, k_lo)[0]
        hi = torch.kthvalue(s, k_hi)[0]
    elif self.kind == 2 and s.numel() > 0:
        # The range whose quantization error over the values is least, among 20 x 20 candidates
        # that clip the low and the high end by 0% to 95% of the observed range. The values are
        # binned (2048 bins over the observed range) and every candidate is scored at once on
        # the bin centres, weighted by their counts: one [400 x 2048] pass.
        bins = 2048
        width = torch.clamp((hi - lo) / float(bins), min=self.eps)
        counts = torch.histc(s, bins, float(lo.item()), float(lo.item()) + float(width.item()) * float(bins))
        centres = lo + width * (torch.arange(bins, device=s.device).float() + 0.5)
        shrink = 1.0 - 0.05 * torch.arange(20, device=s.device).float()
        clo = torch.clamp((lo * shrink).reshape([20, 1]).expand([20, 20]).reshape([400, 1]), max=0.0)
        chi = torch.clamp((hi * shrink).reshape([1, 20]).expand([20, 20]).reshape([400, 1]), min=0.0)
        scale = torch.clamp((chi - clo) / float(self.quant_max - self.quant_min), min=self.eps)
        zp = torch.clamp(self.quant_min - torch.round(clo / scale), self.quant_min, self.quant_max)
        q = (torch.clamp(torch.round(centres.reshape([1, bins]) / scale) + zp, self.quant_min, self.quant_max) - zp) * scale
        err = ((q - centres.reshape([1, bins])) ** 2 * counts.reshape([1, bins])).sum(1)
        best = int(torch.argmin(err).item())
        lo = (lo * shrink[best // 20]).reshape(lo.shape)
        hi = (hi * shrink[best % 20]).reshape(hi.shape)
    return self._affine(lo, hi)
)JIT");
  return obs;
}

// The graph-mode passes read an observer's `dtype` and `qscheme` attributes and call its
// `calculate_qparams()`; the observers are TorchScript classes defined here.
// Weight observer: per-channel (output channel) or per-tensor symmetric int8.
torch::jit::Module MakeWeightObserver(bool per_channel) {
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.StaticWeightObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("min_val", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("max_val", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQInt8));
  obs.register_attribute(
      "qscheme", c10::IntType::get(),
      static_cast<int64_t>(per_channel ? at::kPerChannelSymmetric : at::kPerTensorSymmetric));
  obs.register_attribute("ch_axis", c10::IntType::get(), int64_t{0});
  obs.register_attribute("quant_min", c10::IntType::get(), int64_t{-128});
  obs.register_attribute("quant_max", c10::IntType::get(), int64_t{127});
  obs.register_attribute("eps", c10::FloatType::get(), 1.1920928955078125e-07);
  obs.register_attribute("is_dynamic", c10::BoolType::get(), false);
  obs.register_attribute("per_channel", c10::BoolType::get(), per_channel);
  obs.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    if x.numel() == 0:
        return x
    v = x.detach().float()
    if self.per_channel:
        flat = v.reshape([v.size(0), -1])
        lo = torch.amin(flat, 1)
        hi = torch.amax(flat, 1)
    else:
        lo = torch.min(v).reshape([1])
        hi = torch.max(v).reshape([1])
    if self.min_val.numel() == 0:
        self.min_val = lo
        self.max_val = hi
    else:
        self.min_val = torch.minimum(lo, self.min_val)
        self.max_val = torch.maximum(hi, self.max_val)
    return x

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    amax = torch.maximum(-torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0))
    scale = torch.clamp(amax / (float(self.quant_max - self.quant_min) / 2.0), min=self.eps)
    return scale, torch.zeros_like(scale).long()
)JIT");
  return obs;
}

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

// A quantized model only runs in eval mode: `self.training` branches in the forward graph
// (GoogLeNet's auxiliary heads) are folded away, since observers cannot follow values that
// only one branch produces.
// InsertQuantDeQuant can put one `dequantize` on a returned (named) tuple, which does not
// type-check when the model is loaded again: dequantize each tensor of the tuple instead.
static void DequantizeTupleElements(const std::shared_ptr<torch::jit::Graph>& graph) {
  std::vector<torch::jit::Node*> bad;
  for (torch::jit::Node* n : graph->nodes()) {
    if (n->kind() == c10::aten::dequantize && n->input(0)->type()->kind() == c10::TypeKind::TupleType &&
        n->input(0)->node()->kind() == c10::prim::TupleConstruct) {
      bad.push_back(n);
    }
  }
  for (torch::jit::Node* n : bad) {
    torch::jit::Node* tuple = n->input(0)->node();
    torch::jit::WithInsertPoint guard(n);
    std::vector<torch::jit::Value*> elements;
    for (torch::jit::Value* e : tuple->inputs()) {
      if (e->type()->kind() == c10::TypeKind::TensorType) {
        elements.push_back(graph->insert(c10::aten::dequantize, {e}));
      } else {
        elements.push_back(e);
      }
    }
    auto type = tuple->output()->type()->expect<c10::TupleType>();
    // createTuple takes a type only for named tuples.
    torch::jit::Node* fresh =
        graph->insertNode(graph->createTuple(elements, type->schema() ? type : nullptr));
    n->output()->replaceAllUsesWith(fresh->output());
    n->destroy();
  }
}

// Whether the forward graph still calls submodule methods (else it is one inlined graph).
static bool CallsSubmodules(const torch::jit::Module& module) {
  bool calls = false;
  ForEachNode(module.get_method("forward").graph()->block(),
              [&](torch::jit::Node* n) { calls |= n->kind() == c10::prim::CallMethod; });
  return calls;
}

// Folds reads of `training` (false: the model is quantized for inference) in every module's
// methods, and, in the top module's own, of bool attributes no method assigns (Inception's
// `transform_input`), so that branches on them disappear before observers are inserted:
// graph-mode quantization refuses an `if` whose branches it would observe differently. The top
// module's class type is its own, so its methods may be specialized to its values.
static void SpecializeForEval(torch::jit::Module& module) {
  // In every module's methods: free functions (other than torch.nn.functional's) inlined and
  // `training` folded to false (all the modules are in eval mode; shared class types get the
  // same value), so that a function taking `training` as an argument (torchvision's
  // stochastic_depth in EfficientNet and ConvNeXt blocks) loses its training branch. Other
  // attributes may differ between the instances of a shared type and are left alone.
  std::set<const c10::ClassType*> seen;
  for (const auto& m : module.modules()) {
    if (!seen.insert(m.type().get()).second) continue;
    for (const auto& method : m.get_methods()) {
      auto graph = method.graph();
      bool changed = false;
      for (bool again = true; again;) {  // a function's body may call functions
        std::vector<torch::jit::Node*> calls;
        ForEachNode(graph->block(), [&](torch::jit::Node* n) {
          if (n->kind() == c10::prim::CallFunction) calls.push_back(n);
        });
        again = false;
        for (torch::jit::Node* call : calls) {
          auto fn_type = call->input(0)->type()->cast<c10::FunctionType>();
          torch::jit::GraphFunction* fn =
              fn_type ? torch::jit::tryToGraphFunction(*fn_type->function()) : nullptr;
          // torch.nn.functional's calls stay: LibTorch's passes match them as they are (F.relu
          // after a conv, F.dropout). F.interpolate is inlined: its list of scale factors is
          // built by a loop those passes drop (RepeatListLoops, below, removes the loop).
          if (!fn || (fn->qualname().qualifiedName().rfind("__torch__.torch.nn.functional.", 0) == 0 &&
                      RepeatListLoops(fn->graph(), /*dry_run=*/true) == 0)) {
            continue;
          }
          call->removeInput(0);  // the function itself; the rest are its arguments
          torch::jit::inlineCallTo(call, fn);
          again = changed = true;
        }
      }
      changed |= RepeatListLoops(graph) > 0;
      std::vector<torch::jit::Node*> training;
      ForEachNode(graph->block(), [&](torch::jit::Node* n) {
        if (n->kind() == c10::prim::GetAttr && n->s(c10::attr::name) == "training") training.push_back(n);
      });
      for (torch::jit::Node* n : training) {
        torch::jit::WithInsertPoint guard(n);
        n->output()->replaceAllUsesWith(graph->insertConstant(false));
        changed = true;
      }
      if (!changed) continue;
      torch::jit::ConstantPropagation(graph);
      torch::jit::EliminateDeadCode(graph);
    }
  }

  // The top module's own bool attributes (`training` is folded above, in every module).
  std::set<std::string> assigned;
  for (const auto& method : module.get_methods()) {
    ForEachNode(method.graph()->block(), [&](torch::jit::Node* n) {
      if (n->kind() == c10::prim::SetAttr) assigned.insert(n->s(c10::attr::name));
    });
  }
  for (const auto& method : module.get_methods()) {
    auto graph = method.graph();
    torch::jit::Value* self = graph->inputs()[0];
    std::vector<torch::jit::Node*> reads;
    ForEachNode(graph->block(), [&](torch::jit::Node* n) {
      if (n->kind() == c10::prim::GetAttr && n->input(0) == self &&
          n->output()->type()->kind() == c10::TypeKind::BoolType && !assigned.count(n->s(c10::attr::name))) {
        reads.push_back(n);
      }
    });
    for (torch::jit::Node* n : reads) {
      torch::jit::WithInsertPoint guard(n);
      n->output()->replaceAllUsesWith(graph->insertConstant(module.attr(n->s(c10::attr::name)).toBool()));
    }
    if (reads.empty()) continue;
    torch::jit::ConstantPropagation(graph);
    torch::jit::EliminateDeadCode(graph);
  }
}

// Whether `v` is a convolution's output: an aten conv op, or the forward of a Conv submodule.
static bool FromConvolution(torch::jit::Value* v) {
  torch::jit::Node* n = v->node();
  if (n->kind() == c10::aten::conv1d || n->kind() == c10::aten::conv2d || n->kind() == c10::aten::conv3d ||
      n->kind() == c10::aten::_convolution) {
    return true;
  }
  if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward") return false;
  auto cls = n->input(0)->type()->cast<c10::ClassType>();
  if (!cls || !cls->name()) return false;
  const std::string t = cls->name()->name();
  return t == "Conv1d" || t == "Conv2d" || t == "Conv3d";
}

// relu(max_pool(conv(x))) -> max_pool(relu(conv(x))), the same values (relu and max commute),
// so that the relu follows its convolution and quantization fuses the two into one
// quantized::conv2d_relu (LeNet-style models pool before the activation). Returns how many.
int HoistReluOverMaxPool(const std::shared_ptr<torch::jit::Graph>& graph) {
  std::vector<torch::jit::Node*> relus;
  for (torch::jit::Node* n : graph->nodes()) {
    if (n->kind() != c10::aten::relu) continue;
    torch::jit::Node* pool = n->input(0)->node();
    if (pool->kind() != c10::aten::max_pool1d && pool->kind() != c10::aten::max_pool2d &&
        pool->kind() != c10::aten::max_pool3d) {
      continue;
    }
    torch::jit::Value* x = pool->input(0);
    if (pool->output()->uses().size() != 1 || x->uses().size() != 1 || !FromConvolution(x)) continue;
    relus.push_back(n);
  }
  for (torch::jit::Node* relu : relus) {
    torch::jit::Node* pool = relu->input(0)->node();
    torch::jit::Value* activated = relu->output();
    activated->replaceAllUsesWith(pool->output());  // users of relu(pool(x)) read pool(relu(x))
    relu->replaceInput(0, pool->input(0));
    relu->moveBefore(pool);
    pool->replaceInput(0, activated);
  }
  return static_cast<int>(relus.size());
}

// LibTorch's InsertObservers leaves the output of a conv that a relu follows unobserved, and
// observes the relu's instead, so that Finalize fuses the two into quantized::conv*d_relu; but
// it recognises only a Conv submodule's call. In an inlined forward (every channel-pruned
// model) the conv is an aten op, so the conv's output got its own observer and quantize/
// dequantize pair: an extra op per conv and its output quantized over the pre-relu range.
// Moves each such observer from the conv's output to the relu's. Returns how many.
int ObserveAfterConvRelu(const std::shared_ptr<torch::jit::Graph>& graph) {
  auto is_observer_call = [](torch::jit::Node* n) {
    if (n->kind() != c10::prim::CallMethod || n->s(c10::attr::name) != "forward" || n->inputs().size() != 2) {
      return false;
    }
    auto cls = n->input(0)->type()->cast<c10::ClassType>();
    return cls && cls->name() && cls->name()->name() == "ActivationObserver" &&
           n->input(0)->node()->kind() == c10::prim::GetAttr;
  };
  std::vector<torch::jit::Node*> calls;
  for (torch::jit::Node* n : graph->nodes()) {
    if (!is_observer_call(n)) continue;
    torch::jit::Value* conv = n->input(1);
    torch::jit::NodeKind k = conv->node()->kind();
    if (k != c10::aten::conv1d && k != c10::aten::conv2d && k != c10::aten::conv3d) continue;
    if (conv->uses().size() != 1 || n->output()->uses().size() != 1) continue;
    torch::jit::Node* relu = n->output()->uses()[0].user;
    const bool is_relu = relu->kind() == c10::aten::relu || relu->kind() == c10::aten::relu_;
    if (!is_relu || relu->owningBlock() != n->owningBlock()) continue;
    calls.push_back(n);
  }
  for (torch::jit::Node* call : calls) {
    torch::jit::Node* relu = call->output()->uses()[0].user;
    torch::jit::Node* get = call->input(0)->node();
    relu->replaceInput(0, call->input(1));  // the relu reads the conv
    torch::jit::Value* activated = relu->output();
    activated->replaceAllUsesWith(call->output());  // its users read the observed value
    call->replaceInput(1, activated);               // which is now the relu's
    get->moveAfter(relu);
    call->moveAfter(get);
  }
  return static_cast<int>(calls.size());
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
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE",
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

// LibTorch has no per-channel transposed convolutions ("Per Channel Quantization is currently
// disabled for transposed conv"): after InsertObservers, the weight observers of transposed
// convolutions (in every module's methods) observe per tensor. Returns how many.
static int PerTensorTransposedWeights(torch::jit::Module& observed) {
  int changed = 0;
  for (const auto& m : observed.modules()) {
    for (const auto& method : m.get_methods()) {
      auto graph = method.graph();
      torch::jit::Value* self = graph->inputs()[0];
      ForEachNode(graph->block(), [&](torch::jit::Node* n) {
        if (LayerOpOf(n) != LayerOp::kTransposedConv) return;
        torch::jit::Node* call = n->input(1)->node();
        if (call->kind() != c10::prim::CallMethod || call->input(0)->node()->kind() != c10::prim::GetAttr ||
            call->input(0)->node()->input(0) != self) {
          return;
        }
        auto obs = m.attr(call->input(0)->node()->s(c10::attr::name));
        if (!obs.isObject()) return;
        torch::jit::Module observer(obs.toObject());
        if (!observer.hasattr("per_channel") || !observer.attr("per_channel").toBool()) return;
        observer.setattr("per_channel", false);
        observer.setattr("qscheme", static_cast<int64_t>(at::kPerTensorSymmetric));
        ++changed;
      });
    }
  }
  return changed;
}

// LibTorch 1.13's oneDNN (ideep) caches its inner-product kernels by shapes and attributes but
// not by the output zero point (intel/ideep#152, fixed after 1.13): a quantized linear of the
// same configuration as one run before, with another output zero point, runs with the first
// one's, in the same model or in another model loaded in the same process. Measured: two INT8
// variants of one VGG-style net (8- and 7-bit activations) run one after the other in one
// Python process: the second drops from 0.995 to 0.17 centred cosine. Convolutions are not
// affected (their kernels are cached per packed weight, with the zero points: giving them the
// middle zero point too cost MobileNetV1 0.02 cosine for nothing). Every quantized::linear whose
// output is not fused with a relu (those always have zero point 0) gets the middle zero point
// (128; 64 for 7-bit activations) and the scale that keeps its whole range, so no two differ.
// Costs up to one bit on a layer whose range is one-sided. Returns how many changed.
static int MiddleOutputZeroPoints(const std::shared_ptr<torch::jit::Graph>& graph, int64_t quant_max) {
  const int64_t mid = (quant_max + 1) / 2;
  int changed = 0;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    if (n->kind() != c10::Symbol::fromQualString("quantized::linear") || n->inputs().size() != 4) return;
    auto scale = torch::jit::toIValue(n->input(2));
    auto zero_point = torch::jit::toIValue(n->input(3));
    if (!scale || !zero_point || !scale->isDouble() || !zero_point->isInt()) return;
    const double s = scale->toDouble();
    const int64_t z = zero_point->toInt();
    if (z == mid) return;
    const double lo = double(0 - z) * s, hi = double(quant_max - z) * s;
    const double s_mid = std::max(-lo / double(mid), hi / double(quant_max - mid));
    torch::jit::WithInsertPoint guard(n);
    n->replaceInput(2, graph->insertConstant(s_mid));
    n->replaceInput(3, graph->insertConstant(mid));
    ++changed;
  });
  return changed;
}

// Quantized convolutions hand back channels-last tensors, on which a `view` (`x.view(-1, 320)`
// after the last pool) fails: "view size is not compatible with input tensor's size and
// stride". PyTorch's quantize_jit leaves such models broken. Every view reads a contiguous
// copy instead (`contiguous()` returns the tensor itself when it already is). Returns how many.
static int ContiguousBeforeView(const std::shared_ptr<torch::jit::Graph>& graph) {
  std::vector<torch::jit::Node*> views;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    if (n->kind() == c10::aten::view && n->input(0)->type()->kind() == c10::TypeKind::TensorType)
      views.push_back(n);
  });
  for (torch::jit::Node* view : views) {
    torch::jit::WithInsertPoint guard(view);
    torch::jit::Value* dense = graph->insert(c10::aten::contiguous, {view->input(0)});
    view->replaceInput(0, dense);
  }
  return static_cast<int>(views.size());
}

// The convolutions and linear layers a quantized graph still runs in float.
static std::vector<std::string> FloatLayers(const std::shared_ptr<torch::jit::Graph>& graph) {
  std::map<std::string, int> count;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    const auto k = n->kind();
    if (LayerOpOf(n) != LayerOp::kNone || k == c10::aten::matmul || k == c10::aten::addmm)
      ++count[k.toQualString()];
  });
  std::vector<std::string> out;
  for (const auto& [op, n] : count) out.push_back(std::to_string(n) + " " + op);
  return out;
}

static torch::jit::Module QuantizeStaticOnce(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                             const Batches& calibration, std::vector<std::string>& notes,
                                             const std::set<std::string>& keep_float = {});

// The first sample of a batch of forward arguments (each tensor sliced to batch 1).
static std::vector<c10::IValue> FirstSample(const std::vector<c10::IValue>& batch) {
  std::vector<c10::IValue> one;
  for (const auto& v : batch) one.push_back(v.isTensor() ? v.toTensor().slice(0, 0, 1) : v);
  return one;
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
  int trials = 0;
  std::vector<std::string> trial_notes;
  // Quantizes the layers of the kinds in `with` (and what is not a layer), the others float.
  auto attempt = [&](const std::vector<std::string>& with, torch::jit::Module* out) {
    std::set<std::string> keep = always_float;
    for (const auto& [k, paths] : layers) keep.insert(paths.begin(), paths.end());
    for (const auto& k : with) {
      for (const auto& p : layers[k]) keep.erase(p);
    }
    ++trials;
    trial_notes.clear();
    try {
      torch::jit::Module q = QuantizeStaticOnce(input, spec, calibration, trial_notes, keep);
      if (out) *out = q;
      return std::string();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
  };
  std::vector<std::string> allowed;
  std::vector<std::string> culprits;
  std::string last = first.what();
  size_t start = 0;
  while (start < kinds.size() && trials < kMaxTrials) {
    size_t lo = start, hi = kinds.size();  // allowed + [start, hi) fails; allowed + [start, lo) converts
    while (hi - lo > 1 && trials < kMaxTrials) {
      const size_t mid = (lo + hi) / 2;
      std::vector<std::string> with = allowed;
      with.insert(with.end(), kinds.begin() + static_cast<long>(start),
                  kinds.begin() + static_cast<long>(mid));
      std::string e = attempt(with, nullptr);
      if (e.empty())
        lo = mid;
      else {
        hi = mid;
        last = e;
      }
    }
    if (hi - lo > 1) break;  // out of trials: the rest stays float
    culprits.push_back(kinds[hi - 1]);
    allowed.insert(allowed.end(), kinds.begin() + static_cast<long>(start),
                   kinds.begin() + static_cast<long>(hi - 1));
    start = hi;
    std::vector<std::string> with = allowed;
    with.insert(with.end(), kinds.begin() + static_cast<long>(start), kinds.end());
    if (start < kinds.size() && attempt(with, nullptr).empty()) {
      allowed = with;
      start = kinds.size();
    }
  }
  torch::jit::Module best;
  if (allowed.empty() || !attempt(allowed, &best).empty()) throw first;
  notes.insert(notes.end(), trial_notes.begin(), trial_notes.end());
  size_t quantized = 0, total = 0;
  for (const auto& [k, paths] : layers) total += paths.size();
  for (const auto& k : allowed) quantized += layers[k].size();
  const std::string why = LibTorchReason(last);
  std::string first_layer = culprits.empty() ? "" : layers[culprits.front()].front();
  notes.push_back(
      "kept float: " + std::to_string(total - quantized) + " of " + std::to_string(total) +
      " conv/linear layers, " + std::to_string(culprits.size()) + " kind(s) whose quantization broke " +
      "the model (" + first_layer + (total - quantized > 1 ? ", ..." : "") + ": " + why + ")" +
      (start < kinds.size() ? " and the kinds not tried in " + std::to_string(kMaxTrials) + " conversions"
                            : ""));
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
  if (!padded.empty()) {
    out.push_back("kept float: " + std::to_string(padded.size()) +
                  " transposed convolution(s) with output_padding (" + *padded.begin() +
                  (padded.size() > 1 ? ", ..." : "") +
                  "): the onednn engine has no quantized kernel for them");
  }
  const size_t before = out.size();
  try {
    return QuantizeStaticOnce(input, spec, calibration, out, padded);
  } catch (const EngineError& e) {
    if (e.reason() != "QUANTIZE_UNSUPPORTED" || !CallsSubmodules(input)) throw;
    // LibTorch's passes follow the model's submodule calls, and some structures defeat them
    // (GoogLeNet's optional auxiliary heads: "isObject() INTERNAL ASSERT FAILED"). The same
    // model as one inlined graph, configuration folded (what channel pruning produces), often
    // quantizes: try that before refusing, and refuse with the first error if it fails too.
    out.resize(before);
    torch::jit::Module flat = input.clone();
    flat.eval();
    try {
      InlineForward(flat);
      return QuantizeStaticOnce(flat, spec, calibration, out);
    } catch (const std::exception&) {
      out.resize(before);
    }
    // Some parts defeat both (data-dependent branches: Swin's shifted windows): quantize the
    // rest and keep those float.
    try {
      return QuantizeAroundControlFlow(input, spec, calibration, out, e, padded);
    } catch (const std::exception&) {
      out.resize(before);
    }
    // A layer whose quantized kernel fails: keep it float, quantize the rest.
    return QuantizeAroundBrokenLayers(input, spec, calibration, out, e, padded);
  }
}

static torch::jit::Module QuantizeStaticOnce(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                             const Batches& calibration, std::vector<std::string>& notes,
                                             const std::set<std::string>& keep_float) {
  if (!input.find_method("forward")) {
    throw EngineError(Code::kInvalidArgument, "MODEL_FORMAT", "the model has no forward method");
  }
  const std::string& k = spec.observer;
  if (!(k == "MINMAX" || k == "MOVING_AVERAGE" || k == "HISTOGRAM" || k == "PERCENTILE")) {
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE",
                      "quantize.static.observer must be MINMAX, MOVING_AVERAGE, HISTOGRAM or PERCENTILE");
  }
  if (calibration.empty()) {
    throw EngineError(Code::kInvalidArgument, "NO_CALIBRATION", "quantize.static needs calibration inputs");
  }
  std::string range_why;
  const bool reduce_range = ReduceRange(spec.target, range_why);
  // Conv-bn folding. A model whose forward is one inlined graph (channel-pruned ones) is
  // folded by Pare's own pass on that graph. LibTorch's FoldConvBatchNorm must not see it: it
  // folds the conv/bn submodule calls of the submodules' own (now unused) methods into the
  // shared weights, leaving the inlined graph's batch norms in place, so their effect would be
  // applied twice. Both return or work on a copy: the input stays unchanged, and the later
  // passes work in place on that copy (Python's quantize_jit copies the model twice more).
  torch::jit::Module module;
  if (CallsSubmodules(input)) {
    module = torch::jit::FoldConvBatchNorm(input);
  } else {
    module = input.clone();
  }
  FoldInlinedConvBatchNorm(module);
  module.eval();
  SpecializeForEval(module);
  {
    auto forward = module.get_method("forward").graph();
    FoldRanks(module, forward, FirstSample(calibration.front()));  // ranks do not depend on the batch
    HoistReluOverMaxPool(forward);
  }
  torch::jit::QConfigDict qconfig;
  qconfig[""] =
      std::make_tuple(MakeActivationObserver(k, reduce_range), MakeWeightObserver(spec.per_channel));
  for (const auto& path : keep_float) qconfig[path] = c10::nullopt;
  // Graph-mode quantization refuses some models: control flow whose branches it cannot observe
  // alike (Swin's shifted-window masks), observers on values that turn out to be lists
  // (torchvision's ViT attention). A limit of the technique for that model, not a fault of the
  // job: say so, and what works instead.
  auto unsupported = [](const std::exception& e) {
    return EngineError(Code::kFailedPrecondition, "QUANTIZE_UNSUPPORTED",
                       "quantize.static: LibTorch's graph-mode quantization cannot handle this model (" +
                           ErrorText(e) + "); quantize.dynamic converts its linear layers instead");
  };
  torch::jit::Module quantized;
  int transposed = 0, recentred = 0;
  try {
    torch::jit::Module observed = torch::jit::InsertObservers(module, "forward", qconfig, /*inplace=*/true,
                                                              torch::jit::QuantType::STATIC);
    ObserveAfterConvRelu(observed.get_method("forward").graph());
    if (spec.per_channel) transposed = PerTensorTransposedWeights(observed);
    {
      torch::NoGradGuard no_grad;
      // A few runs of a graph that is thrown away afterwards: the executor's profiling and
      // optimizing would cost more than they save.
      torch::jit::GraphOptimizerEnabledGuard no_optimizer(false);
      for (const auto& batch : calibration) observed.forward(batch);
    }
    quantized = torch::jit::InsertQuantDeQuant(observed, "forward", /*inplace=*/true,
                                               /*debug=*/false, torch::jit::QuantType::STATIC);
    quantized = torch::jit::Finalize(quantized, torch::jit::QuantType::STATIC, {});
    auto final_graph = quantized.get_method("forward").graph();
    DequantizeTupleElements(final_graph);
    ContiguousBeforeView(final_graph);
    recentred = MiddleOutputZeroPoints(final_graph, reduce_range ? 127 : 255);
    // The final graph is folded before the checks below, so that they run what is returned.
    torch::jit::ConstantPropagation(final_graph);
    torch::jit::EliminateDeadCode(final_graph);
    // Some refusals only show when the quantized ops run (a kernel the engine lacks, or one
    // that fails at batch 1 only: oneDNN's conv2d_relu on RegNet-Y-16GF's grouped convs): run
    // a calibration batch and one input of it.
    c10::InferenceMode inference;  // as the model is measured and served
    quantized.forward(calibration.front());
    quantized.forward(FirstSample(calibration.front()));
  } catch (const std::exception& e) {
    throw unsupported(e);
  }
  auto graph = quantized.get_method("forward").graph();
  notes.push_back(std::string("activations: ") + (reduce_range ? "7-bit (0..127), since " : "8-bit, since ") +
                  range_why);
  if (recentred) {
    notes.push_back(
        std::to_string(recentred) + " linear output(s) given the middle zero point (" +
        std::to_string(reduce_range ? 64 : 128) +
        "): LibTorch 1.13's oneDNN linear kernels otherwise mix up layers of one shape whose zero "
        "points differ, in one model or across models in one process");
  }
  if (transposed) {
    notes.push_back(std::to_string(transposed) +
                    " transposed convolution weight(s) quantized per tensor (LibTorch has no per-channel "
                    "quantized transposed convolution)");
  }
  auto left = FloatLayers(graph);
  if (!left.empty()) {
    std::string s = "stayed float: ";
    for (size_t i = 0; i < left.size(); ++i) s += (i ? ", " : "") + left[i];
    notes.push_back(s);
  }
  return quantized;
}

}  // namespace pare::engine
