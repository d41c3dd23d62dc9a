// Channel pruning's inner parts, shared by its files (not a public interface):
//   channel_probe.cc    runs the model once per mode and records every value's shape;
//   channel_analysis.cc the dependency analysis: which channels must be cut together (groups),
//                       which cannot be cut and why, which size constants follow them;
//   channel_cut.cc      scores, kept counts, and the tensor and graph surgery;
//   channel_prune.cc    the public ChannelPrune: amounts, the fallback for groups whose cut
//                       breaks the model, and the MACs-budget search.
#pragma once

#include <initializer_list>
#include <string>
#include <unordered_map>
#include <vector>

#include <torch/script.h>

#include "worker/engine/channel_prune.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/model_util.h"

namespace pare::engine::channels {

// The names the channel-pruning files all use.
using namespace ::pare::engine::ir;  // NOLINT: the IR names
using Path = AttrPath;
using Shape = std::vector<int64_t>;

bool IsTensor(const torch::jit::Value* v);
bool In(c10::Symbol k, std::initializer_list<c10::Symbol> set);

// Shapes of the values of `graph` (the module's forward) when it runs on `inputs`, in eval mode
// and (on a copy) in training mode when `train` is set; `reference` gets the eval output.
// Returns whether training mode ran.
bool ProbeShapes(const torch::jit::Module& module, const std::shared_ptr<torch::jit::Graph>& graph,
                 const std::vector<at::Tensor>& inputs, bool train,
                 std::unordered_map<torch::jit::Value*, Shape>& shapes, c10::IValue& reference);

// kLayerNorm: weight and bias along dim 0, and the node whose `normalized_shape` follows the
// kept count (`conv`, `groups_input`).
enum class Role { kOut, kIn, kNorm, kDepthwise, kChannelParam, kLayerNorm };

struct Member {
  Role role;
  std::vector<Path> params;  // kOut/kDepthwise: weight, [bias]; kNorm: weight, bias, mean, var; kIn: weight
  int64_t dim = 0;
  int64_t offset = 0;  // first element along `dim` that belongs to the atom
  int64_t factor = 1;
  Node* conv = nullptr;     // kDepthwise: the node whose `groups` follows the channel count
  size_t groups_input = 0;  // its index
  int64_t per_group = 1;    // kDepthwise: channels per conv group (1 depthwise, more for grouped)
};

// One group after the analysis: the root atom and everything cut with it.
struct Group {
  int root;
  int64_t size;
  int64_t granule;
  int64_t multiple;
  std::string name;
  bool blocked;
  std::string why;
  std::vector<Member> members;
};

// A view/reshape size constant that follows the kept channels: for each run of channels, its
// group (-1: not a group, its size stays) and how many elements each channel has.
struct SizeFixup {
  Node* node;
  std::vector<std::tuple<int, int64_t, int64_t>> parts;  // group index, channels, factor
};

struct Prepared {
  torch::jit::Module module;
  std::shared_ptr<Graph> graph;
  std::vector<Group> groups;
  std::vector<SizeFixup> fixups;
  std::vector<at::Tensor> probe;  // one tensor per input of forward
  c10::IValue reference;
  bool train_ok = false;
};

// A fresh clone of `module`, inlined, probed and analysed into groups (deterministic: the same
// groups every time for the same model).
Prepared Prepare(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
                 const InputShapes& more);

// Score of each channel of a group: norm of the producing filters, or |gamma| of its norms.
at::Tensor Scores(const torch::jit::Module& root, const Group& g, const std::string& criterion,
                  bool& fell_back);

// The kept count: whole granules of a grouped convolution, a multiple of a group norm's
// groups, and else a multiple of `round_to` where the group is wide enough.
int64_t RoundKept(int64_t size, double keep, int round_to, int64_t granule, int64_t multiple);

std::vector<ChannelGroup> Describe(const std::vector<Group>& groups, const std::vector<int64_t>& kept);

// Kept counts per group (the group's size where nothing is cut) and channel scores.
// `notes` (when given) gets GroupAmounts' summary of spec.amounts.
std::vector<int64_t> KeptCounts(const Prepared& p, const ChannelPruneSpec& spec, bool& fell_back,
                                std::vector<std::string>* notes = nullptr);

// The amount each group loses: spec.amounts' longest pattern that matches one of the group's
// producing layers, else spec.amount. BAD_RECIPE for a pattern that matches no prunable group.
// `notes` (when given) gets which pattern took how many groups.
std::vector<double> GroupAmounts(const Prepared& p, const ChannelPruneSpec& spec,
                                 std::vector<std::string>* notes = nullptr);

// A copy of `p` with a module and graph of its own (a deep clone, the analysis' node pointers
// moved to the copy's graph), so that Apply may cut the copy and leave `p` as it was: one
// analysis serves many cuts (the MACs-budget search).
Prepared Copy(const Prepared& p);

// Cuts every group to its kept count in `p` and rewrites the graph; returns "" or what broke.
std::string Apply(Prepared& p, const std::vector<int64_t>& kept, const std::string& criterion);

}  // namespace pare::engine::channels
