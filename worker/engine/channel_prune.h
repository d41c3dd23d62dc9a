// Structured (channel/filter) pruning that physically removes channels.
//
// The model's forward is inlined into one graph (parameters stay module attributes, so the
// result still trains), channel dependency groups are built from that graph, the least
// important channels of each group are cut from every coupled parameter and buffer, and the
// `groups` of depthwise convolutions are rewritten in that graph. Any group that meets an op
// the analysis does not understand is left intact and named in the notes.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/recipe.h"

namespace pare::engine {

// One channel dependency group, as the analysis found it (for reports and tests).
struct ChannelGroup {
  std::string name;      // the first producing layer, e.g. "layer1.0.conv1"
  int64_t channels = 0;  // before pruning
  int64_t kept = 0;      // after pruning (== channels when left intact)
  bool prunable = false;
  std::string why_intact;            // when not prunable
  std::vector<std::string> members;  // parameters and buffers cut with it ("layer1.0.bn1.weight[0]")
};

struct ChannelPruneResult {
  torch::jit::Module module;
  std::vector<ChannelGroup> groups;
  std::vector<std::string> notes;
};

// Prunes a copy of `module`; `input_shape` (batch first) is what the analysis runs the model on.
// With `spec.target_macs` set, the amount is found by bisection: the smallest (to 0.005) whose
// result keeps at most that fraction of the model's MACs at `input_shape`.
// Throws EngineError when the spec is invalid, the target cannot be reached, or the result would
// not be consistent.
// `more_inputs`: the shapes of forward's further tensor inputs, for models that take several.
ChannelPruneResult ChannelPrune(const torch::jit::Module& module, const ChannelPruneSpec& spec,
                                const std::vector<int64_t>& input_shape,
                                const std::vector<std::vector<int64_t>>& more_inputs = {});

// One analysis of a model serving many prunes of it (a sensitivity analysis prunes each group
// alone at several amounts): each Prune cuts a copy, the analysis is not run again.
class ChannelPruner {
 public:
  ChannelPruner(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
                const std::vector<std::vector<int64_t>>& more_inputs = {});
  ~ChannelPruner();
  // The groups as found, nothing cut (kept == channels).
  std::vector<ChannelGroup> Groups() const;
  // As ChannelPrune with an amount (not targetMacs).
  ChannelPruneResult Prune(const ChannelPruneSpec& spec) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace pare::engine
