#include "worker/engine/optimize.h"

#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/frozen_concat_linear.h>
#include <torch/csrc/jit/passes/remove_dropout.h>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/measure.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

// Nodes of the kinds in `kinds` anywhere in `graph`.
int CountNodes(const std::shared_ptr<torch::jit::Graph>& graph, std::initializer_list<c10::Symbol> kinds) {
  int n = 0;
  ForEachNode(graph->block(), [&](torch::jit::Node* node) {
    for (c10::Symbol k : kinds) n += node->kind() == k;
  });
  return n;
}

// A quantized model (Finalize freezes it) or one frozen before: its weights are graph constants.
bool AlreadyFrozen(const torch::jit::Module& module) {
  return IsQuantized(module) || (module.parameters().size() == 0 && !FrozenWeights(module).empty());
}

}  // namespace

OptimizeResult OptimizeForInference(const torch::jit::Module& module) {
  if (AlreadyFrozen(module)) {
    throw EngineError(Code::kInvalidArgument, "OPTIMIZE_FAILED",
                      "optimize: the model is already frozen (a quantized or optimized model)");
  }
  torch::jit::Module m = module.clone();
  m.eval();
  const auto norms = {c10::aten::batch_norm};
  const auto dropouts = {c10::aten::dropout, c10::aten::dropout_, c10::aten::feature_dropout,
                         c10::aten::alpha_dropout};
  const auto linears = {c10::aten::linear};
  // The counts before: the model's forward with its layer calls inlined, as freezing sees it.
  torch::jit::Module flat = m.clone();
  std::shared_ptr<torch::jit::Graph> before;
  OptimizeResult result;
  try {
    before = InlineForward(flat);
    result.module = torch::jit::freeze(m, c10::nullopt, /*optimize_numerics=*/true);
  } catch (const std::exception& e) {
    throw EngineError(Code::kInvalidArgument, "OPTIMIZE_FAILED",
                      "optimize: the model cannot be frozen (" + ErrorText(e) +
                          "); a forward that assigns to its attributes cannot be");
  }
  auto graph = result.module.get_method("forward").graph();
  torch::jit::removeDropout(graph);
  torch::jit::FrozenConcatLinear(graph);
  torch::jit::ConstantPropagation(graph);
  torch::jit::EliminateDeadCode(graph);
  const int folded = CountNodes(before, norms) - CountNodes(graph, norms);
  const int dropped = CountNodes(before, dropouts) - CountNodes(graph, dropouts);
  const int merged = CountNodes(before, linears) - CountNodes(graph, linears);
  result.notes.push_back("frozen for inference: " + std::to_string(folded) + " batch norm(s) folded, " +
                         std::to_string(dropped) + " dropout(s) removed, " + std::to_string(merged) +
                         " linear layer(s) merged with one reading the same input");
  if (module.is_training()) {
    result.notes.push_back(
        "the model was saved in training mode; it is frozen in eval mode (batch norms use their "
        "running statistics, dropout is off)");
  }
  result.notes.push_back(
      "the result no longer trains (its weights are constants); optimize is the last step of a recipe");
  return result;
}

}  // namespace pare::engine
