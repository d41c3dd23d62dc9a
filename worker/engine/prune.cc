#include "worker/engine/prune.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// Magnitudes as ordered integers: for |x| the IEEE-754 bit pattern (sign cleared) sorts as the
// value does, NaN above infinity.
inline uint32_t MagnitudeBits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & 0x7fffffffu;
}

// The k-th smallest magnitude (1-based, as at::kthvalue) over all elements of `tensors`
// (contiguous CPU float). A radix select: one pass counts the high 16 bits of every magnitude,
// a second gathers the low bits of the one bucket that holds rank k. Two linear passes instead
// of at::kthvalue's copy and quickselect, which was most of a global pruning step's time.
float KthSmallestMagnitude(const std::vector<at::Tensor>& tensors, int64_t k) {
  std::vector<int64_t> histogram(1 << 16, 0);
  for (const auto& t : tensors) {
    const float* p = t.data_ptr<float>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) ++histogram[MagnitudeBits(p[i]) >> 16];
  }
  uint32_t bucket = 0;
  int64_t below = 0;
  while (below + histogram[bucket] < k) below += histogram[bucket++];
  std::vector<uint32_t> low;
  low.reserve(static_cast<size_t>(histogram[bucket]));
  for (const auto& t : tensors) {
    const float* p = t.data_ptr<float>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) {
      uint32_t bits = MagnitudeBits(p[i]);
      if ((bits >> 16) == bucket) low.push_back(bits & 0xffffu);
    }
  }
  auto nth = low.begin() + (k - below - 1);
  std::nth_element(low.begin(), nth, low.end());
  uint32_t bits = (bucket << 16) | *nth;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// A weight as contiguous CPU float: the tensor itself where it already is one (the common case,
// no copy), else a copy.
at::Tensor FloatCpu(const at::Tensor& w) { return w.detach().to(at::kCPU, at::kFloat).contiguous(); }

// Zeroes every element of `w` whose magnitude is at most `threshold`.
void ZeroBelow(at::Tensor& w, float threshold) {
  if (w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous()) {
    float* p = w.data_ptr<float>();
    const uint32_t limit = MagnitudeBits(threshold);
    for (int64_t i = 0, n = w.numel(); i < n; ++i) {
      if (MagnitudeBits(p[i]) <= limit) p[i] = 0.0f;
    }
    return;
  }
  w.masked_fill_(w.abs() <= threshold, 0.0);
}

}  // namespace

std::vector<std::string> MagnitudePrune(torch::jit::Module& module, const MagnitudePruneSpec& spec) {
  if (!(spec.amount >= 0.0 && spec.amount < 1.0)) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe, "prune.magnitude.amount must be in [0, 1)");
  }
  torch::NoGradGuard no_grad;
  auto weights = Selected(module, spec.include, spec.exclude, "prune.magnitude");
  std::vector<std::string> notes;
  if (spec.amount == 0.0) return notes;
  if (spec.global) {
    std::vector<at::Tensor> flat;
    int64_t total = 0;
    for (auto& w : weights) {
      flat.push_back(FloatCpu(w.weight));
      total += w.weight.numel();
    }
    int64_t k = static_cast<int64_t>(spec.amount * static_cast<double>(total));
    if (k == 0) return notes;
    float threshold = KthSmallestMagnitude(flat, k);
    for (auto& w : weights) ZeroBelow(w.weight, threshold);
    std::ostringstream os;
    os << "global magnitude threshold " << threshold << " over " << weights.size() << " layers";
    notes.push_back(os.str());
  } else {
    for (auto& w : weights) {
      int64_t k = static_cast<int64_t>(spec.amount * static_cast<double>(w.weight.numel()));
      if (k == 0) continue;
      ZeroBelow(w.weight, KthSmallestMagnitude({FloatCpu(w.weight)}, k));
    }
  }
  return notes;
}

std::vector<std::string> NMPrune(torch::jit::Module& module, const NMPruneSpec& spec) {
  if (spec.m < 2 || spec.n < 1 || spec.n >= spec.m) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
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
