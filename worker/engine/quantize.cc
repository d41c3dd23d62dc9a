#include "worker/engine/quantize.h"

#include <functional>
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
#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

// Activation observer for static quantization (affine uint8). All four kinds track the
// running range; HISTOGRAM and PERCENTILE also keep a bounded, evenly thinned sample of
// the values, from which calculate_qparams picks the range.
torch::jit::Module MakeActivationObserver(const std::string& kind) {
  int64_t k = kind == "MINMAX" ? 0 : kind == "MOVING_AVERAGE" ? 1 : kind == "HISTOGRAM" ? 2 : 3;
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.ActivationObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("min_val", c10::TensorType::get(), at::full({}, INFINITY), false, true);
  obs.register_attribute("max_val", c10::TensorType::get(), at::full({}, -INFINITY), false, true);
  obs.register_attribute("samples", c10::TensorType::get(), at::empty({0}), false, true);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQUInt8));
  obs.register_attribute("qscheme", c10::IntType::get(), static_cast<int64_t>(at::kPerTensorAffine));
  obs.register_attribute("quant_min", c10::IntType::get(), int64_t{0});
  obs.register_attribute("quant_max", c10::IntType::get(), int64_t{255});
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
        best_err = torch.full([1], float("inf"))
        best_lo = lo
        best_hi = hi
        for i in range(20):
            for j in range(20):
                clo = lo * (1.0 - 0.05 * float(i))
                chi = hi * (1.0 - 0.05 * float(j))
                scale, zp = self._affine(clo, chi)
                q = torch.fake_quantize_per_tensor_affine(s, float(scale.item()), int(zp.item()), self.quant_min, self.quant_max)
                err = torch.mean((q - s) * (q - s))
                if bool(err < best_err):
                    best_err = err.reshape([1])
                    best_lo = clo
                    best_hi = chi
        lo = best_lo
        hi = best_hi
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
  obs.register_attribute("qscheme", c10::IntType::get(),
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
    throw EngineError(Code::kInvalidArgument, "UNSUPPORTED_MODEL",
                      "quantize.fp16/bf16 needs a forward that takes one tensor and returns one tensor; this one is " +
                          c10::str(schema));
  }
  torch::jit::Module inner = input.clone();
  inner.eval();
  inner.to(spec.bf16 ? at::kBFloat16 : at::kHalf);
  torch::jit::Module wrapper(c10::QualifiedName(spec.bf16 ? "__torch__.pare.BFloat16Model" : "__torch__.pare.Float16Model"));
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
    torch::jit::Node* fresh = graph->insertNode(graph->createTuple(elements, tuple->output()->type()->expect<c10::TupleType>()));
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
          torch::jit::GraphFunction* fn = fn_type ? torch::jit::tryToGraphFunction(*fn_type->function()) : nullptr;
          // torch.nn.functional's calls stay: LibTorch's passes match them as they are (F.relu
          // after a conv, F.dropout).
          if (!fn || fn->qualname().qualifiedName().rfind("__torch__.torch.nn.functional.", 0) == 0) continue;
          call->removeInput(0);  // the function itself; the rest are its arguments
          torch::jit::inlineCallTo(call, fn);
          again = changed = true;
        }
      }
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

static torch::jit::Module QuantizeStaticOnce(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                             const std::vector<at::Tensor>& calibration);

torch::jit::Module QuantizeStatic(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                  const std::vector<at::Tensor>& calibration) {
  try {
    return QuantizeStaticOnce(input, spec, calibration);
  } catch (const EngineError& e) {
    if (e.reason() != "QUANTIZE_UNSUPPORTED" || !CallsSubmodules(input)) throw;
    // LibTorch's passes follow the model's submodule calls, and some structures defeat them
    // (GoogLeNet's optional auxiliary heads: "isObject() INTERNAL ASSERT FAILED"). The same
    // model as one inlined graph, configuration folded (what channel pruning produces), often
    // quantizes: try that before refusing, and refuse with the first error if it fails too.
    torch::jit::Module flat = input.clone();
    flat.eval();
    try {
      InlineForward(flat);
      return QuantizeStaticOnce(flat, spec, calibration);
    } catch (const std::exception&) {
      throw e;
    }
  }
}

static torch::jit::Module QuantizeStaticOnce(const torch::jit::Module& input, const StaticQuantSpec& spec,
                                             const std::vector<at::Tensor>& calibration) {
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
  HoistReluOverMaxPool(module.get_method("forward").graph());
  torch::jit::QConfigDict qconfig;
  qconfig[""] = std::make_tuple(MakeActivationObserver(k), MakeWeightObserver(spec.per_channel));
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
  try {
    torch::jit::Module observed =
        torch::jit::InsertObservers(module, "forward", qconfig, /*inplace=*/true, torch::jit::QuantType::STATIC);
    ObserveAfterConvRelu(observed.get_method("forward").graph());
    {
      torch::NoGradGuard no_grad;
      // A few runs of a graph that is thrown away afterwards: the executor's profiling and
      // optimizing would cost more than they save.
      torch::jit::GraphOptimizerEnabledGuard no_optimizer(false);
      for (const auto& batch : calibration) observed.forward({batch});
    }
    quantized = torch::jit::InsertQuantDeQuant(observed, "forward", /*inplace=*/true,
                                               /*debug=*/false, torch::jit::QuantType::STATIC);
    quantized = torch::jit::Finalize(quantized, torch::jit::QuantType::STATIC, {});
  } catch (const c10::Error& e) {
    throw unsupported(e);
  } catch (const torch::jit::JITException& e) {
    throw unsupported(e);
  }
  auto graph = quantized.get_method("forward").graph();
  DequantizeTupleElements(graph);
  torch::jit::ConstantPropagation(graph);
  torch::jit::EliminateDeadCode(graph);
  return quantized;
}

}  // namespace pare::engine
