#include "worker/engine/prune.h"

#include <sstream>

#include "worker/engine/error.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

std::vector<WeightRef> Selected(const torch::jit::Module& module, const std::vector<std::string>& include,
                                const std::vector<std::string>& exclude, const char* step) {
  std::vector<WeightRef> out;
  for (auto& w : PrunableWeights(module)) {
    if (NameSelected(w.name, include, exclude)) out.push_back(w);
  }
  if (out.empty()) {
    throw EngineError(Code::kInvalidArgument, "NOTHING_TO_PRUNE",
                      std::string(step) + ": the model has no conv or linear weights" +
                          (include.empty() && exclude.empty() ? "" : " matching include/exclude"));
  }
  return out;
}

// Zeroes every element of `w` whose magnitude is at most `threshold`.
void ZeroBelow(at::Tensor& w, const at::Tensor& threshold) {
  w.masked_fill_(w.abs() <= threshold.to(w.device()), 0.0);
}

}  // namespace

std::vector<std::string> MagnitudePrune(torch::jit::Module& module, const MagnitudePruneSpec& spec) {
  if (!(spec.amount >= 0.0 && spec.amount < 1.0)) {
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE", "prune.magnitude.amount must be in [0, 1)");
  }
  torch::NoGradGuard no_grad;
  auto weights = Selected(module, spec.include, spec.exclude, "prune.magnitude");
  std::vector<std::string> notes;
  if (spec.amount == 0.0) return notes;
  if (spec.global) {
    std::vector<at::Tensor> flat;
    int64_t total = 0;
    for (auto& w : weights) {
      flat.push_back(w.weight.detach().abs().flatten().to(at::kFloat).cpu());
      total += w.weight.numel();
    }
    at::Tensor all = at::cat(flat);
    int64_t k = static_cast<int64_t>(spec.amount * static_cast<double>(total));
    if (k == 0) return notes;
    at::Tensor threshold = std::get<0>(all.kthvalue(k));
    for (auto& w : weights) ZeroBelow(w.weight, threshold);
    std::ostringstream os;
    os << "global magnitude threshold " << threshold.item<float>() << " over " << weights.size()
       << " layers";
    notes.push_back(os.str());
  } else {
    for (auto& w : weights) {
      int64_t k = static_cast<int64_t>(spec.amount * static_cast<double>(w.weight.numel()));
      if (k == 0) continue;
      at::Tensor threshold = std::get<0>(w.weight.detach().abs().flatten().to(at::kFloat).kthvalue(k));
      ZeroBelow(w.weight, threshold);
    }
  }
  return notes;
}

std::vector<std::string> NMPrune(torch::jit::Module& module, const NMPruneSpec& spec) {
  if (spec.m < 2 || spec.n < 1 || spec.n >= spec.m) {
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE",
                      "prune.nm needs 1 <= n < m and m >= 2 (got n=" + std::to_string(spec.n) +
                          ", m=" + std::to_string(spec.m) + ")");
  }
  torch::NoGradGuard no_grad;
  std::vector<std::string> notes;
  int pruned = 0;
  for (auto& w : PrunableWeights(module)) {
    at::Tensor weight = w.weight;
    // Input dimension last: linear [out, in]; conv [out, in/groups, k...] -> [out, k..., in].
    std::vector<int64_t> perm{0};
    for (int64_t d = 2; d < weight.dim(); ++d) perm.push_back(d);
    perm.push_back(1);
    at::Tensor moved = weight.permute(perm).contiguous();
    int64_t in = moved.size(-1);
    if (in % spec.m != 0) {
      notes.push_back(w.name + ": input dimension " + std::to_string(in) + " is not a multiple of " +
                      std::to_string(spec.m) + ", left dense");
      continue;
    }
    at::Tensor groups = moved.view({-1, spec.m});
    at::Tensor keep = std::get<1>(groups.abs().topk(spec.n, /*dim=*/1));
    at::Tensor mask = at::zeros_like(groups, at::kBool).scatter_(1, keep, true);
    groups.masked_fill_(~mask, 0.0);
    // Back to the weight's own layout, in place so the module keeps its parameter.
    std::vector<int64_t> inverse(perm.size());
    for (size_t i = 0; i < perm.size(); ++i) inverse[perm[i]] = static_cast<int64_t>(i);
    weight.copy_(moved.permute(inverse));
    ++pruned;
  }
  if (pruned == 0) {
    throw EngineError(Code::kInvalidArgument, "NOTHING_TO_PRUNE",
                      "prune.nm: no conv or linear layer has an input dimension that is a multiple of " +
                          std::to_string(spec.m));
  }
  return notes;
}

}  // namespace pare::engine
