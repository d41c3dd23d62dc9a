#include "worker/engine/channel_internal.h"

#include <fnmatch.h>

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

// Shapes of every tensor in a (possibly nested) output.
void OutputShapes(const c10::IValue& v, std::vector<Shape>& out) {
  if (v.isTensor())
    out.push_back(v.toTensor().sizes().vec());
  else if (v.isTuple())
    for (const auto& e : v.toTupleRef().elements()) OutputShapes(e, out);
  else if (v.isList())
    for (const auto& e : v.toListRef()) OutputShapes(e, out);
  else if (v.isGenericDict())
    for (const auto& e : v.toGenericDict()) OutputShapes(e.value(), out);
}

}  // namespace

// Score of each channel of a group: norm of the producing filters, or |gamma| of its norms.
at::Tensor Scores(const torch::jit::Module& root, const Group& g, const std::string& criterion,
                  bool& fell_back) {
  at::Tensor score = at::zeros({g.size}, at::kDouble);
  if (criterion == "BN_SCALE") {
    bool found = false;
    for (const auto& m : g.members) {
      if (m.role != Role::kNorm || m.params.size() != 4) continue;
      at::Tensor gamma = TensorAt(root, m.params[0]).detach().to(at::kCPU, at::kDouble);
      score += gamma.slice(0, m.offset, m.offset + g.size).abs();
      found = true;
    }
    if (found) return score;
    fell_back = true;
  }
  const bool l2 = criterion == "L2";
  for (const auto& m : g.members) {
    if (m.role != Role::kOut && m.role != Role::kDepthwise) continue;
    // Output channels along dim 0 (convolutions, linear layers) or 1 (transposed convolutions).
    at::Tensor w = TensorAt(root, m.params[0])
                       .detach()
                       .to(at::kCPU, at::kDouble)
                       .transpose(0, m.dim)
                       .reshape({g.size, -1});
    score += l2 ? w.pow(2).sum(1) : w.abs().sum(1);
  }
  return l2 ? score.sqrt() : score;
}

// The kept count: whole granules of a grouped convolution, a multiple of a group norm's
// groups, and else a multiple of `round_to` where the group is wide enough.
int64_t RoundKept(int64_t size, double keep, int round_to, int64_t granule, int64_t multiple) {
  const int64_t step = std::lcm(granule, multiple);
  if (step > 1) {
    int64_t unit = step;
    const int64_t rounded = std::lcm<int64_t>(round_to, step);
    if (granule == 1 && round_to > 1 && size >= 2 * rounded) unit = rounded;
    const int64_t n = std::max<int64_t>(1, static_cast<int64_t>(std::llround(keep / double(unit))));
    return std::min(size, n * unit);
  }
  int64_t k = static_cast<int64_t>(std::llround(keep));
  if (round_to > 1 && size >= 2 * round_to) {
    k = std::max<int64_t>(round_to, (k + round_to / 2) / round_to * round_to);
  }
  return std::clamp<int64_t>(k, 1, size);
}

std::vector<ChannelGroup> Describe(const std::vector<Group>& groups, const std::vector<int64_t>& kept) {
  std::vector<ChannelGroup> out;
  for (size_t i = 0; i < groups.size(); ++i) {
    const Group& g = groups[i];
    ChannelGroup d;
    d.name = g.name;
    d.channels = g.size;
    d.kept = kept.empty() ? g.size : kept[i];
    d.prunable = !g.blocked;
    d.why_intact = g.why;
    std::set<std::string> seen;
    for (const auto& m : g.members) {
      for (const auto& p : m.params) {
        std::string s = Join(p) + "[" + std::to_string(m.dim) + "]";
        if (seen.insert(s).second) d.members.push_back(s);
      }
    }
    out.push_back(std::move(d));
  }
  return out;
}

// Kept counts per group (the group's size where nothing is cut) and channel scores.
std::vector<int64_t> KeptCounts(const Prepared& p, const ChannelPruneSpec& spec, bool& fell_back,
                                std::vector<std::string>* notes) {
  std::vector<at::Tensor> scores(p.groups.size());
  std::vector<int64_t> kept(p.groups.size());
  for (size_t i = 0; i < p.groups.size(); ++i) {
    kept[i] = p.groups[i].size;
    if (p.groups[i].blocked || p.groups[i].size < 2) continue;
    scores[i] = Scores(p.module, p.groups[i], spec.criterion, fell_back);
  }
  auto round = [&](size_t i, double keep) {
    const Group& g = p.groups[i];
    return RoundKept(g.size, keep, spec.round_to, g.granule, g.multiple);
  };
  if (spec.global) {
    // One threshold over scores normalised by each group's mean; no group loses more than 90%.
    std::vector<at::Tensor> all;
    for (const auto& s : scores) {
      if (s.defined()) all.push_back(s / s.mean().clamp_min(1e-12));
    }
    if (!all.empty()) {
      at::Tensor sorted = std::get<0>(at::cat(all).sort());
      int64_t k = static_cast<int64_t>(spec.amount * double(sorted.numel()));
      double threshold = k > 0 ? sorted[k - 1].item<double>() : -1.0;
      for (size_t i = 0; i < scores.size(); ++i) {
        if (!scores[i].defined()) continue;
        at::Tensor norm = scores[i] / scores[i].mean().clamp_min(1e-12);
        double keep =
            std::max<double>((norm > threshold).sum().item<double>(), 0.1 * double(p.groups[i].size));
        kept[i] = round(i, keep);
      }
    }
  } else {
    const std::vector<double> amounts = GroupAmounts(p, spec, notes);
    for (size_t i = 0; i < scores.size(); ++i) {
      if (scores[i].defined()) kept[i] = round(i, double(p.groups[i].size) * (1.0 - amounts[i]));
    }
  }
  return kept;
}

