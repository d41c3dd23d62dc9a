#include "worker/engine/quant_passes.h"

#include <algorithm>
#include <functional>
#include <map>
#include <set>

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/inliner.h>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/model_util.h"
#include "worker/engine/quantize.h"

namespace pare::engine {

void DequantizeTupleElements(const std::shared_ptr<torch::jit::Graph>& graph) {
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

bool CallsSubmodules(const torch::jit::Module& module) {
  bool calls = false;
  ForEachNode(module.get_method("forward").graph()->block(),
              [&](torch::jit::Node* n) { calls |= n->kind() == c10::prim::CallMethod; });
  return calls;
}

void SpecializeForEval(torch::jit::Module& module) {
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

int PerTensorTransposedWeights(torch::jit::Module& observed) {
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

int MiddleOutputZeroPoints(const std::shared_ptr<torch::jit::Graph>& graph, int64_t quant_max) {
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

int ContiguousBeforeView(const std::shared_ptr<torch::jit::Graph>& graph) {
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

std::vector<std::string> FloatLayers(const std::shared_ptr<torch::jit::Graph>& graph) {
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

std::vector<std::string> FloatBetweenQuantized(const std::shared_ptr<torch::jit::Graph>& graph) {
  // Ops that only move or split values: passed through, not counted.
  auto structural = [](torch::jit::Node* n) {
    const auto k = n->kind();
    return k.is_prim() || k == c10::aten::chunk || k == c10::aten::split || k == c10::aten::view ||
           k == c10::aten::reshape || k == c10::aten::contiguous || k == c10::aten::flatten ||
           k == c10::aten::size || k == c10::aten::__getitem__;
  };
  // Whether a dequantized value reaches `n` backwards (or a quantize forwards), through
  // structural ops only, within a few steps.
  std::function<bool(torch::jit::Node*, int)> from_dequantized = [&](torch::jit::Node* n, int depth) {
    for (torch::jit::Value* in : n->inputs()) {
      torch::jit::Node* p = in->node();
      if (p->kind() == c10::aten::dequantize && p->input(0)->node()->kind() != c10::prim::Constant)
        return true;
      if (depth > 0 && structural(p) && from_dequantized(p, depth - 1)) return true;
    }
    return false;
  };
  std::function<bool(torch::jit::Node*, int)> requantized = [&](torch::jit::Node* n, int depth) {
    for (torch::jit::Value* out : n->outputs()) {
      for (const auto& use : out->uses()) {
        if (use.user->kind() == c10::aten::quantize_per_tensor) return true;
        if (depth > 0 && structural(use.user) && requantized(use.user, depth - 1)) return true;
      }
    }
    return false;
  };
  std::map<std::string, int> count;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    const auto k = n->kind();
    const bool control_flow = k == c10::prim::Loop || k == c10::prim::If;  // a whole loop or branch
    if (!control_flow && (LayerOpOf(n) != LayerOp::kNone || k == c10::aten::dequantize ||
                          k == c10::aten::quantize_per_tensor || structural(n) || !k.is_aten())) {
      return;
    }
    if (control_flow) {
      // A loop or branch that computes on dequantized values (its results reach the rest through
      // its outputs or through lists it appends to).
      bool uses = false;
      for (torch::jit::Block* b : n->blocks()) {
        for (torch::jit::Node* inner : b->nodes()) {
          for (torch::jit::Value* in : inner->inputs()) {
            uses = uses || (in->node()->kind() == c10::aten::dequantize &&
                            in->node()->input(0)->node()->kind() != c10::prim::Constant);
          }
        }
      }
      if (uses) ++count[k.toQualString()];
      return;
    }
    if (from_dequantized(n, 4) && requantized(n, 4)) ++count[k.toQualString()];
  });
  std::vector<std::string> out;
  for (const auto& [op, n] : count) out.push_back(std::to_string(n) + " " + op);
  return out;
}

bool UnderAny(const std::string& path, const std::set<std::string>& roots) {
  for (const auto& r : roots) {
    if (path == r || (path.size() > r.size() && path.compare(0, r.size(), r) == 0 && path[r.size()] == '.')) {
      return true;
    }
  }
  return false;
}

std::set<std::string> UnobserveWeights(const torch::jit::Module& observed,
                                       const std::set<std::string>& keep_float) {
  std::set<std::string> kept;
  if (keep_float.empty()) return kept;
  auto graph = observed.get_method("forward").graph();
  torch::jit::Value* self = graph->inputs()[0];
  std::vector<torch::jit::Node*> layers;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    if (LayerOpOf(n) != LayerOp::kNone) layers.push_back(n);
  });
  for (torch::jit::Node* n : layers) {
    torch::jit::Value* w = n->input(1);
    torch::jit::Node* call = w->node();
    // An observed weight is read through its observer: %w1 = CallMethod[forward](%_observer_N, %w).
    const bool observed_weight = call->kind() == c10::prim::CallMethod &&
                                 call->s(c10::attr::name) == "forward" && call->inputs().size() == 2 &&
                                 call->input(0)->node()->kind() == c10::prim::GetAttr &&
                                 call->input(0)->node()->s(c10::attr::name).rfind("_observer_", 0) == 0;
    torch::jit::Value* raw = observed_weight ? call->input(1) : w;
    Source src = Resolve(observed, raw, self);
    if (src.kind != Source::kAttr || src.path.size() < 2) continue;
    const std::string layer = Join(AttrPath(src.path.begin(), src.path.end() - 1));
    if (!UnderAny(layer, keep_float)) continue;
    kept.insert(layer);
    if (!observed_weight) continue;
    n->replaceInput(1, raw);
    if (!call->hasUses()) call->destroy();
  }
  return kept;
}

}  // namespace pare::engine
