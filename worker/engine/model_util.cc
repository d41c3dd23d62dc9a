#include "worker/engine/model_util.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/ir/constants.h>

#include <algorithm>
#include <functional>
#include <unordered_set>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"

namespace pare::engine {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string TypeName(const torch::jit::Module& m) {
  auto qn = m.type()->name();
  return qn ? qn->name() : std::string();
}

bool IsConvType(const std::string& t) {
  for (const char* k :
       {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"}) {
    if (t == k) return true;
  }
  return false;
}

}  // namespace

std::vector<WeightRef> PrunableWeights(const torch::jit::Module& module) {
  std::vector<WeightRef> out;
  for (const auto& item : module.named_modules()) {
    // Type names carry mangling ("___torch_mangle_3.Linear"): compare the last part.
    std::string t = TypeName(item.value);
    auto dot = t.rfind('.');
    if (dot != std::string::npos) t = t.substr(dot + 1);
    bool conv = IsConvType(t);
    bool linear = t == "Linear" || EndsWith(t, "LinearWithBias");
    if (!conv && !linear) continue;
    if (!item.value.hasattr("weight")) continue;
    auto w = item.value.attr("weight");
    if (!w.isTensor()) continue;
    at::Tensor weight = w.toTensor();
    if (!weight.is_floating_point() || weight.dim() < 2) continue;
    out.push_back({item.name, weight, conv});
  }
  // Parameters that a module's own code passes to a convolution or linear op
  // (`F.conv2d(x, self.weight)`, `F.linear(x, self.w)`), named "<module>.<attribute>".
  std::unordered_set<const void*> seen;
  for (const auto& w : out) seen.insert(w.weight.unsafeGetTensorImpl());
  for (const auto& item : module.named_modules()) {
    for (const auto& method : item.value.get_methods()) {
      auto graph = method.graph();
      torch::jit::Value* self = graph->inputs()[0];
      std::function<void(torch::jit::Block*)> visit = [&](torch::jit::Block* b) {
        for (torch::jit::Node* n : b->nodes()) {
          for (torch::jit::Block* inner : n->blocks()) visit(inner);
          const LayerOp op = LayerOpOf(n);
          if (op == LayerOp::kNone) continue;
          const bool conv = op != LayerOp::kLinear;
          torch::jit::Node* get = n->input(1)->node();
          if (get->kind() != c10::prim::GetAttr || get->input(0) != self) continue;
          const std::string attr = get->s(c10::attr::name);
          if (!item.value.hasattr(attr)) continue;
          auto v = item.value.attr(attr);
          if (!v.isTensor()) continue;
          at::Tensor weight = v.toTensor();
          if (!weight.is_floating_point() || weight.dim() < 2 ||
              !seen.insert(weight.unsafeGetTensorImpl()).second) {
            continue;
          }
          out.push_back({item.name.empty() ? attr : item.name + "." + attr, weight, conv});
        }
      };
      visit(graph->block());
    }
  }
  return out;
}

bool NameSelected(const std::string& name, const std::vector<std::string>& include,
                  const std::vector<std::string>& exclude) {
  for (const auto& e : exclude) {
    if (!e.empty() && name.find(e) != std::string::npos) return false;
  }
  if (include.empty()) return true;
  for (const auto& i : include) {
    if (name.find(i) != std::string::npos) return true;
  }
  return false;
}

static at::Tensor Unpacked(const char* unpack, const c10::IValue& packed) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(unpack, "");
  torch::jit::Stack stack{packed};
  op.callBoxed(&stack);
  if (stack.empty()) return at::Tensor();
  return stack[0].isTuple() ? stack[0].toTupleRef().elements()[0].toTensor() : stack[0].toTensor();
}