namespace {

// The layers whose output channels a group is: its producers' paths.
std::vector<std::string> Producers(const Group& g) {
  std::vector<std::string> out;
  for (const auto& m : g.members) {
    if ((m.role == Role::kOut || m.role == Role::kDepthwise) && !m.params.empty() && m.params[0].size() > 1) {
      out.push_back(Join(Path(m.params[0].begin(), m.params[0].end() - 1)));
    }
  }
  return out;
}

bool Matches(const std::string& pattern, const std::string& layer) {
  if (layer == pattern) return true;
  if (layer.size() > pattern.size() && layer.compare(0, pattern.size(), pattern) == 0 &&
      layer[pattern.size()] == '.')
    return true;
  return pattern.find_first_of("*?[") != std::string::npos &&
         ::fnmatch(pattern.c_str(), layer.c_str(), 0) == 0;
}

}  // namespace

std::vector<double> GroupAmounts(const Prepared& p, const ChannelPruneSpec& spec,
                                 std::vector<std::string>* notes) {
  std::vector<double> out(p.groups.size(), spec.amount);
  if (spec.amounts.empty()) return out;
  std::map<std::string, int> taken;  // pattern -> prunable groups it decided
  std::set<std::string> matched;     // patterns that match a prunable group's producer
  for (const auto& [pattern, amount] : spec.amounts) taken[pattern] = 0;
  for (size_t i = 0; i < p.groups.size(); ++i) {
    const std::string* best = nullptr;
    for (const std::string& layer : Producers(p.groups[i])) {
      for (const auto& [pattern, amount] : spec.amounts) {
        if (!Matches(pattern, layer)) continue;
        if (!p.groups[i].blocked) matched.insert(pattern);
        if (!best || pattern.size() > best->size()) best = &pattern;
      }
    }
    if (!best) continue;
    out[i] = spec.amounts.at(*best);
    if (!p.groups[i].blocked) ++taken[*best];
  }
  std::string summary;
  for (const auto& [pattern, n] : taken) {
    if (!matched.count(pattern)) {
      std::string some;
      for (size_t i = 0, shown = 0; i < p.groups.size() && shown < 6; ++i) {
        if (p.groups[i].blocked) continue;
        some += (some.empty() ? "" : ", ") + p.groups[i].name;
        ++shown;
      }
      throw EngineError(
          Code::kInvalidArgument, kReasonBadRecipe,
          "prune.channel.amounts['" + pattern +
              "'] matches no prunable channel group (groups: " + (some.empty() ? "none" : some) + ", ...)");
    }
    summary += (summary.empty() ? "" : ", ") + pattern + " " +
               std::to_string(spec.amounts.at(pattern)).substr(0, 4) + " (" + std::to_string(n) + " group" +
               (n == 1 ? "" : "s") + (n == 0 ? ": a longer pattern decides the groups it matches" : "") + ")";
  }
  if (notes) {
    notes->push_back("amounts by layer: " + summary + "; the other groups " +
                     std::to_string(spec.amount).substr(0, 4));
  }
  return out;
}

Prepared Copy(const Prepared& p) {
  Prepared q = p;
  q.module = p.module.clone();
  q.graph = q.module.get_method("forward").graph();
  // The clone's forward graph is a copy of the inlined one: the same nodes in the same order.
  std::vector<Node*> from, to;
  ForEachNode(p.graph->block(), [&](Node* n) { from.push_back(n); });
  ForEachNode(q.graph->block(), [&](Node* n) { to.push_back(n); });
  if (from.size() != to.size()) {
    throw EngineError(Code::kInternal, "CHANNEL_PRUNE", "a copy of the pruned model's graph differs from it");
  }
  std::unordered_map<Node*, Node*> moved;
  for (size_t i = 0; i < from.size(); ++i) moved[from[i]] = to[i];
  auto move = [&](Node*& n) {
    if (n) n = moved.at(n);
  };
  for (auto& g : q.groups) {
    for (auto& m : g.members) move(m.conv);
  }
  for (auto& f : q.fixups) move(f.node);
  return q;
}

