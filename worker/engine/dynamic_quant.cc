// Dynamic INT8 by a direct rewrite of the model's graphs: every `aten::linear` whose weight is
// an attribute becomes `quantized::linear_dynamic` on int8 weights packed once, and every
// `aten::lstm` / `aten::gru` on a module's own weights becomes `aten::quantized_lstm` /
// `aten::quantized_gru` on packed cell parameters. Weights are quantized per tensor,
// symmetric, from their min/max (what PyTorch's default dynamic qconfig does); activations are
// quantized at run time. The float weights that nothing reads any more are removed.
//
// LibTorch's own dynamic pass (InsertObservers → InsertQuantDeQuant → Finalize) handles linear
// layers only and spends most of its time inserting and removing observers that a dynamic
// model does not need.
#include <algorithm>
#include <functional>
#include <limits>
#include <map>
#include <set>

#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/quantize.h"

namespace pare::engine {
namespace {

using torch::jit::Node;
using torch::jit::Value;
using Obj = c10::intrusive_ptr<c10::ivalue::Object>;

c10::IValue CallOp(const char* name, torch::jit::Stack stack) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&stack);
  return stack.at(0);
}

// Per-tensor symmetric int8, scale = max|w| / 127.5 (PyTorch's MinMaxObserver for qint8).
c10::IValue PackLinear(const at::Tensor& weight, const c10::IValue& bias) {
  at::Tensor w = weight.detach().to(at::kFloat).contiguous();
  double amax = w.numel() ? w.abs().max().item<double>() : 0.0;
  double scale = std::max(amax / 127.5, static_cast<double>(std::numeric_limits<float>::epsilon()));
  at::Tensor q = at::quantize_per_tensor(w, scale, 0, at::kQInt8);
  c10::IValue b =
      bias.isTensor() ? c10::IValue(bias.toTensor().detach().to(at::kFloat).contiguous()) : c10::IValue();
  return CallOp("quantized::linear_prepack", {q, b});
}

// The attribute names from a method's `self` to `v`, when `v` is read through GetAttrs only.
bool ChainFromSelf(Value* v, Value* self, std::vector<std::string>& path) {
  std::vector<std::string> rev;
  while (v != self) {
    Node* d = v->node();
    if (d->kind() != c10::prim::GetAttr) return false;
    rev.push_back(d->s(c10::attr::name));
    v = d->input(0);
  }
  path.assign(rev.rbegin(), rev.rend());
  return !path.empty();
}

// A module's attribute or, for what nn.Module lists in __constants__ (nn.LSTM's sizes), its
// class constant; None when it has neither.
c10::IValue Field(const Obj& o, const std::string& name) {
  if (o->type()->hasAttribute(name)) return o->getAttr(name);
  if (o->type()->hasConstant(name)) return o->type()->getConstant(name);
  return c10::IValue();
}

bool FloatMatrix(const at::Tensor& t) { return t.defined() && t.dim() == 2 && t.is_floating_point(); }

// The suffixes of an nn.LSTM / nn.GRU's per-layer, per-direction weights: _l0, _l0_reverse, ….
std::vector<std::string> CellSuffixes(const Obj& o) {
  std::vector<std::string> out;
  const int64_t layers = Field(o, "num_layers").toInt();
  const int dirs = Field(o, "bidirectional").toBool() ? 2 : 1;
  for (int64_t l = 0; l < layers; ++l) {
    for (int d = 0; d < dirs; ++d) out.push_back("_l" + std::to_string(l) + (d ? "_reverse" : ""));
  }
  return out;
}

struct Rewriter {
  // Every module object of the tree, by class type (instances of one type share its methods).
  std::map<const c10::ClassType*, std::vector<Obj>> instances;
  std::map<const c10::ClassType*, c10::ClassTypePtr> types;
  // Packed attributes to fill on every instance of a type: name → how to make it.
  struct Maker {
    char kind;  // 'L' linear, 'S' LSTM, 'G' GRU
    std::function<c10::IValue(const Obj&)> make;
  };
  std::map<std::pair<const c10::ClassType*, std::string>, Maker> makers;
  // Which bias a packed linear weight was made with, so two uses cannot disagree.
  std::map<std::pair<const c10::ClassType*, std::string>, std::string> packed_bias;
  // Attributes whose values now live in packed form, removed when nothing reads them.
  std::set<std::pair<const c10::ClassType*, std::string>> consumed;
  std::vector<std::string> notes;
  int linear = 0, lstm = 0, gru = 0;

