// The original model's latency, kept between jobs. Timing a model is most of what measuring it
// costs (a share of the job's budget, warm-up included); a model submitted again on the same
// host with the same settings is not timed again. The key holds everything the figures depend
// on: the model file's digest, the host (CPU, vector extensions, threads, BLAS), the device, the
// input shapes, the batch sizes and the job's budget (as set, not the original's share of it,
// which changes with the recipe's length), and the timing method's version. One small JSON
// file per key; a missing, unreadable or foreign file is a miss, and a failed write only costs
// the next job a measurement.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "worker/engine/report.h"

namespace pare::engine {

class LatencyCache {
 public:
  // `dir` empty or `model_digest` empty: a cache that never finds and never stores.
  LatencyCache(const std::string& dir, const std::string& model_digest, const HostInfo& host,
               const std::string& device, const std::vector<std::vector<int64_t>>& shapes,
               const std::vector<int>& batches, double budget_seconds);

  bool enabled() const { return !path_.empty(); }
  // The latency stored under this key, with when it was measured (UTC, ISO 8601).
  struct Entry {
    std::vector<Latency> latency;
    std::string measured_at;
  };
  std::optional<Entry> Find() const;
  // Best effort: written to a temporary file and renamed, so readers never see half of one.
  void Store(const std::vector<Latency>& latency) const;

 private:
  std::string key_;
  std::string path_;
};

}  // namespace pare::engine
