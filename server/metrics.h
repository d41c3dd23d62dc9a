// Prometheus metrics of pare-server (prometheus-cpp, pulled from /metrics).
//
// Workers report through the server (their heartbeats and results) rather than serving
// their own endpoint: one scrape target, no listening port in the sandboxed worker
// processes, and job-level figures (step durations, compression gains) come from the reports
// the server stores anyway. Every series a dashboard panel reads exists as 0 from start-up.
// Metric names and meanings: deploy/README.md.
#pragma once

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "server/store.h"

namespace pare::server {

// Seconds from `t` to now: what the duration histograms observe.
inline double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

class Metrics {
 public:
  // `methods`: full gRPC method names ("/pare.v1.Compression/SubmitJob") pre-created as 0.
  Metrics(const std::vector<std::string>& methods, const std::string& version,
          const std::string& libtorch_version);

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // gRPC (from the server interceptor).
  void CallStarted();
  void CallFinished(const std::string& method, const std::string& code, double seconds);

  // Transfers. `kind`: model, dataset, result (a worker's upload), or the download's source.
  void Uploaded(const std::string& kind, uint64_t bytes, double seconds);
  void Downloaded(const std::string& kind, uint64_t bytes);

  // Job life cycle.
  void JobSubmitted();
  void JobLeased(double queue_wait_seconds);
  void LeaseExpired(bool requeued);
  // A job reached a terminal state (or was handed back: `state` QUEUED, not counted as an end).
  // `device_kind`: cpu or cuda, of the worker that ran it ("" when none did).
  void JobEnded(const JobRecord& job, const std::string& device_kind);

  // Gauges refreshed by the server's housekeeping loop.
  void SetJobsByState(const std::map<JobState, int64_t>& counts);
  // pare_jobs_queued{device}: queued jobs by the device they asked for (cpu, cuda, auto).
  void SetQueuedByDevice(const std::map<std::string, int64_t>& counts);
  void SetWorkers(
      const std::map<std::string, std::pair<int, int>>& by_device);  // device -> (connected, busy)
  void SetLocalWorkerRestarts(int64_t total);
  void SetBlobs(uint64_t count, uint64_t bytes);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& request_seconds_;
  prometheus::Gauge& in_flight_;
  prometheus::Family<prometheus::Counter>& upload_bytes_;
  prometheus::Family<prometheus::Counter>& download_bytes_;
  prometheus::Family<prometheus::Histogram>& upload_seconds_;
  prometheus::Family<prometheus::Gauge>& jobs_;
  prometheus::Histogram& queue_wait_;
  prometheus::Counter& lease_expiries_;
  prometheus::Counter& retries_;
  prometheus::Counter& submitted_;
  prometheus::Counter& succeeded_;
  prometheus::Family<prometheus::Counter>& failed_;
  prometheus::Counter& cancelled_;
  prometheus::Family<prometheus::Histogram>& job_seconds_;
  prometheus::Family<prometheus::Histogram>& step_seconds_;
  prometheus::Histogram& compression_ratio_;
  prometheus::Histogram& speedup_;
  prometheus::Family<prometheus::Gauge>& workers_connected_;
  prometheus::Family<prometheus::Gauge>& jobs_queued_;
  prometheus::Family<prometheus::Gauge>& workers_busy_;
  prometheus::Counter& restarts_;
  prometheus::Gauge& blob_count_;
  prometheus::Gauge& blob_bytes_;
  std::mutex mu_;
  double restarts_seen_ = 0;
};

// The reason class a failed job is counted under: a small fixed set.
std::string FailureClass(const std::string& error_reason);

}  // namespace pare::server
