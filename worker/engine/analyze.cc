#include "worker/engine/analyze.h"

#include <torch/csrc/autograd/profiler_legacy.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>

#include "worker/engine/channel_prune.h"
#include "worker/engine/error.h"
#include "worker/engine/graph_edit.h"
#include "worker/engine/measure.h"
#include "worker/engine/quantize.h"
#include "worker/engine/score.h"

namespace pare::engine {
namespace {

namespace profiler = torch::autograd::profiler;

// Each layer's share of one forward's time: the forward of an inlined clone runs under LibTorch's
// profiler, and the k-th top-level event of an op kind is the k-th node of that kind (the graph
// runs its nodes in order). Empty when the events do not line up with the nodes (control flow).
std::map<std::string, double> LatencyShares(const torch::jit::Module& model,
                                            const std::vector<LayerNode>& layers,
                                            const std::vector<c10::IValue>& args) {
  torch::jit::Module flat = model.clone();
  flat.eval();
  InlineForward(flat);
  std::set<std::string> kinds;
  for (const auto& l : layers) kinds.insert(l.op);
  c10::InferenceMode guard;
  for (int i = 0; i < 3; ++i) flat.forward(args);    // warm-up: the executor's first runs profile
  std::map<std::string, std::vector<double>> times;  // op kind -> durations of its top-level events, in order
  double total = 0;
  constexpr int kRuns = 3;
  for (int run = 0; run < kRuns; ++run) {
    profiler::enableProfilerLegacy(
        torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::CPU));
    const auto start = std::chrono::steady_clock::now();
    flat.forward(args);
    total += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    auto lists = profiler::disableProfilerLegacy();
    std::map<std::string, size_t> seen;
    for (const auto& events : lists) {
      std::vector<std::pair<const profiler::LegacyEvent*, bool>> stack;  // push event, counted
      int depth = 0;                                                     // open layer events
      for (const auto& e : events) {
        if (e.kind() == profiler::EventKind::PushRange) {
          const bool layer = kinds.count(e.name()) > 0;
          const bool counted = layer && depth == 0;
          if (layer) ++depth;
          stack.emplace_back(&e, counted);
        } else if (e.kind() == profiler::EventKind::PopRange && !stack.empty()) {
          auto [push, counted] = stack.back();
          stack.pop_back();
          if (kinds.count(push->name())) --depth;
          if (!counted) continue;
          auto& v = times[push->name()];
          const size_t k = seen[push->name()]++;
          if (v.size() <= k) v.resize(k + 1, 0.0);
          v[k] += push->cpuElapsedUs(e);
        }
      }
    }
  }
  std::map<std::string, size_t> next;
  std::map<std::string, double> shares;
  for (const auto& l : layers) {
    const size_t k = next[l.op]++;
    auto it = times.find(l.op);
    if (it == times.end() || it->second.size() <= k) return {};
    shares[l.layer] += it->second[k] / total;
  }
  for (const auto& [op, v] : times) {
    if (v.size() != next[op]) return {};  // more events than nodes: they do not line up
  }
  return shares;
}

// The accuracy with only `layer` in static INT8 (every other conv and linear layer excluded).
std::optional<double> Int8Alone(const torch::jit::Module& model, const std::string& layer,
                                const std::set<std::string>& all_layers, const AnalyzeContext& ctx,
                                const Scorer& scorer, std::string& failure) {
  StaticQuantSpec spec;
  spec.observer = "MINMAX";
  spec.calibration_batches = static_cast<int>(ctx.calibration.size());
  for (const auto& other : all_layers) {
    if (other != layer) spec.exclude.push_back(other);
  }
  try {
    std::vector<std::string> notes;
    torch::jit::Module q = QuantizeStatic(model, spec, ctx.calibration, &notes, ctx.calibration_more);
    return scorer.Score(q);
  } catch (const EngineError& e) {
    if (failure.empty()) failure = e.what();
    return std::nullopt;
  }
}

// The table's first note: how many layers, what accuracy means here, how the columns were made.
std::string SummaryNote(const AnalyzeResult& result, size_t total_layers, const AnalyzeSpec& spec,
                        const AnalyzeContext& ctx, bool pruned) {
  return "sensitivity of " + std::to_string(result.rows.size()) + " layer(s)" +
         (total_layers > result.rows.size() ? " (the first " + std::to_string(result.rows.size()) + " of " +
                                                  std::to_string(total_layers) + ")"
                                            : "") +
         "; accuracy is the " + result.metric +
         " (the model itself: " + std::to_string(result.baseline).substr(0, 6) + ")" +
         (spec.quantize && !ctx.calibration.empty()
              ? "; INT8 columns calibrated with MINMAX on " + std::to_string(ctx.calibration.size()) +
                    " batch(es)"
              : "") +
         (pruned ? "; pruned columns keep channels rounded to multiples of " + std::to_string(spec.round_to) +
                       " as prune.channel does (roundTo)"
                 : "") +
         "; the model is unchanged";
}

// The accuracy with only `layer`'s channel group pruned, at each of spec.prune_amounts.
std::vector<std::pair<double, double>> PrunedAlone(const ChannelPruner& pruner, const std::string& layer,
                                                   const AnalyzeSpec& spec, const Scorer& scorer,
                                                   std::vector<std::string>& notes) {
  std::vector<std::pair<double, double>> out;
  for (double amount : spec.prune_amounts) {
    ChannelPruneSpec p;
    p.amount = 0;
    p.round_to = spec.round_to;
    p.amounts = {{layer, amount}};
    try {
      ChannelPruneResult r = pruner.Prune(p);
      r.module.eval();
      out.emplace_back(amount, scorer.Score(r.module));
    } catch (const EngineError& e) {
      notes.push_back("pruning " + layer + " by " + std::to_string(amount).substr(0, 4) +
                      " failed: " + e.what());
      break;
    }
  }
  return out;
}

}  // namespace

