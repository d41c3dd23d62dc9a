#include "server/metrics.h"

#include <set>

#include "pare/v1/compression.pb.h"
#include "worker/engine/error.h"
#include "worker/recipe_convert.h"

namespace pare::server {
namespace {

using prometheus::Histogram;

const std::vector<std::string> kCodes = {"OK",
                                         "CANCELLED",
                                         "INVALID_ARGUMENT",
                                         "NOT_FOUND",
                                         "ALREADY_EXISTS",
                                         "RESOURCE_EXHAUSTED",
                                         "FAILED_PRECONDITION",
                                         "UNAUTHENTICATED",
                                         "PERMISSION_DENIED",
                                         "UNAVAILABLE",
                                         "DEADLINE_EXCEEDED",
                                         "INTERNAL"};
const std::vector<std::string> kFailureClasses = {"bad_input", "needs_gpu",        "worker_lost",
                                                  "cancelled", "goal_unreachable", "internal"};
const std::vector<std::string> kFirstSteps = {"prune",    "quantize", "distill", "factorize",
                                              "finetune", "optimize", "analyze", "auto"};
const std::vector<std::string> kStepKinds = {
    "prune.magnitude", "prune.channel", "prune.nm", "quantize.dynamic", "quantize.static",
    "quantize.fp16",   "quantize.bf16", "distill",  "factorize",        "finetune",
    "optimize",        "analyze",       "auto"};
const std::vector<std::string> kDevices = {"cpu", "cuda"};
const std::vector<JobState> kStates = {JobState::kQueued, JobState::kRunning, JobState::kSucceeded,
                                       JobState::kFailed, JobState::kCancelled};

Histogram::BucketBoundaries Seconds() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
}

Histogram::BucketBoundaries Ratios() { return {1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64}; }

std::string Lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

std::string FailureClass(const std::string& reason) {
  static const std::set<std::string> bad_input = {
      "MODEL_LOAD",   "MODEL_FORMAT",    "MODEL_RUN",         "MODEL_OUTPUT",     "BAD_DATASET",
      "BAD_RECIPE",   "BAD_INPUT_SHAPE", "NO_TRAIN_DATA",     "NO_CALIBRATION",   "SHAPE_MISMATCH",
      "OUTPUT_SHAPE", "NOT_TRAINABLE",   "UNSUPPORTED_MODEL", "NOTHING_TO_PRUNE", "INPUT_MISSING",
      "BAD_DEVICE",   "CHANNEL_PRUNE",   "FACTORIZE",         "NO_EVAL_DATA"};
  if (bad_input.count(reason)) return "bad_input";
  if (reason == "NO_CUDA" || reason == "NEEDS_CUDA") return "needs_gpu";
  if (reason == "LEASE_EXPIRED" || reason == "WORKER_CRASH" || reason == "WORKER_LOST") return "worker_lost";
  if (reason == "CANCELLED") return "cancelled";
  if (reason == engine::kReasonGoalUnreachable) return "goal_unreachable";
  return "internal";
}

Metrics::Metrics(const std::vector<std::string>& methods, const std::string& version,
                 const std::string& libtorch_version)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("pare_grpc_requests_total")
                    .Help("gRPC calls handled, by full method name and status code")
                    .Register(*registry_)),
      request_seconds_(prometheus::BuildHistogram()
                           .Name("pare_grpc_request_duration_seconds")
                           .Help("Time from a call's start to its status, by method (streams included)")
                           .Register(*registry_)),
      in_flight_(prometheus::BuildGauge()
                     .Name("pare_grpc_in_flight")
                     .Help("gRPC calls and streams open now")
                     .Register(*registry_)
                     .Add({})),
      upload_bytes_(prometheus::BuildCounter()
                        .Name("pare_upload_bytes_total")
                        .Help("Bytes stored from completed uploads, by kind (model, dataset, result)")
                        .Register(*registry_)),
      download_bytes_(prometheus::BuildCounter()
                          .Name("pare_download_bytes_total")
                          .Help("Bytes sent to clients (results and reports) and workers (inputs)")
                          .Register(*registry_)),
      upload_seconds_(prometheus::BuildHistogram()
                          .Name("pare_upload_duration_seconds")
                          .Help("Duration of completed uploads, by kind")
                          .Register(*registry_)),
      jobs_(prometheus::BuildGauge()
                .Name("pare_jobs")
                .Help("Jobs in the store, by state")
                .Register(*registry_)),
      queue_wait_(prometheus::BuildHistogram()
                      .Name("pare_queue_wait_seconds")
                      .Help("Time a job waited from submission to its first lease")
                      .Register(*registry_)
                      .Add({}, Seconds())),
      lease_expiries_(prometheus::BuildCounter()
                          .Name("pare_lease_expiries_total")
                          .Help("Leases that ran out without a heartbeat (worker lost)")
                          .Register(*registry_)
                          .Add({})),
      retries_(prometheus::BuildCounter()
                   .Name("pare_job_retries_total")
                   .Help("Jobs put back in the queue after a lost lease, for another attempt")
                   .Register(*registry_)
                   .Add({})),
      submitted_(prometheus::BuildCounter()
                     .Name("pare_jobs_submitted_total")
                     .Help("Jobs created (an idempotent resubmission is not counted)")
                     .Register(*registry_)
                     .Add({})),
      succeeded_(prometheus::BuildCounter()
                     .Name("pare_jobs_succeeded_total")
                     .Help("Jobs that ended SUCCEEDED")
                     .Register(*registry_)
                     .Add({})),
      failed_(prometheus::BuildCounter()
                  .Name("pare_jobs_failed_total")
                  .Help("Jobs that ended FAILED, by reason class: bad_input, needs_gpu, worker_lost, "
                        "goal_unreachable, internal")
                  .Register(*registry_)),
      cancelled_(prometheus::BuildCounter()
                     .Name("pare_jobs_cancelled_total")
                     .Help("Jobs that ended CANCELLED")
                     .Register(*registry_)
                     .Add({})),
      job_seconds_(prometheus::BuildHistogram()
                       .Name("pare_job_duration_seconds")
                       .Help("Run time of ended jobs (first lease to end), by the recipe's first step kind")
                       .Register(*registry_)),
      step_seconds_(prometheus::BuildHistogram()
                        .Name("pare_step_duration_seconds")
                        .Help("Wall time of recipe steps in succeeded jobs, by step kind and device kind")
                        .Register(*registry_)),
      compression_ratio_(prometheus::BuildHistogram()
                             .Name("pare_result_compression_ratio")
                             .Help("Original deflated size / result deflated size, per succeeded job")
                             .Register(*registry_)
                             .Add({}, Ratios())),
      speedup_(prometheus::BuildHistogram()
                   .Name("pare_result_speedup_ratio")
                   .Help("Original p50 latency / result p50 latency at batch 1, per succeeded job")
                   .Register(*registry_)
                   .Add({}, Ratios())),
      workers_connected_(prometheus::BuildGauge()
                             .Name("pare_workers_connected")
                             .Help("Workers seen in the last lease period, by device kind")
                             .Register(*registry_)),
      jobs_queued_(prometheus::BuildGauge()
                       .Name("pare_jobs_queued")
                       .Help("Queued jobs by the device they asked for (cpu, cuda, auto): what worker "
                             "autoscaling follows")
                       .Register(*registry_)),
      workers_busy_(prometheus::BuildGauge()
                        .Name("pare_workers_busy")
                        .Help("Workers holding a lease, by device kind")
                        .Register(*registry_)),
      restarts_(prometheus::BuildCounter()
                    .Name("pare_local_worker_restarts_total")
                    .Help("Local worker processes restarted by the supervisor after they exited")
                    .Register(*registry_)
                    .Add({})),
      blob_count_(prometheus::BuildGauge()
                      .Name("pare_blobs")
                      .Help("Stored blobs (models, datasets, results, reports)")
                      .Register(*registry_)
                      .Add({})),
      blob_bytes_(prometheus::BuildGauge()
                      .Name("pare_blob_bytes")
                      .Help("Bytes of stored blobs")
                      .Register(*registry_)
                      .Add({})) {
  prometheus::BuildGauge()
      .Name("pare_build_info")
      .Help("Always 1; labels: version of Pare and of the LibTorch its workers use")
      .Register(*registry_)
      .Add({{"version", version}, {"libtorch", libtorch_version}})
      .Set(1);
  for (const auto& m : methods) {
    for (const auto& c : kCodes) requests_.Add({{"method", m}, {"code", c}});
    request_seconds_.Add({{"method", m}}, Seconds());
  }
  for (const char* kind : {"model", "dataset", "result"}) {
    upload_bytes_.Add({{"kind", kind}});
    upload_seconds_.Add({{"kind", kind}}, Seconds());
  }
  for (const char* kind : {"result", "report", "input"}) download_bytes_.Add({{"kind", kind}});
  for (JobState s : kStates) jobs_.Add({{"state", Lower(JobStateName(s))}});
  for (const auto& c : kFailureClasses) failed_.Add({{"reason", c}});
  for (const auto& f : kFirstSteps) job_seconds_.Add({{"first_step", f}}, Seconds());
  for (const auto& s : kStepKinds) {
    for (const auto& d : kDevices) step_seconds_.Add({{"step", s}, {"device", d}}, Seconds());
  }
  for (const auto& d : kDevices) {
    workers_connected_.Add({{"device", d}});
    workers_busy_.Add({{"device", d}});
  }
}