  void Collect(const torch::jit::Module& root) {
    for (const torch::jit::Module& m : root.modules()) {
      const c10::ClassTypePtr& t = m.type();
      instances[t.get()].push_back(m._ivalue());
      types[t.get()] = t;
    }
  }

  // Adds `name` of type `type` to the owner type and records how each instance's value is made.
  void Provide(const c10::ClassTypePtr& owner, const std::string& name, const c10::TypePtr& type, char kind,
               std::function<c10::IValue(const Obj&)> make) {
    owner->addOrCheckAttribute(name, type);
    makers[{owner.get(), name}] = Maker{kind, std::move(make)};
  }

  bool RewriteLinear(const std::shared_ptr<torch::jit::Graph>& g, Node* n, const std::string& where) {
    Value* self = g->inputs()[0];
    std::vector<std::string> wpath, bpath;                       // empty bpath: no bias
    if (!ChainFromSelf(n->input(1), self, wpath)) return false;  // weights computed or passed in
    Value* b = n->input(2);
    if (b->type()->kind() != c10::TypeKind::NoneType && !ChainFromSelf(b, self, bpath)) {
      notes.push_back("kept in float: a linear layer in " + where + " whose bias is computed");
      return false;
    }
    // The packed weight lives beside the float one (so the inlined graph of a pruned model and
    // the layer's own forward share it); when the bias belongs to another module (a factorized
    // layer's second half), on the module that owns this graph.
    const bool beside = bpath.empty() || (bpath.size() == wpath.size() &&
                                          std::equal(bpath.begin(), bpath.end() - 1, wpath.begin()));
    Value* owner_value = beside ? n->input(1)->node()->input(0) : self;
    const size_t skip = beside ? wpath.size() - 1 : 0;
    std::vector<std::string> wrel(wpath.begin() + skip, wpath.end());
    std::vector<std::string> brel =
        bpath.empty() ? bpath : std::vector<std::string>(bpath.begin() + skip, bpath.end());
    auto owner_type = owner_value->type()->cast<c10::ClassType>();
    if (!owner_type || instances[owner_type.get()].empty()) return false;
    std::string packed = "_pare_qpacked";
    for (const auto& part : wrel) packed += "_" + part;
    auto key = std::make_pair(owner_type.get(), packed);
    std::string bias_key;
    for (const auto& part : brel) bias_key += "." + part;
    auto seen = packed_bias.find(key);
    if (seen != packed_bias.end() && seen->second != bias_key) {
      notes.push_back("kept in float: " + wpath.back() + " in " + where +
                      " is used with two different biases");
      return false;
    }
    // Every object that owns such a weight must hold a float matrix there.
    for (const Obj& o : instances[owner_type.get()]) {
      if (!FloatMatrix(TensorAt(torch::jit::Module(o), wrel))) return false;
    }
    auto make = [wrel, brel](const Obj& o) {
      at::Tensor bias =
          brel.empty() ? at::Tensor() : TensorAt(torch::jit::Module(o), brel);  // undefined: None
      return PackLinear(TensorAt(torch::jit::Module(o), wrel),
                        bias.defined() ? c10::IValue(bias) : c10::IValue());
    };
    if (seen == packed_bias.end()) {
      c10::IValue sample = make(instances[owner_type.get()].front());
      Provide(owner_type, packed, sample.type(), 'L', make);
      packed_bias[key] = bias_key;
      for (Value* v : {n->input(1), b}) {
        if (v->node()->kind() != c10::prim::GetAttr) continue;
        if (auto t = v->node()->input(0)->type()->cast<c10::ClassType>()) {
          consumed.insert({t.get(), v->node()->s(c10::attr::name)});
        }
      }
    }
    torch::jit::WithInsertPoint guard(n);
    Value* p = g->insertGetAttr(owner_value, packed);
    Value* y = g->insert(c10::Symbol::fromQualString("quantized::linear_dynamic"), {n->input(0), p});
    y->setType(n->output()->type());
    n->output()->replaceAllUsesWith(y);
    n->destroy();
    return true;
  }

