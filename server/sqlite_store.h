// The embedded Store: one SQLite file in WAL mode with synchronous=FULL, so every
// acknowledged write survives kill -9 and power loss; schema versioned in schema_version.
#pragma once

#include <memory>
#include <mutex>
#include <string>

#include "server/store.h"

struct sqlite3;

namespace pare::server {

class SqliteStore final : public Store {
 public:
  static Result<std::unique_ptr<SqliteStore>> Open(const std::string& path);
  ~SqliteStore() override;

  Status PutModel(const ModelRecord& m) override;
  Result<ModelRecord> GetModel(const std::string& tenant, const std::string& id) override;
  Status PutDataset(const DatasetRecord& d) override;
  Result<DatasetRecord> GetDataset(const std::string& tenant, const std::string& id) override;
  Result<std::pair<JobRecord, bool>> CreateJob(const JobRecord& job, const QueueLimits& limits) override;
  using Store::CreateJob;
  Result<JobRecord> GetJob(const std::string& tenant, const std::string& id) override;
  Result<std::vector<JobRecord>> ListJobs(const std::string& tenant, int64_t after_seq, int limit) override;
  Result<std::optional<JobRecord>> LeaseJob(const std::string& worker, bool has_cuda,
                                            const std::string& lease_id, int64_t now_ms,
                                            int64_t ttl_ms) override;
  Result<JobRecord> Heartbeat(const std::string& job_id, const std::string& lease_id,
                              const std::string& progress_pb, int64_t now_ms, int64_t ttl_ms,
                              const std::string& checkpoint = "") override;
  Result<JobRecord> CompleteJob(const std::string& job_id, const std::string& lease_id,
                                const JobOutcome& outcome, int64_t now_ms) override;
  Result<JobRecord> CancelJob(const std::string& tenant, const std::string& id, int64_t now_ms) override;
  Result<std::vector<JobRecord>> ExpireLeases(int64_t now_ms) override;
  Result<std::map<JobState, int64_t>> CountJobs() override;
  Result<TenantUsage> Usage(const std::string& tenant) override;

 private:
  explicit SqliteStore(sqlite3* db) : db_(db) {}
  Status Migrate();
  Status Exec(const std::string& sql);
  Result<JobRecord> GetJobLocked(const std::string& tenant, const std::string& id);
  Result<JobRecord> CheckLeaseLocked(const std::string& job_id, const std::string& lease_id);

  std::mutex mu_;  // guards db_: one connection, used by one thread at a time
  sqlite3* db_;
};

}  // namespace pare::server
