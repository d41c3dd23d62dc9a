#include "worker/engine/channel_prune.h"

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

#include "worker/engine/channel_internal.h"
#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/isolate.h"
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

using namespace channels;  // NOLINT: this file is channel pruning's front

void CheckSpec(const ChannelPruneSpec& spec) {
  if (!(spec.amount >= 0 && spec.amount < 1)) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe, "prune.channel amount must be in [0, 1)");
  }
  if (!(spec.criterion == "L1" || spec.criterion == "L2" || spec.criterion == "BN_SCALE")) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe,
                      "prune.channel criterion must be L1, L2 or BN_SCALE");
  }
  if (spec.round_to < 1 || spec.round_to > 256) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe, "prune.channel roundTo must be in [1, 256]");
  }
}

// Some group's cut broke the model in a way the analysis did not foresee (a size computed from a
// constant channel count, say). Finds the groups whose cut breaks it, one at a time (the smallest
// failing prefix of the cut groups, by bisection), leaves them intact with the error, and prunes
// the rest: `p` becomes that model and `kept` its counts. The analysis is deterministic, so every
// trial starts from a fresh Prepare with the same groups.
void CutAroundBreakingGroups(const torch::jit::Module& module, const ChannelPruneSpec& spec,
                             const std::vector<int64_t>& input_shape, const InputShapes& more, Prepared& p,
                             std::vector<int64_t>& kept, std::string error) {
  std::vector<size_t> cut;
  for (size_t i = 0; i < kept.size(); ++i) {
    if (kept[i] < p.groups[i].size) cut.push_back(i);
  }
  // A fresh model with only the groups in `with` cut.
  auto prepare_with = [&](const std::vector<size_t>& with, std::vector<int64_t>& k) {
    Prepared q = Prepare(module, input_shape, more);
    k.resize(q.groups.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = q.groups[i].size;
    for (size_t i : with) k[i] = kept[i];
    return q;
  };
  auto groups_of = [&](const std::vector<size_t>& items) {
    std::vector<size_t> out;
    for (size_t i : items) out.push_back(cut[i]);
    return out;
  };
  const Isolated found = IsolateFailures(cut.size(), error, 64, [&](const std::vector<size_t>& with) {
    std::vector<int64_t> k;
    Prepared q = prepare_with(groups_of(with), k);
    return Apply(q, k, spec.criterion);
  });
  std::map<size_t, std::string> culprits;
  for (const auto& [item, why] : found.culprits) culprits[cut[item]] = why;
  const int trials = found.trials;
  const std::vector<size_t> allowed = groups_of(found.allowed);
  std::vector<int64_t> k;
  p = prepare_with(allowed, k);
  error = Apply(p, k, spec.criterion);
  if (!error.empty()) {
    throw EngineError(
        Code::kInternal, "CHANNEL_PRUNE_BROKE",
        "channel pruning produced an inconsistent model (" + error +
            ") and leaving the groups that broke it intact did not help; this is a bug in Pare's "
            "analysis for this architecture, please report it");
  }
  for (size_t i = 0; i < p.groups.size(); ++i) {
    if (k[i] < kept[i] || (k[i] == p.groups[i].size && kept[i] < p.groups[i].size)) {
      p.groups[i].blocked = true;
      auto c = culprits.find(i);
      p.groups[i].why = c != culprits.end() ? "cutting it broke the model: " + c->second
                                            : "not tried after " + std::to_string(trials) + " trials";
    }
  }
  kept = k;
}

// "channel groups: G, pruned P; channels A -> B", then the groups left intact, named
// together by reason (reasons in order of first appearance).
std::vector<std::string> SummaryNotes(const std::vector<ChannelGroup>& groups) {
  int64_t before = 0, after = 0, pruned = 0;
  std::vector<std::pair<std::string, std::vector<std::string>>> intact;
  size_t intact_count = 0;
  for (const auto& g : groups) {
    before += g.channels;
    after += g.kept;
    if (g.kept < g.channels) ++pruned;
    if (g.prunable || g.why_intact == "it reaches the model's output") continue;
    auto same =
        std::find_if(intact.begin(), intact.end(), [&](const auto& r) { return r.first == g.why_intact; });
    if (same == intact.end()) same = intact.insert(intact.end(), {g.why_intact, {}});
    same->second.push_back(g.name);
    ++intact_count;
  }
  std::vector<std::string> notes{"channel groups: " + std::to_string(groups.size()) + ", pruned " +
                                 std::to_string(pruned) + "; channels " + std::to_string(before) + " -> " +
                                 std::to_string(after)};
  if (!intact.empty()) {
    std::string s = "left intact (" + std::to_string(intact_count) + "): ";
    for (size_t r = 0; r < intact.size() && r < 8; ++r) {
      const auto& names = intact[r].second;
      std::string who;
      for (size_t i = 0; i < names.size() && i < 4; ++i) who += (i ? ", " : "") + names[i];
      if (names.size() > 4) who += " and " + std::to_string(names.size() - 4) + " more";
      s += (r ? "; " : "") + who + " (" + intact[r].first + ")";
    }
    if (intact.size() > 8) s += "; " + std::to_string(intact.size() - 8) + " more reasons";
    notes.push_back(s);
  }
  return notes;
}

// Prunes by `spec.amount` a copy of `base`, the analysis of `module`.
ChannelPruneResult PruneAnalysed(const torch::jit::Module& module, const Prepared& base,
                                 const ChannelPruneSpec& spec, const std::vector<int64_t>& input_shape,
                                 const InputShapes& more) {
  CheckSpec(spec);
  Prepared p = Copy(base);
  bool fell_back = false;
  std::vector<std::string> amount_notes;
  std::vector<int64_t> kept = KeptCounts(p, spec, fell_back, &amount_notes);
  std::string error = Apply(p, kept, spec.criterion);
  if (!error.empty()) CutAroundBreakingGroups(module, spec, input_shape, more, p, kept, error);
  ChannelPruneResult result;
  result.module = p.module;
  result.groups = Describe(p.groups, kept);
  result.notes = SummaryNotes(result.groups);
  result.notes.insert(result.notes.end(), amount_notes.begin(), amount_notes.end());
  if (fell_back)
    result.notes.push_back("groups without batch norm were ranked by the L1 norm instead of BN_SCALE");
  if (!p.train_ok)
    result.notes.push_back("the model does not run in training mode, so only eval mode was checked");
  return result;
}

ChannelPruneResult PruneByAmount(const torch::jit::Module& module, const ChannelPruneSpec& spec,
                                 const std::vector<int64_t>& input_shape, const InputShapes& more) {
  CheckSpec(spec);
  return PruneAnalysed(module, Prepare(module, input_shape, more), spec, input_shape, more);
}

double Macs(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
            const InputShapes& more) {
  auto count = CountMacs(module, input_shape, more);
  if (!count || count->macs <= 0) {
    throw EngineError(
        Code::kInvalidArgument, kReasonBadRecipe,
        "prune.channel.targetMacs: the model's MACs cannot be counted (a quantized or frozen model, "
        "or no conv/linear ops outside control flow); give amount instead");
  }
  return count->macs;
}

std::string Fixed(double v, int digits) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(digits);
  os << v;
  return os.str();
}

}  // namespace