  // Why an nn.LSTM / nn.GRU stays float ("" when each instance can be quantized): the layout they
  // keep is weight_ih_l{k}{_reverse}, weight_hh_…, bias_ih_…, bias_hh_…, as float matrices.
  static std::string WhyKeptFloat(const std::vector<Obj>& objs, bool is_lstm, int64_t gates) {
    for (const Obj& o : objs) {
      for (const char* a : {"num_layers", "bidirectional", "hidden_size"}) {
        if (Field(o, a).isNone())
          return std::string(" without nn.") + (is_lstm ? "LSTM" : "GRU") + "'s attributes";
      }
      if (Field(o, "proj_size").isInt() && Field(o, "proj_size").toInt() != 0) {
        return " with proj_size (no quantized kernel for projections)";
      }
      const int64_t hidden = Field(o, "hidden_size").toInt();
      for (const std::string& sfx : CellSuffixes(o)) {
        for (const char* w : {"weight_ih", "weight_hh"}) {
          c10::IValue v = Field(o, w + sfx);
          if (!v.isTensor() || !FloatMatrix(v.toTensor()) || v.toTensor().size(0) != gates * hidden) {
            return std::string(" without a float ") + w + sfx;
          }
        }
      }
    }
    return "";
  }

  // An RNN instance's cells as quantized::make_quantized_cell_params_dynamic lists, one per layer
  // and direction.
  static c10::IValue PackedCells(const Obj& o, int64_t gates) {
    const int64_t hidden = Field(o, "hidden_size").toInt();
    c10::TypePtr cell_type;
    std::vector<c10::IValue> cells;
    for (const std::string& sfx : CellSuffixes(o)) {
      auto bias = [&](const std::string& name) {
        if (o->type()->hasAttribute(name) && o->getAttr(name).isTensor()) {
          return o->getAttr(name).toTensor().detach().to(at::kFloat).contiguous();
        }
        return at::zeros({gates * hidden});  // bias=False: the same as a zero bias
      };
      at::Tensor b_ih = bias("bias_ih" + sfx), b_hh = bias("bias_hh" + sfx);
      c10::IValue ih = PackLinear(o->getAttr("weight_ih" + sfx).toTensor(), b_ih);
      c10::IValue hh = PackLinear(o->getAttr("weight_hh" + sfx).toTensor(), b_hh);
      // reduce_range as PyTorch's quantized dynamic RNN modules (version 2) pass it.
      cells.push_back(CallOp("quantized::make_quantized_cell_params_dynamic", {ih, hh, b_ih, b_hh, true}));
      cell_type = cells.back().type();
    }
    c10::impl::GenericList list(cell_type);
    for (auto& c : cells) list.push_back(std::move(c));
    return c10::IValue(list);
  }

  // aten::lstm / aten::gru on the module's own flat weight list.
  bool RewriteRnn(const std::shared_ptr<torch::jit::Graph>& g, Node* n, const std::string& where) {
    const bool is_lstm = n->kind() == c10::aten::lstm;
    const torch::jit::FunctionSchema* schema = n->maybeSchema();
    if (!schema) return false;
    const bool data = schema->overload_name() == "data";  // packed sequences
    const size_t params_index = data ? 3 : 2;
    Value* self = g->inputs()[0];
    std::vector<std::string> path;
    const std::string what = std::string(is_lstm ? "an LSTM" : "a GRU") + " in " + where;
    if (!ChainFromSelf(n->input(params_index), self, path)) {
      notes.push_back("kept in float: " + what + " whose weights are not the module's own");
      return false;
    }
    Value* owner_value = n->input(params_index)->node()->input(0);
    auto owner_type = owner_value->type()->cast<c10::ClassType>();
    const auto& objs = instances[owner_type ? owner_type.get() : nullptr];
    if (!owner_type || objs.empty()) return false;
    const int64_t gates = is_lstm ? 4 : 3;
    if (std::string why = WhyKeptFloat(objs, is_lstm, gates); !why.empty()) {
      notes.push_back("kept in float: " + what + why);
      return false;
    }
    const std::string packed = "_pare_qcells_" + path.back();
    if (!makers.count({owner_type.get(), packed})) {
      auto make = [gates](const Obj& o) { return PackedCells(o, gates); };
      c10::IValue sample = make(objs.front());
      Provide(owner_type, packed, sample.type(), is_lstm ? 'S' : 'G', make);
      consumed.insert({owner_type.get(), path.back()});
      for (const Obj& o : objs) {
        for (const std::string& sfx : CellSuffixes(o)) {
          for (const char* a : {"weight_ih", "weight_hh", "bias_ih", "bias_hh"})
            consumed.insert({owner_type.get(), a + sfx});
        }
      }
    }
    torch::jit::WithInsertPoint guard(n);
    Value* cells = g->insertGetAttr(owner_value, packed);
    std::vector<Value*> inputs(n->inputs().begin(), n->inputs().end());
    inputs[params_index] = cells;
    if (is_lstm) {
      inputs.push_back(g->insertConstant(static_cast<int64_t>(at::kQInt8)));  // dtype
      inputs.push_back(g->insertConstant(true));                              // use_dynamic
    }
    Node* q = g->create(c10::Symbol::aten(is_lstm ? "quantized_lstm" : "quantized_gru"), inputs,
                        n->outputs().size());
    g->insertNode(q);
    for (size_t i = 0; i < n->outputs().size(); ++i) {
      q->output(i)->setType(n->output(i)->type());
      n->output(i)->replaceAllUsesWith(q->output(i));
    }
    if (!q->maybeSchema()) {
      throw EngineError(Code::kInternal, "QUANTIZE", "no quantized RNN operator matches " + what);
    }
    n->destroy();
    return true;
  }