std::vector<PackedWeight> PackedWeights(const torch::jit::Module& module) {
  std::vector<PackedWeight> out;
  for (const auto& item : module.named_modules()) {
    const auto& type = item.value.type();
    for (size_t i = 0; i < type->numAttributes(); ++i) {
      const auto& attr_type = type->getAttribute(i);
      std::string name = type->getAttributeName(i);
      if (!item.name.empty()) name = item.name + "." + name;
      auto list_type = attr_type->cast<c10::ListType>();
      auto cls = (list_type ? list_type->getElementType() : attr_type)->cast<c10::ClassType>();
      if (!cls || !cls->name()) continue;
      const std::string qn = cls->name()->qualifiedName();
      const c10::IValue& slot = item.value._ivalue()->getSlot(i);
      if (list_type && qn == "__torch__.torch.classes.rnn.CellParamsBase") {
        // Quantized LSTM/GRU cells: their state holds the two packed linear weights.
        c10::List<c10::IValue> cells = slot.toList();
        for (size_t k = 0; k < cells.size(); ++k) {
          c10::IValue cell = cells.get(k);
          torch::jit::Stack stack{cell};
          cell.toObject()->type()->getMethod("__getstate__").run(stack);
          const auto& elements = stack.at(0).toTupleRef().elements();
          std::vector<c10::IValue> state(elements.begin(), elements.end());
          if (state.size() < 5 || !state[4].isList()) continue;
          c10::List<c10::IValue> packed = state[4].toList();
          for (size_t j = 0; j < packed.size(); ++j) {
            at::Tensor w = Unpacked("quantized::linear_unpack", packed.get(j));
            if (w.defined()) out.push_back({name + "." + std::to_string(k) + (j ? ".hh" : ".ih"), w});
          }
        }
        continue;
      }
      if (list_type) continue;
      const char* unpack = nullptr;
      if (qn == "__torch__.torch.classes.quantized.LinearPackedParamsBase") {
        unpack = "quantized::linear_unpack";
      } else if (qn == "__torch__.torch.classes.quantized.Conv2dPackedParamsBase") {
        unpack = "quantized::conv2d_unpack";
      } else if (qn == "__torch__.torch.classes.quantized.Conv3dPackedParamsBase") {
        unpack = "quantized::conv3d_unpack";
      }
      if (!unpack) continue;
      at::Tensor w = Unpacked(unpack, slot);
      if (w.defined()) out.push_back({name, w});
    }
  }
  return out;
}

std::vector<PackedWeight> FrozenWeights(const torch::jit::Module& module) {
  std::vector<PackedWeight> out;
  std::unordered_set<const void*> seen;
  std::function<void(torch::jit::Block*)> visit = [&](torch::jit::Block* block) {
    for (torch::jit::Node* node : block->nodes()) {
      for (torch::jit::Block* sub : node->blocks()) visit(sub);
      if (node->kind() != c10::prim::Constant || node->outputs().size() != 1) continue;
      if (!node->output()->type()->cast<c10::TensorType>()) continue;
      auto value = torch::jit::toIValue(node->output());
      if (!value || !value->isTensor()) continue;
      at::Tensor t = value->toTensor();
      if (!t.defined() || !t.is_floating_point() || t.numel() < 2) continue;
      if (!seen.insert(t.storage().data()).second) continue;
      out.push_back({"constant:" + node->output()->debugName(), t});
    }
  };
  for (const auto& method : module.get_methods()) visit(method.graph()->block());
  return out;
}

at::Tensor OutputTensor(const c10::IValue& out) {
  if (out.isTensor()) return out.toTensor();
  if (out.isTuple()) {
    for (const auto& e : out.toTupleRef().elements()) {
      if (e.isTensor()) return e.toTensor();
    }
  }
  if (out.isList()) {
    for (const auto& e : out.toListRef()) {
      if (e.isTensor()) return e.toTensor();
    }
  }
  if (out.isGenericDict()) {
    // Segmentation models' {"out": ..., "aux": ...}: "out"; else the first tensor stored
    // ({"logits": ..., "features": ...}).
    auto dict = out.toGenericDict();
    for (const auto& kv : dict) {
      if (kv.key().isString() && kv.key().toStringRef() == "out" && kv.value().isTensor()) {
        return kv.value().toTensor();
      }
    }
    for (const auto& kv : dict) {
      if (kv.value().isTensor()) return kv.value().toTensor();
    }
  }
  throw EngineError(
      Code::kInvalidArgument, "MODEL_OUTPUT",
      "the model's forward returned " + out.tagKind() + ", not a tensor (or a tuple/list/dict holding one)");
}

