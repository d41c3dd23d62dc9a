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
#include "worker/engine/macs.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

using namespace channels;  // NOLINT: this file is channel pruning's front

ChannelPruneResult PruneByAmount(const torch::jit::Module& module, const ChannelPruneSpec& spec,
                                 const std::vector<int64_t>& input_shape, const InputShapes& more) {
  if (!(spec.amount >= 0 && spec.amount < 1)) {
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE", "prune.channel amount must be in [0, 1)");
  }
  if (!(spec.criterion == "L1" || spec.criterion == "L2" || spec.criterion == "BN_SCALE")) {
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE",
                      "prune.channel criterion must be L1, L2 or BN_SCALE");
  }
  if (spec.round_to < 1 || spec.round_to > 256) {
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE", "prune.channel roundTo must be in [1, 256]");
  }
  Prepared p = Prepare(module, input_shape, more);
  bool fell_back = false;
  std::vector<int64_t> kept = KeptCounts(p, spec, fell_back);
  std::string error = Apply(p, kept, spec.criterion);
  if (!error.empty()) {
    // Some group's cut broke the model in a way the analysis did not foresee (a size computed
    // from a constant channel count, say). Find the groups whose cut breaks it, one at a time
    // (the smallest failing prefix of the cut groups, by bisection), leave them intact with
    // the error, and prune the rest. The analysis is deterministic, so every trial starts
    // from a fresh Prepare with the same groups.
    std::vector<size_t> cut;
    for (size_t i = 0; i < kept.size(); ++i) {
      if (kept[i] < p.groups[i].size) cut.push_back(i);
    }
    std::vector<size_t> allowed;
    std::map<size_t, std::string> culprits;
    int trials = 0;
    auto attempt = [&](const std::vector<size_t>& with) {
      Prepared q = Prepare(module, input_shape, more);
      std::vector<int64_t> k(q.groups.size());
      for (size_t i = 0; i < k.size(); ++i) k[i] = q.groups[i].size;
      for (size_t i : with) k[i] = kept[i];
      ++trials;
      return Apply(q, k, spec.criterion);
    };
    size_t start = 0;
    std::string last = error;
    while (start < cut.size() && trials < 64) {
      // allowed + cut[start, hi) breaks, allowed + cut[start, lo) does not.
      size_t lo = start, hi = cut.size();
      while (hi - lo > 1 && trials < 64) {
        size_t mid = (lo + hi) / 2;
        std::vector<size_t> with = allowed;
        with.insert(with.end(), cut.begin() + static_cast<long>(start), cut.begin() + static_cast<long>(mid));
        std::string e = attempt(with);
        if (e.empty())
          lo = mid;
        else {
          hi = mid;
          last = e;
        }
      }
      culprits[cut[hi - 1]] = last;
      allowed.insert(allowed.end(), cut.begin() + static_cast<long>(start),
                     cut.begin() + static_cast<long>(hi - 1));
      start = hi;
      if (start >= cut.size()) break;
      std::vector<size_t> with = allowed;
      with.insert(with.end(), cut.begin() + static_cast<long>(start), cut.end());
      last = attempt(with);
      if (last.empty()) {
        allowed = with;
        start = cut.size();
      }
    }
    p = Prepare(module, input_shape, more);
    std::vector<int64_t> k(p.groups.size());
    for (size_t i = 0; i < k.size(); ++i) k[i] = p.groups[i].size;
    for (size_t i : allowed) k[i] = kept[i];
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

  ChannelPruneResult result;
  result.module = p.module;
  result.groups = Describe(p.groups, kept);
  int64_t before = 0, after = 0, pruned = 0;
  // Groups left intact for the same reason are named together, reasons in order of first appearance.
  std::vector<std::pair<std::string, std::vector<std::string>>> intact;
  size_t intact_count = 0;
  for (const auto& g : result.groups) {
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
  result.notes.push_back("channel groups: " + std::to_string(result.groups.size()) + ", pruned " +
                         std::to_string(pruned) + "; channels " + std::to_string(before) + " -> " +
                         std::to_string(after));
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
    result.notes.push_back(s);
  }
  if (fell_back)
    result.notes.push_back("groups without batch norm were ranked by the L1 norm instead of BN_SCALE");
  if (!p.train_ok)
    result.notes.push_back("the model does not run in training mode, so only eval mode was checked");
  return result;
}

double Macs(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
            const InputShapes& more) {
  auto count = CountMacs(module, input_shape, more);
  if (!count || count->macs <= 0) {
    throw EngineError(
        Code::kInvalidArgument, "BAD_RECIPE",
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
    throw EngineError(Code::kInvalidArgument, "BAD_RECIPE", "prune.channel.targetMacs must be in (0, 1)");
  }
  const double original = Macs(module, input_shape, more);
  const double want = spec.target_macs * original;
  // Removing more channels never adds MACs, up to rounding: bisect on the amount.
  ChannelPruneSpec s = spec;
  s.target_macs = 0;
  s.amount = 0.95;
  ChannelPruneResult best = PruneByAmount(module, s, input_shape, more);
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
    ChannelPruneResult r = PruneByAmount(module, s, input_shape, more);
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

}  // namespace pare::engine
