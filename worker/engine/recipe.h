// The engine's own description of a recipe: plain C++ (no protobuf, no torch),
// built from the proto Recipe by common/recipe_convert.
#pragma once

#include <string>
#include <variant>
#include <vector>

namespace pare::engine {

struct MagnitudePruneSpec {
  double amount = 0.5;        // fraction of weights set to zero, in [0, 1)
  bool global = false;        // one threshold over all selected layers
  std::vector<std::string> include;  // substrings of layer names; empty = all
  std::vector<std::string> exclude;
};

struct NMPruneSpec {
  int n = 2;  // weights kept in every group of m along the input dimension
  int m = 4;
};

struct DynamicQuantSpec {};

using StepSpec = std::variant<MagnitudePruneSpec, NMPruneSpec, DynamicQuantSpec>;

// The name a step has in reports and progress, e.g. "prune.magnitude".
inline std::string StepName(const StepSpec& s) {
  struct V {
    std::string operator()(const MagnitudePruneSpec&) const { return "prune.magnitude"; }
    std::string operator()(const NMPruneSpec&) const { return "prune.nm"; }
    std::string operator()(const DynamicQuantSpec&) const { return "quantize.dynamic"; }
  };
  return std::visit(V{}, s);
}

}  // namespace pare::engine