AnalyzeResult Analyze(const torch::jit::Module& input, const AnalyzeSpec& spec, const AnalyzeContext& ctx) {
  torch::jit::Module model = input.clone();
  model.eval();
  model.to(c10::kCPU);
  const std::vector<LayerNode> nodes = LayersInOrder(model);
  if (nodes.empty()) {
    throw EngineError(Code::kInvalidArgument, "ANALYZE",
                      "analyze: the model has no conv or linear layer on a weight");
  }
  AnalyzeResult result;
  std::vector<std::string> order;  // layers in first-execution order
  std::map<std::string, std::string> op_of;
  for (const auto& n : nodes) {
    if (op_of.emplace(n.layer, n.op).second) order.push_back(n.layer);
  }
  const size_t total_layers = order.size();
  if (order.size() > static_cast<size_t>(spec.max_layers)) order.resize(static_cast<size_t>(spec.max_layers));
  std::set<std::string> every_layer;
  for (const auto& [layer, op] : op_of) every_layer.insert(layer);

  Scorer scorer(model, ctx.eval, ctx.samples, ctx.more_samples);
  result.metric = scorer.metric();
  result.baseline = scorer.Score(model);
  std::vector<c10::IValue> args = ForwardArgs(ctx.samples.slice(0, 0, 1), [&] {
    std::vector<at::Tensor> more;
    for (const at::Tensor& t : ctx.more_samples) more.push_back(t.slice(0, 0, 1));
    return more;
  }());
  const auto shares = LatencyShares(model, nodes, args);
  if (shares.empty()) {
    result.notes.push_back("no latency shares: the profiled ops did not line up with the graph's layers");
  }
  std::map<std::string, std::string> group_of;  // producing layer -> its group's name
  std::unique_ptr<ChannelPruner> pruner;
  if (spec.prune) {
    try {
      pruner = std::make_unique<ChannelPruner>(model, ctx.input_shape, ctx.more_shapes);
      for (const auto& g : pruner->Groups()) {
        if (g.prunable && g.channels >= 2) group_of[g.name] = g.name;
      }
    } catch (const EngineError& e) {
      result.notes.push_back(std::string("no pruning columns: ") + e.what());
    }
  }
  std::string int8_failure;
  const double steps = double(order.size());
  for (size_t i = 0; i < order.size(); ++i) {
    const std::string& layer = order[i];
    if (ctx.progress)
      ctx.progress(double(i) / steps,
                   "layer " + std::to_string(i + 1) + "/" + std::to_string(order.size()) + ": " + layer);
    LayerSensitivity row{layer, op_of[layer], std::nullopt, std::nullopt, "", {}};
    if (auto it = shares.find(layer); it != shares.end()) row.latency_share = it->second;
    if (spec.quantize && !ctx.calibration.empty())
      row.int8 = Int8Alone(model, layer, every_layer, ctx, scorer, int8_failure);
    if (pruner && group_of.count(layer)) {
      row.group = layer;
      row.pruned = PrunedAlone(*pruner, layer, spec, scorer, result.notes);
    }
    result.rows.push_back(std::move(row));
  }
  result.notes.insert(result.notes.begin(), SummaryNote(result, total_layers, spec, ctx, pruner != nullptr));
  if (!int8_failure.empty()) result.notes.push_back("INT8 of some layers alone failed: " + int8_failure);
  if (spec.quantize && ctx.calibration.empty())
    result.notes.push_back("no INT8 column: no calibration inputs");
  return result;
}

nlohmann::json ToJson(const AnalyzeResult& r) {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& l : r.rows) {
    nlohmann::json j{{"layer", l.layer}, {"op", l.op}};
    if (!l.group.empty()) j["group"] = l.group;
    if (l.latency_share) j["latency_share"] = *l.latency_share;
    if (l.int8) j["int8"] = *l.int8;
    for (const auto& [amount, acc] : l.pruned) j["pruned " + std::to_string(amount).substr(0, 4)] = acc;
    rows.push_back(j);
  }
  return rows;
}

}  // namespace pare::engine