namespace {
void CollectOutputs(const c10::IValue& v, const std::string& name,
                    std::vector<std::pair<std::string, at::Tensor>>& out) {
  if (v.isTensor()) {
    out.emplace_back(name, v.toTensor());
  } else if (v.isTuple() || v.isList()) {
    const auto elements = v.isTuple() ? v.toTupleRef().elements().vec() : v.toListRef().vec();
    for (size_t i = 0; i < elements.size(); ++i)
      CollectOutputs(elements[i], name + "[" + std::to_string(i) + "]", out);
  } else if (v.isGenericDict()) {
    for (const auto& kv : v.toGenericDict()) {
      const std::string key = kv.key().isString() ? kv.key().toStringRef() : "[" + c10::str(kv.key()) + "]";
      CollectOutputs(kv.value(), name.empty() || key[0] == '[' ? name + key : name + "." + key, out);
    }
  }
}
}  // namespace

std::vector<std::pair<std::string, at::Tensor>> OutputTensors(const c10::IValue& out) {
  std::vector<std::pair<std::string, at::Tensor>> all;
  CollectOutputs(out, "", all);
  if (all.empty()) {
    throw EngineError(Code::kInvalidArgument, "MODEL_OUTPUT",
                      "the model's forward returned " + out.tagKind() +
                          ", not a tensor (or a tuple/list/dict holding one)");
  }
  // The primary output first: a dict's "out" (segmentation models), as OutputTensor picks it.
  const at::Tensor primary = OutputTensor(out);
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].second.unsafeGetTensorImpl() == primary.unsafeGetTensorImpl()) {
      std::rotate(all.begin(), all.begin() + i, all.begin() + i + 1);
      break;
    }
  }
  return all;
}

std::vector<at::Tensor> RandomInputs(const InputShapes& shapes, int64_t batch, c10::Device device,
                                     c10::optional<at::Generator> gen) {
  std::vector<at::Tensor> out;
  for (auto shape : shapes) {
    if (batch > 0) shape[0] = batch;
    out.push_back(at::randn(shape, gen).to(device));
  }
  return out;
}

std::vector<c10::IValue> ForwardArgs(const at::Tensor& x, const std::vector<at::Tensor>& more) {
  std::vector<c10::IValue> args{x};
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

c10::Device ModuleDevice(const torch::jit::Module& module) {
  for (const auto& p : module.parameters()) return p.device();
  return c10::kCPU;
}

// LibTorch messages carry a C++ backtrace or a TorchScript traceback; keep what a person needs.
std::string ErrorText(const std::exception& e) {
  std::string msg;
  if (auto* c = dynamic_cast<const c10::Error*>(&e))
    msg = c->what_without_backtrace();
  else
    msg = e.what();
  // TorchScript exceptions end with "builtins.X: message"; prefer that line.
  auto pos = msg.rfind("\nbuiltins.");
  if (pos != std::string::npos) msg = msg.substr(pos + 1);
  while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
  msg.erase(0, std::min(msg.size(), msg.find_first_not_of("\n ")));
  // An operator that failed inside the interpreter: a traceback, then the error on the last line.
  if (msg.rfind("The following operation failed in the TorchScript interpreter", 0) == 0) {
    auto last = msg.rfind('\n');
    if (last != std::string::npos) msg = msg.substr(last + 1);
  }
  if (msg.size() > 600) {
    // At a word boundary where there is one near the limit, so no token is cut in half.
    size_t cut = msg.rfind(' ', 600);
    if (cut == std::string::npos || cut < 480) cut = 600;
    msg = msg.substr(0, cut) + " ...";
  }
  return msg;
}

}  // namespace pare::engine
