#include "worker/engine/graph_edit.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/passes/lower_tuples.h>
#include <torch/csrc/jit/passes/remove_mutation.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>

namespace pare::engine {

using namespace ir;  // NOLINT: the IR names

std::string Join(const AttrPath& p) {
  std::string s;
  for (const auto& part : p) s += (s.empty() ? "" : ".") + part;
  return s;
}

// A list built and appended to in one block and only read by concatenations (DenseNet's
// features) becomes one ListConstruct per concatenation, so the concatenation's parts are
// visible. LibTorch's RemoveListMutation leaves lists that are read before an append.
static void LowerListAppends(Graph& graph) {
  std::vector<Node*> lists;
  for (Node* n : graph.nodes()) {
    if (n->kind() == prim::ListConstruct) lists.push_back(n);
  }
  for (Node* list : lists) {
    std::vector<Node*> users;
    bool simple = true;
    for (const auto& use : list->output()->uses()) {
      Node* u = use.user;
      simple &= u->owningBlock() == list->owningBlock() && use.offset == 0 &&
                ((u->kind() == aten::cat) || (u->kind() == aten::append && !u->output()->hasUses()));
      users.push_back(u);
    }
    if (!simple || users.empty()) continue;
    std::sort(users.begin(), users.end(), [](Node* a, Node* b) { return a->isBefore(b); });
    std::vector<Value*> elements(list->inputs().begin(), list->inputs().end());
    for (Node* u : users) {
      if (u->kind() == aten::append) {
        elements.push_back(u->input(1));
        u->destroy();
        continue;
      }
      Node* fresh =
          graph.createList(list->output()->type()->expectRef<c10::ListType>().getElementType(), elements);
      fresh->insertBefore(u);
      u->replaceInput(0, fresh->output());
    }
    if (!list->output()->hasUses()) list->destroy();
  }
}

void ForEachNode(Block* block, const std::function<void(Node*)>& f) {
  for (Node* n : block->nodes()) {
    f(n);
    for (Block* sub : n->blocks()) ForEachNode(sub, f);
  }
}

// The list a loop node fills as `[v for _ in range(n)]`, or null.
static Value* RepeatedList(Node* loop) {
  if (loop->kind() != prim::Loop || loop->outputs().size() != 0 || loop->inputs().size() != 2) return nullptr;
  auto always = [](Value* v) {
    auto c = torch::jit::toIValue(v);
    return c && c->isBool() && c->toBool();
  };
  Block* body = loop->blocks()[0];
  if (!always(loop->input(1)) || body->outputs().size() != 1 || !always(body->outputs()[0])) return nullptr;
  auto nodes = body->nodes();
  if (nodes.begin() == nodes.end() || std::next(nodes.begin()) != nodes.end()) return nullptr;
  Node* append = *nodes.begin();
  if (append->kind() != aten::append || append->inputs().size() != 2 || append->output()->hasUses())
    return nullptr;
  Value* list = append->input(0);
  Value* item = append->input(1);
  Node* made = list->node();
  if (made->kind() != prim::ListConstruct || made->inputs().size() != 0 ||
      made->owningBlock() != loop->owningBlock() || item->node()->owningBlock() == body) {
    return nullptr;
  }
  for (const auto& use : list->uses()) {
    if (use.user != append && !use.user->isAfter(loop)) return nullptr;
  }
  return list;
}

int RepeatListLoops(const std::shared_ptr<torch::jit::Graph>& graph, bool dry_run) {
  std::vector<Node*> loops;
  ForEachNode(graph->block(), [&](Node* n) {
    if (RepeatedList(n)) loops.push_back(n);
  });
  if (dry_run) return static_cast<int>(loops.size());
  for (Node* loop : loops) {
    Value* list = RepeatedList(loop);
    Node* append = *loop->blocks()[0]->nodes().begin();
    torch::jit::WithInsertPoint guard(loop);
    auto element = list->type()->expect<c10::ListType>()->getElementType();
    Value* one = graph->insertNode(graph->createList(element, {append->input(1)}))->output();
    Value* repeated = graph->insert(aten::mul, {one, loop->input(0)});
    repeated->setType(list->type());
    loop->destroy();  // and the append in it: the list's other uses all come after
    list->replaceAllUsesWith(repeated);
    list->node()->destroy();
  }
  return static_cast<int>(loops.size());
}

int FoldRanks(const torch::jit::Module& module, const std::shared_ptr<torch::jit::Graph>& graph,
              const std::vector<c10::IValue>& example) {
  // The ranks are read by running a copy of the graph that also returns every `dim()` of its
  // top-level block; folding them may fold branches whose bodies hold more, so again.
  int folded = 0;
  for (int round = 0; round < 8; ++round) {
    std::vector<Node*> dims;
    for (Node* n : graph->nodes()) {
      if (n->kind() == aten::dim && n->inputs().size() == 1) dims.push_back(n);
    }
    if (dims.empty()) break;
    std::shared_ptr<Graph> copy = graph->copy();
    std::vector<Node*> copied;
    for (Node* n : copy->nodes()) {
      if (n->kind() == aten::dim && n->inputs().size() == 1) copied.push_back(n);
    }
    if (copied.size() != dims.size() || copy->inputs().size() != example.size() + 1) break;
    std::vector<Value*> outs(copy->outputs().begin(), copy->outputs().end());
    for (Node* n : copied) outs.push_back(n->output());
    Value* all = copy->insertNode(copy->createTuple(outs))->output();
    while (!copy->outputs().empty()) copy->eraseOutput(0);
    copy->registerOutput(all);
    torch::jit::Stack stack;
    stack.push_back(module._ivalue());
    stack.insert(stack.end(), example.begin(), example.end());
    try {
      torch::NoGradGuard no_grad;
      torch::jit::GraphFunction run("pare_ranks", copy, nullptr);
      run.run(stack);
    } catch (const std::exception&) {
      break;
    }
    if (stack.size() != 1 || !stack[0].isTuple()) break;
    const auto& values = stack[0].toTupleRef().elements();
    const size_t first = values.size() - dims.size();
    for (size_t i = 0; i < dims.size(); ++i) {
      torch::jit::WithInsertPoint guard(dims[i]);
      dims[i]->output()->replaceAllUsesWith(graph->insertConstant(values[first + i].toInt()));
      dims[i]->destroy();
    }
    folded += static_cast<int>(dims.size());
    std::shared_ptr<Graph> g = graph;
    torch::jit::ConstantPropagation(g);
    torch::jit::EliminateDeadCode(g);
  }
  return folded;
}

LayerOp LayerOpOf(const Node* n) {
  const auto k = n->kind();
  if (k == c10::aten::conv1d || k == c10::aten::conv2d || k == c10::aten::conv3d) return LayerOp::kConv;
  if (k == c10::aten::conv_transpose1d || k == c10::aten::conv_transpose2d ||
      k == c10::aten::conv_transpose3d) {
    return LayerOp::kTransposedConv;
  }
  if (k == c10::aten::_convolution) {
    auto t = torch::jit::toIValue(n->input(6));
    return t && t->isBool() && t->toBool() ? LayerOp::kTransposedConv : LayerOp::kConv;
  }
  return k == c10::aten::linear ? LayerOp::kLinear : LayerOp::kNone;
}

// Makes `module`'s forward one graph: submodule calls inlined, tuples and list appends
// lowered, and constant bool, int, float and string attributes (never set by the graph, other
// than `training`) folded so that dead branches disappear (a stochastic depth of probability 0),
// as are int lists only `permute` reads and lookups with constant keys in dict attributes.
// Parameters stay attributes.
std::shared_ptr<Graph> InlineForward(torch::jit::Module& module) {
  auto graph = module.get_method("forward").graph();
  torch::jit::Inline(*graph);
  torch::jit::LowerSimpleTuples(graph);
  std::set<std::string> assigned;
  ForEachNode(graph->block(), [&](Node* n) {
    if (n->kind() == prim::SetAttr) assigned.insert(n->s(c10::attr::name));
  });
  std::vector<Node*> config_reads;
  ForEachNode(graph->block(), [&](Node* n) {
    const auto type = n->kind() == prim::GetAttr ? n->output()->type()->kind() : c10::TypeKind::AnyType;
    // Lists are mutable: an int list (torchvision's Permute dims) only where permute alone reads it.
    bool int_list = false;
    if (type == c10::TypeKind::ListType &&
        n->output()->type()->containedType(0)->kind() == c10::TypeKind::IntType) {
      int_list = !n->output()->uses().empty();
      for (const auto& use : n->output()->uses()) int_list &= use.user->kind() == aten::permute;
    }
    // A dict of configuration (torchvision's IntermediateLayerGetter.return_layers) only where
    // it is looked up with constant keys: `name in d` and `d[name]`.
    bool lookup_dict = false;
    if (type == c10::TypeKind::DictType) {
      const auto v = n->output()->type()->containedType(1)->kind();
      lookup_dict =
          !n->output()->uses().empty() && (v == c10::TypeKind::BoolType || v == c10::TypeKind::IntType ||
                                           v == c10::TypeKind::FloatType || v == c10::TypeKind::StringType);
      for (const auto& use : n->output()->uses()) {
        const auto k = use.user->kind();
        lookup_dict &= (k == aten::__contains__ || k == aten::__getitem__) && use.offset == 0 &&
                       use.user->input(1)->node()->kind() == prim::Constant;
      }
    }
    const bool scalar = type == c10::TypeKind::BoolType || type == c10::TypeKind::IntType ||
                        type == c10::TypeKind::FloatType || type == c10::TypeKind::StringType;
    if ((scalar || int_list || lookup_dict) && n->s(c10::attr::name) != "training" &&
        !assigned.count(n->s(c10::attr::name))) {
      config_reads.push_back(n);
    }
  });
  for (Node* n : config_reads) {
    // Evaluate the attribute through its owner chain.
    std::vector<std::string> names;
    Value* v = n->input(0);
    bool from_self = true;
    while (v != graph->inputs()[0]) {
      if (v->node()->kind() != prim::GetAttr) {
        from_self = false;
        break;
      }
      names.push_back(v->node()->s(c10::attr::name));
      v = v->node()->input(0);
    }
    if (!from_self) continue;
    c10::intrusive_ptr<c10::ivalue::Object> obj = module._ivalue();
    for (auto it = names.rbegin(); it != names.rend(); ++it) obj = obj->getAttr(*it).toObject();
    c10::IValue value = obj->getAttr(n->s(c10::attr::name));
    if (value.isGenericDict()) {
      const auto dict = value.toGenericDict();
      std::vector<Node*> lookups;
      for (const auto& use : n->output()->uses()) lookups.push_back(use.user);
      for (Node* lookup : lookups) {
        const c10::IValue key = torch::jit::toIValue(lookup->input(1)).value();
        const bool found = dict.contains(key);
        if (lookup->kind() == aten::__getitem__ && !found) continue;  // raises at run time, as it should
        torch::jit::WithInsertPoint guard(lookup);
        lookup->output()->replaceAllUsesWith(
            graph->insertConstant(lookup->kind() == aten::__contains__ ? c10::IValue(found) : dict.at(key)));
      }
      continue;
    }
    torch::jit::WithInsertPoint guard(n);
    n->output()->replaceAllUsesWith(graph->insertConstant(value));
  }
  torch::jit::RemoveListMutation(graph);
  torch::jit::ConstantPropagation(graph);
  torch::jit::EliminateDeadCode(graph);
  LowerListAppends(*graph);
  torch::jit::EliminateDeadCode(graph);
  return graph;
}

Source Resolve(const torch::jit::Module& root, Value* v, Value* self) {
  if (v->type()->kind() == c10::TypeKind::NoneType) return {Source::kNone, {}};
  Node* n = v->node();
  if (n->kind() == prim::unchecked_cast) return Resolve(root, n->input(0), self);
  if (n->kind() == prim::If) {
    size_t i = v->offset();
    Source a = Resolve(root, n->blocks()[0]->outputs()[i], self);
    Source b = Resolve(root, n->blocks()[1]->outputs()[i], self);
    if (a.kind == Source::kNone) return b;
    if (b.kind == Source::kNone) return a;
    if (a.kind == Source::kAttr && b.kind == Source::kAttr && a.path == b.path) return a;
    return {};
  }
  AttrPath rev;
  while (v != self) {
    Node* d = v->node();
    if (d->kind() != prim::GetAttr) return {};
    rev.push_back(d->s(c10::attr::name));
    v = d->input(0);
  }
  AttrPath path(rev.rbegin(), rev.rend());
  if (path.empty()) return {};
  // An Optional[Tensor] attribute holding None (a conv without bias).
  c10::intrusive_ptr<c10::ivalue::Object> obj = root._ivalue();
  for (size_t i = 0; i + 1 < path.size(); ++i) {
    c10::IValue next = obj->getAttr(path[i]);
    if (!next.isObject()) return {};
    obj = next.toObject();
  }
  c10::IValue value = obj->getAttr(path.back());
  if (value.isNone()) return {Source::kNone, {}};
  if (!value.isTensor()) return {};
  return {Source::kAttr, path};
}

static c10::intrusive_ptr<c10::ivalue::Object> Owner(const torch::jit::Module& root, const AttrPath& path) {
  c10::intrusive_ptr<c10::ivalue::Object> obj = root._ivalue();
  for (size_t i = 0; i + 1 < path.size(); ++i) obj = obj->getAttr(path[i]).toObject();
  return obj;
}

at::Tensor TensorAt(const torch::jit::Module& root, const AttrPath& path) {
  c10::IValue v = Owner(root, path)->getAttr(path.back());
  return v.isTensor() ? v.toTensor() : at::Tensor();
}

void SetTensorAt(const torch::jit::Module& root, const AttrPath& path, const at::Tensor& t) {
  Owner(root, path)->setAttr(path.back(), t);
}

int FoldInlinedConvBatchNorm(torch::jit::Module& module) {
  auto graph = module.get_method("forward").graph();
  torch::jit::Value* self = graph->inputs()[0];
  int folded = 0;
  std::vector<torch::jit::Node*> norms;
  for (torch::jit::Node* n : graph->nodes()) {
    if (n->kind() == aten::batch_norm) norms.push_back(n);
  }
  // A layer called at several places (a block applied twice, a siamese encoder) shares its
  // weight and statistics between call sites: folding at each would scale the shared weight
  // once per site. Such pairs keep their batch norm.
  std::map<std::string, int> readers;
  ForEachNode(graph->block(), [&](torch::jit::Node* n) {
    if (LayerOpOf(n) != LayerOp::kNone || n->kind() == aten::batch_norm) {
      for (size_t i = 1; i < n->inputs().size() && i < 5; ++i) {
        Source s = Resolve(module, n->input(i), self);
        if (s.kind == Source::kAttr) ++readers[Join(s.path)];
      }
    }
  });
  auto shared = [&](const Source& s) { return s.kind == Source::kAttr && readers[Join(s.path)] > 1; };
  for (torch::jit::Node* bn : norms) {
    torch::jit::Node* conv = bn->input(0)->node();
    if (!(conv->kind() == aten::conv1d || conv->kind() == aten::conv2d || conv->kind() == aten::conv3d))
      continue;
    // Besides the norm, only shape checks (batch norm's own input checks) may read the conv.
    bool alone = true;
    for (const auto& use : conv->output()->uses()) {
      alone &= use.user == bn || use.user->kind() == aten::dim || use.user->kind() == aten::size;
    }
    if (!alone) continue;
    Source w = Resolve(module, conv->input(1), self);
    Source b = Resolve(module, conv->input(2), self);
    Source gamma = Resolve(module, bn->input(1), self), beta = Resolve(module, bn->input(2), self);
    Source mean = Resolve(module, bn->input(3), self), var = Resolve(module, bn->input(4), self);
    auto eps = torch::jit::toIValue(bn->input(7));
    if (w.kind != Source::kAttr || b.kind == Source::kOther || mean.kind != Source::kAttr ||
        var.kind != Source::kAttr || gamma.kind == Source::kOther || beta.kind == Source::kOther || !eps) {
      continue;
    }
    if (shared(w) || shared(b) || shared(mean) || shared(var) || shared(gamma) || shared(beta)) continue;
    torch::NoGradGuard no_grad;
    at::Tensor weight = TensorAt(module, w.path);
    at::Tensor rm = TensorAt(module, mean.path), rv = TensorAt(module, var.path);
    at::Tensor scale = (rv + eps->toDouble()).rsqrt();
    if (gamma.kind == Source::kAttr) scale = scale * TensorAt(module, gamma.path);
    at::Tensor bias = b.kind == Source::kAttr ? TensorAt(module, b.path) : at::zeros_like(rm);
    at::Tensor new_bias = (bias - rm) * scale;
    if (beta.kind == Source::kAttr) new_bias = new_bias + TensorAt(module, beta.path);
    std::vector<int64_t> view(static_cast<size_t>(weight.dim()), 1);
    view[0] = -1;
    SetTensorAt(module, w.path, (weight * scale.reshape(view)).contiguous());
    // The conv's bias may be declared None: the folded bias lives on the top module.
    std::string name = "_pare_folded_bias_" + std::to_string(folded);
    while (module.hasattr(name)) name += "_";
    module.register_parameter(name, new_bias.contiguous(), false);
    torch::jit::WithInsertPoint guard(conv);
    torch::jit::Value* attr = graph->insertGetAttr(self, name);
    conv->replaceInput(2, attr);
    bn->output()->replaceAllUsesWith(conv->output());
    ++folded;
  }
  if (folded) torch::jit::EliminateDeadCode(graph);
  return folded;
}

}  // namespace pare::engine