void Metrics::CallStarted() { in_flight_.Increment(); }

void Metrics::CallFinished(const std::string& method, const std::string& code, double seconds) {
  in_flight_.Decrement();
  requests_.Add({{"method", method}, {"code", code}}).Increment();
  request_seconds_.Add({{"method", method}}, Seconds()).Observe(seconds);
}

void Metrics::Uploaded(const std::string& kind, uint64_t bytes, double seconds) {
  upload_bytes_.Add({{"kind", kind}}).Increment(static_cast<double>(bytes));
  upload_seconds_.Add({{"kind", kind}}, Seconds()).Observe(seconds);
}

void Metrics::Downloaded(const std::string& kind, uint64_t bytes) {
  download_bytes_.Add({{"kind", kind}}).Increment(static_cast<double>(bytes));
}

void Metrics::JobSubmitted() { submitted_.Increment(); }

void Metrics::JobLeased(double wait) { queue_wait_.Observe(wait); }

void Metrics::LeaseExpired(bool requeued) {
  lease_expiries_.Increment();
  if (requeued) retries_.Increment();
}

void Metrics::JobEnded(const JobRecord& job, const std::string& device_kind) {
  switch (job.state) {
    case JobState::kSucceeded: succeeded_.Increment(); break;
    case JobState::kFailed: failed_.Add({{"reason", FailureClass(job.error_reason)}}).Increment(); break;
    case JobState::kCancelled: cancelled_.Increment(); break;
    default: return;  // handed back: not an end
  }
  v1::Recipe recipe;
  if (job.started_ms > 0 && job.finished_ms >= job.started_ms && recipe.ParseFromString(job.recipe_pb)) {
    const std::string first = FirstStepKind(recipe);
    if (first != "none") {
      job_seconds_.Add({{"first_step", first}}, Seconds())
          .Observe(double(job.finished_ms - job.started_ms) / 1000.0);
    }
  }
  if (job.state != JobState::kSucceeded) return;
  v1::Job holder;
  if (!holder.ParseFromString(job.reports_pb) || holder.reports_size() == 0) return;
  const std::string device = device_kind.empty() ? "cpu" : device_kind;
  for (const auto& r : holder.reports()) {
    if (r.step() == "original") continue;
    step_seconds_.Add({{"step", r.step()}, {"device", device}}, Seconds()).Observe(r.wall_seconds());
  }
  const auto& first = holder.reports(0).stats();
  const auto& last = holder.reports(holder.reports_size() - 1).stats();
  if (first.deflated_bytes() > 0 && last.deflated_bytes() > 0) {
    compression_ratio_.Observe(double(first.deflated_bytes()) / double(last.deflated_bytes()));
  }
  // latency_p50_ms is batch 1 (the report's first latency batch).
  if (first.latency_p50_ms() > 0 && last.latency_p50_ms() > 0) {
    speedup_.Observe(first.latency_p50_ms() / last.latency_p50_ms());
  }
}