// `x.view(-1, 320)`: a size list of its own for each such view, with the new extent.
static void RewriteSizeConstants(Prepared& p, const std::vector<int64_t>& kept) {
  for (const auto& f : p.fixups) {
    int64_t extent = 0;
    bool changed = false;
    for (const auto& [group, channels, factor] : f.parts) {
      const int64_t k = group < 0 ? channels : kept[static_cast<size_t>(group)];
      changed |= k != channels;
      extent += k * factor;
    }
    if (!changed) continue;
    torch::jit::WithInsertPoint guard(f.node);
    Value* size = f.node->input(1);
    Value* fresh = nullptr;
    if (size->node()->kind() == prim::ListConstruct) {
      std::vector<Value*> items(size->node()->inputs().begin(), size->node()->inputs().end());
      items[1] = p.graph->insertConstant(extent);
      fresh = p.graph->insertNode(p.graph->createList(c10::IntType::get(), items))->output();
    } else {
      std::vector<int64_t> items = torch::jit::toIValue(size)->toIntVector();
      items[1] = extent;
      fresh = p.graph->insertConstant(items);
    }
    f.node->replaceInput(1, fresh);
  }
}

// What is wrong with the cut model: "" when it runs in both modes (training mode where the
// original ran in it) and returns outputs of the original's shapes.
static std::string CheckStillRuns(Prepared& p) {
  std::vector<Shape> want, got;
  OutputShapes(p.reference, want);
  try {
    torch::NoGradGuard no_grad;
    std::vector<c10::IValue> args(p.probe.begin(), p.probe.end());
    OutputShapes(p.module.forward(args), got);
    if (p.train_ok) {
      torch::jit::Module clone = p.module.clone();
      clone.train();
      clone.forward(args);
    }
  } catch (const std::exception& e) {
    std::string msg = ErrorText(e);
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return msg.substr(msg.rfind('\n') == std::string::npos ? 0 : msg.rfind('\n') + 1, 300);
  }
  if (want != got) return "the output shapes changed";
  return "";
}

// Cuts every group to its kept count (the strongest channels stay) in `p` and rewrites the
// graph constants that follow the counts. Returns what is wrong with the result ("" when it
// runs in both modes and returns what the original returned).
std::string Apply(Prepared& p, const std::vector<int64_t>& kept, const std::string& criterion) {
  // Keep masks per (tensor, dim), then one index_select each.
  struct Cut {
    Path path;
    int64_t dim;
    std::vector<bool> keep;
  };
  std::map<std::pair<std::string, int64_t>, Cut> cuts;
  // Graph constants that follow the kept count: a depthwise conv's `groups`, a layer_norm's
  // `normalized_shape` (node, input index, new value).
  std::vector<std::tuple<Node*, size_t, c10::IValue>> graph_updates;
  bool unused = false;
  for (size_t i = 0; i < p.groups.size(); ++i) {
    const Group& g = p.groups[i];
    if (kept[i] == g.size) continue;
    at::Tensor score = Scores(p.module, g, criterion, unused);
    // Whole granules (runs of `granule` channels) ranked by their summed score.
    at::Tensor order =
        std::get<1>(score.reshape({-1, g.granule}).sum(1).sort(/*dim=*/0, /*descending=*/true));
    std::vector<bool> keep(static_cast<size_t>(g.size), false);
    for (int64_t j = 0; j < kept[i] / g.granule; ++j) {
      for (int64_t c = 0; c < g.granule; ++c)
        keep[static_cast<size_t>(order[j].item<int64_t>() * g.granule + c)] = true;
    }
    for (const auto& m : g.members) {
      for (const auto& path : m.params) {
        auto key = std::make_pair(Join(path), m.dim);
        auto it = cuts.find(key);
        if (it == cuts.end()) {
          int64_t len = TensorAt(p.module, path).size(m.dim);
          it = cuts.emplace(key, Cut{path, m.dim, std::vector<bool>(static_cast<size_t>(len), true)}).first;
        }
        for (int64_t c = 0; c < g.size; ++c) {
          if (keep[static_cast<size_t>(c)]) continue;
          for (int64_t f = 0; f < m.factor; ++f)
            it->second.keep[static_cast<size_t>(m.offset + c * m.factor + f)] = false;
        }
      }
      if (m.role == Role::kDepthwise)
        graph_updates.emplace_back(m.conv, m.groups_input, kept[i] / m.per_group);
      if (m.role == Role::kLayerNorm)
        graph_updates.emplace_back(m.conv, m.groups_input, std::vector<int64_t>{kept[i]});
    }
  }
  for (auto& [key, cut] : cuts) {
    at::Tensor t = TensorAt(p.module, cut.path);
    std::vector<int64_t> idx;
    for (size_t j = 0; j < cut.keep.size(); ++j) {
      if (cut.keep[j]) idx.push_back(static_cast<int64_t>(j));
    }
    at::Tensor index = at::tensor(idx, at::TensorOptions().dtype(at::kLong)).to(t.device());
    at::Tensor smaller;
    {
      torch::NoGradGuard no_grad;
      smaller = t.index_select(cut.dim, index).clone();
    }
    smaller.set_requires_grad(t.requires_grad());
    SetTensorAt(p.module, cut.path, smaller);
  }
  for (auto& [node, input, value] : graph_updates) {
    torch::jit::WithInsertPoint guard(node);
    node->replaceInput(input, p.graph->insertConstant(value));
  }
  RewriteSizeConstants(p, kept);
  return CheckStillRuns(p);
}

}  // namespace pare::engine::channels
