#include "worker/engine/factorize.h"

#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <cmath>
#include <functional>
#include <map>

#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;
namespace aten = c10::aten;

int64_t ChooseRank(const at::Tensor& sigma, const FactorizeSpec& spec) {
  const int64_t full = sigma.numel();
  if (spec.rank_ratio > 0)
    return std::clamp<int64_t>(static_cast<int64_t>(std::ceil(spec.rank_ratio * double(full))), 1, full);
  at::Tensor energy = sigma.pow(2).cumsum(0);
  energy = energy / energy[-1].clamp_min(1e-30);
  int64_t r = (energy < spec.energy - 1e-12).sum().item<int64_t>() + 1;
  return std::clamp<int64_t>(r, 1, full);
}

std::string Mangle(const AttrPath& layer) {
  std::string s = "factorized__";
  for (size_t i = 0; i < layer.size(); ++i) s += (i ? "_" : "") + layer[i];
  return s;
}

// Conv and linear nodes, with how many nodes read each weight attribute (a weight read by two
// nodes is shared and stays as it is).
std::vector<Node*> Layers(const torch::jit::Module& m, const std::shared_ptr<Graph>& graph,
                          std::map<std::string, int>& uses) {
  Value* self = graph->inputs()[0];
  std::vector<Node*> layers;
  std::function<void(torch::jit::Block*)> find = [&](torch::jit::Block* b) {
    for (Node* n : b->nodes()) {
      for (auto* s : n->blocks()) find(s);
      if (n->kind() != aten::linear && n->kind() != aten::conv1d && n->kind() != aten::conv2d &&
          n->kind() != aten::conv3d) {
        continue;
      }
      Source w = Resolve(m, n->input(1), self);
      if (w.kind == Source::kAttr) ++uses[Join(w.path)];
      layers.push_back(n);
    }
  };
  find(graph->block());
  return layers;
}

// Replaces layer `n` (weight at `path`) by two: rank `r` factors of its weight's SVD, registered
// as parameters beside it; the original weight attribute stays, emptied.
void ReplaceByFactors(torch::jit::Module& m, const std::shared_ptr<Graph>& graph, Node* n,
                      const AttrPath& path, const at::Tensor& u, const at::Tensor& sigma,
                      const at::Tensor& vh, int64_t r) {
  Value* self = graph->inputs()[0];
  const bool conv = n->kind() != aten::linear;
  at::Tensor weight = TensorAt(m, path);
  const int64_t out = weight.size(0);
  at::Tensor root = sigma.slice(0, 0, r).sqrt();
  at::Tensor a = (root.unsqueeze(1) * vh.slice(0, 0, r));  // r x in
  at::Tensor bm = (u.slice(1, 0, r) * root.unsqueeze(0));  // out x r
  std::vector<int64_t> a_shape = weight.sizes().vec();
  a_shape[0] = r;
  std::vector<int64_t> b_shape{out, r};
  for (int64_t d = 2; d < weight.dim(); ++d) b_shape.push_back(1);
  auto opts = weight.options().requires_grad(false);
  std::string name = Mangle(AttrPath(path.begin(), path.end() - 1));
  while (m.hasattr(name + "__a")) name += "_";
  const bool grad = weight.requires_grad();
  m.register_parameter(name + "__a", a.reshape(a_shape).to(opts).contiguous().set_requires_grad(grad), false);
  m.register_parameter(name + "__b", bm.reshape(b_shape).to(opts).contiguous().set_requires_grad(grad),
                       false);
  // The original weight is no longer read by the forward: keep the attribute, drop the data.
  SetTensorAt(m, path, at::empty({0}, opts));

  torch::jit::WithInsertPoint guard(n);
  Value* wa = graph->insertGetAttr(self, name + "__a");
  Value* wb = graph->insertGetAttr(self, name + "__b");
  Value* none = graph->insertConstant(c10::IValue());
  Value* second = nullptr;
  if (!conv) {
    Value* first = graph->insert(aten::linear, {n->input(0), wa, none});
    second = graph->insert(aten::linear, {first, wb, n->input(2)});
  } else {
    const size_t spatial = static_cast<size_t>(weight.dim() - 2);
    Value* ones = graph->insertConstant(std::vector<int64_t>(spatial, 1));
    Value* zeros = graph->insertConstant(std::vector<int64_t>(spatial, 0));
    Value* one = graph->insertConstant(int64_t{1});
    Value* first =
        graph->insert(n->kind(), {n->input(0), wa, none, n->input(3), n->input(4), n->input(5), one});
    second = graph->insert(n->kind(), {first, wb, n->input(2), ones, zeros, ones, one});
  }
  n->output()->replaceAllUsesWith(second);
  n->destroy();
}