void Metrics::SetJobsByState(const std::map<JobState, int64_t>& counts) {
  for (JobState s : kStates) {
    auto it = counts.find(s);
    jobs_.Add({{"state", Lower(JobStateName(s))}}).Set(it == counts.end() ? 0.0 : double(it->second));
  }
}

void Metrics::SetQueuedByDevice(const std::map<std::string, int64_t>& counts) {
  for (const char* d : {"auto", "cpu", "cuda"}) {
    auto it = counts.find(d);
    jobs_queued_.Add({{"device", d}}).Set(it == counts.end() ? 0.0 : double(it->second));
  }
}

void Metrics::SetWorkers(const std::map<std::string, std::pair<int, int>>& by_device) {
  for (const auto& d : kDevices) {
    auto it = by_device.find(d);
    workers_connected_.Add({{"device", d}}).Set(it == by_device.end() ? 0 : it->second.first);
    workers_busy_.Add({{"device", d}}).Set(it == by_device.end() ? 0 : it->second.second);
  }
}

void Metrics::SetLocalWorkerRestarts(int64_t total) {
  std::lock_guard<std::mutex> lock(mu_);
  if (double(total) > restarts_seen_) {
    restarts_.Increment(double(total) - restarts_seen_);
    restarts_seen_ = double(total);
  }
}

void Metrics::SetBlobs(uint64_t count, uint64_t bytes) {
  blob_count_.Set(double(count));
  blob_bytes_.Set(double(bytes));
}

}  // namespace pare::server
