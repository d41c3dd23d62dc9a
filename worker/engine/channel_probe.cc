#include "worker/engine/channel_internal.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>
#include <tuple>
#include <unordered_map>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine::channels {

namespace {

// ---------------------------------------------------------------------------------------
// Shapes: the model runs once in eval mode and once (on a copy) in training mode with a
// recording op after every tensor value, branches included.

std::mutex probe_mutex;
std::unordered_map<int64_t, Shape>* probe_sink = nullptr;

void RecordShape(const at::Tensor& t, int64_t id) {
  if (probe_sink) (*probe_sink)[id] = t.sizes().vec();
}

TORCH_LIBRARY(pare_probe, m) {
  m.def(torch::schema("pare_probe::shape(Tensor x, int id) -> ()", c10::AliasAnalysisKind::CONSERVATIVE),
        &RecordShape);
}

}  // namespace

bool IsTensor(const torch::jit::Value* v) { return v->type()->kind() == c10::TypeKind::TensorType; }

// Calls f(original, copy) for every value of two structurally identical blocks.
void PairValues(Block* a, Block* b, const std::function<void(Value*, Value*)>& f) {
  for (size_t i = 0; i < a->inputs().size(); ++i) f(a->inputs()[i], b->inputs()[i]);
  auto it = b->nodes().begin();
  for (Node* n : a->nodes()) {
    Node* c = *it++;
    for (size_t i = 0; i < n->outputs().size(); ++i) f(n->output(i), c->output(i));
    for (size_t i = 0; i < n->blocks().size(); ++i) PairValues(n->blocks()[i], c->blocks()[i], f);
  }
}

// Shapes of the values of `graph` (the module's forward) when it runs on `input`, in eval mode
// and, when `train_too`, in training mode on a clone. Returns false when the training run failed.
// The module's own forward must not run before the graph is final: its executor would keep
// the old graph. The eval-mode result goes to `output`.
bool ProbeShapes(const torch::jit::Module& module, const std::shared_ptr<Graph>& graph,
                 const std::vector<at::Tensor>& inputs, bool train_too,
                 std::unordered_map<Value*, Shape>& shapes, c10::IValue& output) {
  auto copy = graph->copy();
  std::vector<Value*> originals;
  std::vector<Value*> copies;
  PairValues(graph->block(), copy->block(), [&](Value* o, Value* c) {
    // prim::Uninitialized stands for a variable on a path that raises (F.interpolate's
    // argument checks): typed Tensor, never one.
    if (!IsTensor(o) || o->node()->kind() == prim::Uninitialized) return;
    originals.push_back(o);
    copies.push_back(c);
  });
  const auto kind = c10::Symbol::fromQualString("pare_probe::shape");
  for (size_t i = 0; i < copies.size(); ++i) {
    Value* v = copies[i];
    Node* def = v->node();
    Node* probe = nullptr;
    if (def->kind() == prim::Param) {
      // A graph or loop-body input: probe at the start of its block.
      Block* owner = def->owningBlock();
      Node* first = owner->nodes().front();
      torch::jit::WithInsertPoint guard(first);
      Value* id = copy->insertConstant(static_cast<int64_t>(i));
      probe = copy->create(kind, {v, id}, 0);
      probe->insertBefore(first);
    } else {
      torch::jit::WithInsertPoint guard(def->next());
      Value* id = copy->insertConstant(static_cast<int64_t>(i));
      probe = copy->create(kind, {v, id}, 0);
      probe->insertAfter(id->node());
    }
  }
  torch::jit::GraphFunction fn("pare_probe_shapes", copy, nullptr);
  std::lock_guard<std::mutex> lock(probe_mutex);
  std::unordered_map<int64_t, Shape> found;
  probe_sink = &found;
  auto run = [&](const torch::jit::Module& m) {
    torch::NoGradGuard no_grad;
    torch::jit::Stack stack{m._ivalue()};
    stack.insert(stack.end(), inputs.begin(), inputs.end());
    fn.run(stack);
    return stack.at(0);
  };
  bool train_ok = true;
  try {
    output = run(module);
    if (train_too) {
      torch::jit::Module clone = module.clone();
      clone.train();
      try {
        run(clone);
      } catch (const std::exception&) {
        train_ok = false;
      }
    }
  } catch (...) {
    probe_sink = nullptr;
    throw;
  }
  probe_sink = nullptr;
  for (const auto& [id, shape] : found) shapes[originals.at(static_cast<size_t>(id))] = shape;
  return train_ok;
}

}  // namespace pare::engine::channels