// The result must still return what the original returned (a tensor of the same shape).
void CheckStillRuns(torch::jit::Module& m, const std::vector<c10::IValue>& probe,
                    const c10::IValue& reference) {
  try {
    torch::NoGradGuard no_grad;
    c10::IValue got = m.forward(probe);
    at::Tensor a = got.isTensor() ? got.toTensor() : at::Tensor();
    at::Tensor b = reference.isTensor() ? reference.toTensor() : at::Tensor();
    if (a.defined() != b.defined() || (a.defined() && a.sizes() != b.sizes())) {
      throw std::runtime_error("the output shape changed");
    }
  } catch (const std::exception& e) {
    throw EngineError(Code::kInternal, "FACTORIZE_BROKE",
                      std::string("factorization produced a model that does not run: ") + e.what());
  }
}

}  // namespace

FactorizeResult Factorize(const torch::jit::Module& module, const FactorizeSpec& spec,
                          const std::vector<int64_t>& input_shape, const InputShapes& more) {
  const bool by_rank = spec.rank_ratio > 0;
  if (by_rank ? spec.rank_ratio > 1 : !(spec.energy > 0 && spec.energy <= 1)) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                      "factorize needs rankRatio in (0, 1] or energy in (0, 1]");
  }
  FactorizeResult result;
  result.module = module.clone();
  torch::jit::Module& m = result.module;
  m.eval();
  if (!m.find_method("forward") || m.get_method("forward").graph()->inputs().size() != 2 + more.size()) {
    throw EngineError(Code::kInvalidArgument, "FACTORIZE",
                      "factorize needs a model whose forward takes " + std::to_string(1 + more.size()) +
                          " tensor(s), one per input shape");
  }
  std::vector<int64_t> shape = input_shape;
  shape[0] = 2;
  at::Generator gen = at::detail::createCPUGenerator(11);
  std::vector<c10::IValue> probe{at::randn(shape, gen).to(ModuleDevice(m))};
  for (const at::Tensor& t : RandomInputs(more, 2, ModuleDevice(m), gen)) probe.push_back(t);
  c10::IValue reference;
  {
    torch::NoGradGuard no_grad;
    reference = module.clone().forward(probe);
  }
  auto graph = InlineForward(m);
  Value* self = graph->inputs()[0];
  std::map<std::string, int> uses;
  int64_t before = 0, after = 0;
  int skipped_small = 0, skipped_other = 0;
  for (Node* n : Layers(m, graph, uses)) {
    Source w = Resolve(m, n->input(1), self);
    Source b = Resolve(m, n->input(2), self);
    if (w.kind != Source::kAttr || b.kind == Source::kOther || uses[Join(w.path)] != 1) {
      ++skipped_other;
      continue;
    }
    if (n->kind() != aten::linear) {
      auto groups = torch::jit::toIValue(n->input(6));
      if (!groups || !groups->isInt() || groups->toInt() != 1) {
        ++skipped_other;
        continue;
      }
    }
    at::Tensor weight = TensorAt(m, w.path);
    const int64_t out = weight.size(0);
    const int64_t in = weight.numel() / out;
    at::Tensor matrix = weight.detach().to(at::kCPU, at::kDouble).reshape({out, in});
    auto [u, sigma, vh] = at::linalg_svd(matrix, /*full_matrices=*/false);
    const int64_t r = ChooseRank(sigma, spec);
    if (r * (out + in) >= out * in) {
      ++skipped_small;
      continue;
    }
    ReplaceByFactors(m, graph, n, w.path, u, sigma, vh, r);
    before += out * in;
    after += r * (out + in);
    ++result.factorized;
  }
  torch::jit::EliminateDeadCode(graph);
  CheckStillRuns(m, probe, reference);
  result.notes.push_back("factorized " + std::to_string(result.factorized) + " layers: weights " +
                         std::to_string(before) + " -> " + std::to_string(after) + " parameters");
  if (skipped_small) {
    result.notes.push_back(std::to_string(skipped_small) +
                           " layers kept whole: at the chosen rank their factors would not be smaller");
  }
  if (skipped_other) {
    result.notes.push_back(std::to_string(skipped_other) +
                           " layers kept whole: grouped or depthwise convolutions, or shared weights");
  }
  return result;
}

}  // namespace pare::engine