ChannelPruneResult ChannelPrune(const torch::jit::Module& module, const ChannelPruneSpec& spec,
                                const std::vector<int64_t>& input_shape, const InputShapes& more) {
  if (spec.target_macs == 0) return PruneByAmount(module, spec, input_shape, more);
  if (!(spec.target_macs > 0 && spec.target_macs < 1)) {
    throw EngineError(Code::kInvalidArgument, kReasonBadRecipe, "prune.channel.targetMacs must be in (0, 1)");
  }
  const double original = Macs(module, input_shape, more);
  const double want = spec.target_macs * original;
  // Removing more channels never adds MACs, up to rounding: bisect on the amount. Every candidate
  // is cut from one analysis of the model (Copy), not analysed again.
  ChannelPruneSpec s = spec;
  s.target_macs = 0;
  s.amount = 0.95;
  CheckSpec(s);
  const Prepared base = Prepare(module, input_shape, more);
  ChannelPruneResult best = PruneAnalysed(module, base, s, input_shape, more);
  double best_macs = Macs(best.module, input_shape, more);
  if (best_macs > want) {
    throw EngineError(Code::kInvalidArgument, "TARGET_UNREACHABLE",
                      "prune.channel.targetMacs " + Fixed(spec.target_macs, 3) +
                          " cannot be reached: removing 95% of every prunable group still keeps " +
                          Fixed(best_macs / original, 3) +
                          " of the MACs (the output layer and the groups left intact are not pruned)");
  }
  double lo = 0.0, hi = s.amount;
  while (hi - lo > 0.005) {
    s.amount = 0.5 * (lo + hi);
    ChannelPruneResult r = PruneAnalysed(module, base, s, input_shape, more);
    double macs = Macs(r.module, input_shape, more);
    if (macs <= want) {
      hi = s.amount;
      best = std::move(r);
      best_macs = macs;
    } else {
      lo = s.amount;
    }
  }
  best.notes.insert(best.notes.begin(), "targetMacs " + Fixed(spec.target_macs, 3) + ": amount " +
                                            Fixed(hi, 3) + (spec.global ? " (global)" : " (uniform)") +
                                            " keeps " + Fixed(best_macs / original, 3) + " of the MACs");
  return best;
}

struct ChannelPruner::State {
  torch::jit::Module module;
  std::vector<int64_t> input_shape;
  InputShapes more;
  Prepared base;
};

ChannelPruner::ChannelPruner(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
                             const InputShapes& more)
    : state_(std::make_unique<State>(State{module, input_shape, more, Prepare(module, input_shape, more)})) {}

ChannelPruner::~ChannelPruner() = default;

std::vector<ChannelGroup> ChannelPruner::Groups() const {
  std::vector<int64_t> sizes;
  for (const auto& g : state_->base.groups) sizes.push_back(g.size);
  return Describe(state_->base.groups, sizes);
}

ChannelPruneResult ChannelPruner::Prune(const ChannelPruneSpec& spec) const {
  if (spec.target_macs != 0) {
    throw EngineError(Code::kInternal, "CHANNEL_PRUNE",
                      "ChannelPruner::Prune takes an amount, not targetMacs");
  }
  return PruneAnalysed(state_->module, state_->base, spec, state_->input_shape, state_->more);
}

}  // namespace pare::engine
