// The service's state behind one interface: models, datasets and jobs with their state
// machine (QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED) and leases.
// SqlStore (sql_store.h) implements it once on SQLite (the embedded default) and PostgreSQL
// (several servers on one database). Errors are truthful: NOT_FOUND only for what does not
// exist; a database that cannot be reached or is busy is UNAVAILABLE, any other failure INTERNAL.
#pragma once

#include <climits>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace pare::server {

struct ModelRecord {
  std::string id;
  std::string tenant;
  std::string name;
  std::string sha256;
  uint64_t size_bytes = 0;
  std::vector<int64_t> input_shape;
  std::vector<std::vector<int64_t>> more_input_shapes;  // forward's further inputs, if any
  int64_t created_ms = 0;
};

struct DatasetRecord {
  std::string id;
  std::string tenant;
  std::string name;
  std::string sha256;
  uint64_t size_bytes = 0;
  std::string format;
  int64_t created_ms = 0;
};

enum class JobState { kQueued = 1, kRunning = 2, kSucceeded = 3, kFailed = 4, kCancelled = 5 };

inline bool IsTerminal(JobState s) {
  return s == JobState::kSucceeded || s == JobState::kFailed || s == JobState::kCancelled;
}
const char* JobStateName(JobState s);

struct JobRecord {
  int64_t seq = 0;  // insertion order, for paging
  std::string id;
  std::string tenant;
  std::string request_id;
  std::string model_id;
  std::string recipe_pb;  // serialized pare.v1.Recipe (opaque to the store)
  std::string calibration_dataset_id;
  std::string train_dataset_id;
  std::string eval_dataset_id;
  std::string device = "auto";
  int64_t timeout_seconds = 0;  // wall-clock limit of a run
  JobState state = JobState::kQueued;
  int attempts = 0;
  int max_attempts = 3;
  std::string lease_id;
  std::string worker;
  int64_t lease_expires_ms = 0;
  bool cancel_requested = false;
  std::string progress_pb;  // serialized pare.v1.Progress
  std::string checkpoint;   // what a running attempt checkpointed for the next one (JSON), or empty
  std::string reports_pb;   // serialized repeated pare.v1.StepReport (as a Job message)
  std::string error_code;
  std::string error_reason;
  std::string error_message;
  std::string result_sha256;
  uint64_t result_size_bytes = 0;
  std::string report_sha256;
  int64_t created_ms = 0;
  int64_t started_ms = 0;
  int64_t finished_ms = 0;
};

// What a worker reports when it ends its lease.
struct JobOutcome {
  JobState state = JobState::kSucceeded;  // SUCCEEDED, FAILED, CANCELLED, or QUEUED to hand the job back
  std::string error_code, error_reason, error_message;
  std::string reports_pb;
  std::string result_sha256;
  uint64_t result_size_bytes = 0;
  std::string report_sha256;
};

class Store {
 public:
  virtual ~Store() = default;

  // Inserts the record unless the tenant's models and datasets would then hold more than
  // `tenant_max_bytes` (0: no limit): RESOURCE_EXHAUSTED, checked atomically with the insert, so
  // concurrent uploads (on any server) cannot pass the quota together.
  virtual Status PutModel(const ModelRecord& m, uint64_t tenant_max_bytes) = 0;
  Status PutModel(const ModelRecord& m) { return PutModel(m, 0); }
  // `tenant` scopes the lookup: another tenant's id is NOT_FOUND.
  virtual Result<ModelRecord> GetModel(const std::string& tenant, const std::string& id) = 0;
  virtual Status PutDataset(const DatasetRecord& d, uint64_t tenant_max_bytes) = 0;
  Status PutDataset(const DatasetRecord& d) { return PutDataset(d, 0); }
  virtual Result<DatasetRecord> GetDataset(const std::string& tenant, const std::string& id) = 0;

  // Bounds checked atomically with the insert.
  struct QueueLimits {
    int64_t tenant_active_jobs = INT64_MAX;  // queued + running jobs of the job's tenant
    int64_t queued_jobs = INT64_MAX;         // queued jobs of all tenants
  };
  // Inserts the job unless (tenant, request_id) already names one; returns the stored job
  // and whether it was created now. RESOURCE_EXHAUSTED, naming the limit, when a new job
  // would exceed `limits`.
  virtual Result<std::pair<JobRecord, bool>> CreateJob(const JobRecord& job, const QueueLimits& limits) = 0;
  Result<std::pair<JobRecord, bool>> CreateJob(const JobRecord& job) { return CreateJob(job, QueueLimits{}); }
  // An empty tenant matches any (for the worker protocol).
  virtual Result<JobRecord> GetJob(const std::string& tenant, const std::string& id) = 0;
  // Jobs with seq > after_seq in insertion order, at most `limit`.
  virtual Result<std::vector<JobRecord>> ListJobs(const std::string& tenant, int64_t after_seq,
                                                  int limit) = 0;

  // Gives the oldest queued job this worker can run a new lease; nullopt when none waits.
  virtual Result<std::optional<JobRecord>> LeaseJob(const std::string& worker, bool has_cuda,
                                                    const std::string& lease_id, int64_t now_ms,
                                                    int64_t ttl_ms) = 0;
  // Extends a lease and records progress, and the checkpoint when one is given (non-empty).
  // FAILED_PRECONDITION when the lease is not current.
  virtual Result<JobRecord> Heartbeat(const std::string& job_id, const std::string& lease_id,
                                      const std::string& progress_pb, int64_t now_ms, int64_t ttl_ms,
                                      const std::string& checkpoint = "") = 0;
  // Ends a lease with the worker's outcome. FAILED_PRECONDITION when the lease is not current.
  virtual Result<JobRecord> CompleteJob(const std::string& job_id, const std::string& lease_id,
                                        const JobOutcome& outcome, int64_t now_ms) = 0;
  // QUEUED jobs end CANCELLED at once; RUNNING ones are flagged for their worker.
  virtual Result<JobRecord> CancelJob(const std::string& tenant, const std::string& id, int64_t now_ms) = 0;
  // Requeues (or fails, after max_attempts) jobs whose lease ran out; returns the jobs changed.
  virtual Result<std::vector<JobRecord>> ExpireLeases(int64_t now_ms) = 0;
  // Jobs per state, all tenants (for metrics and the global queue bound).
  virtual Result<std::map<JobState, int64_t>> CountJobs() = 0;
  // Queued jobs by the device they asked for ("cpu", "cuda", "auto"): what worker autoscaling
  // follows (pare_jobs_queued).
  virtual Result<std::map<std::string, int64_t>> QueuedByDevice() = 0;
  // The digests of the `n` most recently stored models (what a replica checks its blob folder
  // against at start).
  virtual Result<std::vector<std::string>> RecentModelDigests(int n) = 0;
  // What a tenant holds: bytes of its models and datasets, and its queued or running jobs.
  struct TenantUsage {
    uint64_t stored_bytes = 0;
    int64_t active_jobs = 0;
  };
  virtual Result<TenantUsage> Usage(const std::string& tenant) = 0;
  // Calls `changed(job_id)` for changes made through other servers on the same database (an
  // empty id: any job may have changed); changes made through this one are the caller's to
  // announce. A no-op where there is one server.
  virtual void ListenForChanges(std::function<void(const std::string& job_id)> changed) = 0;
  // "sqlite" or "postgresql" (for logs and metrics).
  virtual std::string backend() const = 0;
  // Whether several servers may run on this store (then they share the blob folder, and any
  // replica serves any call).
  virtual bool shared() const = 0;
};

}  // namespace pare::server