  void RewriteGraph(const std::shared_ptr<torch::jit::Graph>& g, const std::string& where) {
    std::vector<Node*> found;
    ForEachNode(g->block(), [&](Node* n) {
      if (n->kind() == c10::aten::linear || n->kind() == c10::aten::lstm || n->kind() == c10::aten::gru) {
        found.push_back(n);
      } else if (n->kind() == c10::aten::rnn_tanh || n->kind() == c10::aten::rnn_relu) {
        notes.push_back("kept in float: nn.RNN layers (LibTorch has no dynamic int8 kernel for them)");
      }
    });
    for (Node* n : found) {
      if (n->kind() == c10::aten::linear) {
        RewriteLinear(g, n, where);
      } else {
        RewriteRnn(g, n, where);
      }
    }
    if (!found.empty()) torch::jit::EliminateDeadCode(g);
  }

  void Run(torch::jit::Module& root) {
    Collect(root);
    for (const auto& [raw, type] : types) {
      for (torch::jit::Function* f : type->methods()) {
        auto* gf = dynamic_cast<torch::jit::GraphFunction*>(f);
        if (!gf) continue;
        RewriteGraph(gf->graph(), type->name() ? type->name()->name() : std::string("the model"));
      }
    }
    // Fill the packed attributes on every object of the types that gained them.
    for (const auto& [key, maker] : makers) {
      for (const Obj& o : instances[key.first]) o->setAttr(key.second, maker.make(o));
      int n = static_cast<int>(instances[key.first].size());
      (maker.kind == 'L' ? linear : maker.kind == 'S' ? lstm : gru) += n;
    }
    // Remove the float weights that no method reads any more (they would still be saved).
    std::set<std::pair<const c10::ClassType*, std::string>> read;
    auto reads = [&](torch::jit::Block* b) {
      ForEachNode(b, [&](Node* n) {
        if (n->kind() != c10::prim::GetAttr) return;
        if (auto t = n->input(0)->type()->cast<c10::ClassType>())
          read.insert({t.get(), n->s(c10::attr::name)});
      });
    };
    for (const auto& [raw, type] : types) {
      for (torch::jit::Function* f : type->methods()) {
        if (auto* gf = dynamic_cast<torch::jit::GraphFunction*>(f)) reads(gf->graph()->block());
      }
    }
    for (const auto& [t, name] : consumed) {
      if (read.count({t, name}) || !types[t]->hasAttribute(name)) continue;
      for (const Obj& o : instances[t]) o->unsafeRemoveAttr(name);
      types[t]->unsafeRemoveAttribute(name);
    }
  }
};

}  // namespace

DynamicQuantResult QuantizeDynamic(const torch::jit::Module& input, bool in_place) {
  if (!input.find_method("forward")) {
    throw EngineError(Code::kInvalidArgument, "MODEL_FORMAT", "the model has no forward method");
  }
  // A clone has its own class types, so rewriting their methods leaves the input unchanged.
  DynamicQuantResult r{in_place ? input : input.clone(), {}, 0, 0, 0};
  r.module.eval();
  Rewriter w;
  w.Run(r.module);
  r.linear = w.linear;
  r.lstm = w.lstm;
  r.gru = w.gru;
  // One note per kind of layer and place, though a module has a method per overload.
  for (const std::string& n : w.notes) {
    if (std::find(r.notes.begin(), r.notes.end(), n) == r.notes.end()) r.notes.push_back(n);
  }
  return r;
}

}  // namespace pare::engine
