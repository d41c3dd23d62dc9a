#include "worker/engine/report.h"

#include "worker/engine/cpu_features.h"

#include <cstdio>

namespace pare::engine {

std::vector<std::string> SlowdownNotes(const ModelStats& before, const ModelStats& after, double tolerance) {
  std::vector<std::string> notes;
  for (const auto& a : after.latency) {
    for (const auto& b : before.latency) {
      if (b.batch != a.batch || b.p50_ms <= 0 || a.p50_ms <= b.p50_ms * (1.0 + tolerance)) continue;
      char line[200];
      std::snprintf(line, sizeof line,
                    "WARNING: slower at batch %d than before this step: p50 %.3f -> %.3f ms (%.2fx)", a.batch,
                    b.p50_ms, a.p50_ms, a.p50_ms / b.p50_ms);
      notes.push_back(line);
    }
  }
  return notes;
}

std::vector<std::string> UnsteadyTimingNotes(const ModelStats& stats) {
  std::vector<std::string> notes;
  for (const auto& l : stats.latency) {
    if (l.p50_ms <= 0 || l.p95_ms <= 2 * l.p50_ms) continue;
    char line[300];
    std::snprintf(
        line, sizeof line,
        "timing unsteady at batch %d: p95 %.3f ms is %.1fx the p50 over %d runs (other work on these "
        "cores, or too few runs): speed-ups against it may be far off",
        l.batch, l.p95_ms, l.p95_ms / l.p50_ms, l.iterations);
    notes.push_back(line);
  }
  return notes;
}

std::string Int8GainNote(const ModelStats& before, const ModelStats& after, const CpuFeatures& cpu) {
  std::string gain = "little";
  for (const auto& a : after.latency) {
    for (const auto& b : before.latency) {
      if (a.batch != 1 || b.batch != 1 || a.p50_ms <= 0 || b.p50_ms <= 0) continue;
      char x[32];
      std::snprintf(x, sizeof x, "%.2fx", b.p50_ms / a.p50_ms);
      gain = x;
    }
  }
  return "INT8 gains " + gain + " at batch 1 on this CPU (" + (cpu.model.empty() ? "unknown" : cpu.model) +
         ": " + cpu.Extensions() +
         "; no AVX-512 VNNI or AMX, so int8 products are summed in 16 bits): channel pruning " +
         "is the lever here";
}

nlohmann::json ToJson(const ModelStats& s) {
  nlohmann::json j;
  j["size_bytes"] = s.size_bytes;
  j["deflated_bytes"] = s.deflated_bytes;
  j["parameters"] = s.parameters;
  j["nonzero_parameters"] = s.nonzero_parameters;
  j["sparsity"] = s.parameters ? 1.0 - double(s.nonzero_parameters) / double(s.parameters) : 0.0;
  nlohmann::json lat = nlohmann::json::array();
  for (const auto& l : s.latency) {
    lat.push_back(
        {{"batch", l.batch}, {"p50_ms", l.p50_ms}, {"p95_ms", l.p95_ms}, {"iterations", l.iterations}});
  }
  j["latency"] = lat;
  j["macs"] = s.macs ? nlohmann::json(*s.macs) : nlohmann::json();
  j["top1_accuracy"] = s.top1_accuracy ? nlohmann::json(*s.top1_accuracy) : nlohmann::json();
  j["top5_accuracy"] = s.top5_accuracy ? nlohmann::json(*s.top5_accuracy) : nlohmann::json();
  j["top1_agreement"] = s.top1_agreement;
  j["output_cosine"] = s.output_cosine;
  j["output_centred_cosine"] = s.output_centred_cosine;
  if (!s.outputs.empty()) {
    nlohmann::json outs = nlohmann::json::array();
    for (const auto& o : s.outputs) {
      outs.push_back({{"name", o.name}, {"cosine", o.cosine}, {"centred_cosine", o.centred_cosine}});
    }
    j["outputs"] = outs;
  }
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& l : s.layers) {
    layers.push_back({{"name", l.name},
                      {"parameters", l.parameters},
                      {"zeros", l.zeros},
                      {"sparsity", l.parameters ? double(l.zeros) / double(l.parameters) : 0.0}});
  }
  j["layers"] = layers;
  return j;
}

nlohmann::json ToJson(const Report& r) {
  nlohmann::json j;
  j["device"] = r.device;
  j["host"] = {
      {"cpu", r.host.cpu},         {"extensions", r.host.extensions},   {"fast_int8", r.host.fast_int8},
      {"threads", r.host.threads}, {"threads_why", r.host.threads_why}, {"blas", r.host.blas}};
  j["input_shape"] = r.input_shape;
  if (!r.more_input_shapes.empty()) j["more_input_shapes"] = r.more_input_shapes;
  nlohmann::json steps = nlohmann::json::array();
  for (const auto& s : r.steps) {
    steps.push_back({{"step", s.step},
                     {"stats", ToJson(s.stats)},
                     {"wall_seconds", s.wall_seconds},
                     {"check_seconds", s.check_seconds},
                     {"notes", s.notes}});
    if (!s.sensitivity.is_null()) {
      steps.back()["sensitivity"] = s.sensitivity;
      j["sensitivity"] = s.sensitivity;  // the last analysis, where the HTML report looks
    }
  }
  j["steps"] = steps;
  if (!r.search.is_null()) {
    j["search"] = r.search;
    j["trials"] = r.search.value("trials", nlohmann::json::array());  // where the HTML report looks
  }
  if (r.failure) {
    j["failure"] = {
        {"code", r.failure->code}, {"reason", r.failure->reason}, {"message", r.failure->message}};
  }
  return j;
}

}  // namespace pare::engine
