// The Store on any SQL database: the job state machine, leases, quotas and messages written
// once here against SqlBackend; SQLite and PostgreSQL provide the transactions.
#pragma once

#include <memory>
#include <string>

#include "server/sql.h"
#include "server/store.h"

namespace pare::server {

class SqlStore final : public Store {
 public:
  // Brings the backend's schema to this server's version (each step in its own transaction,
  // under the backend's lock, so servers starting together migrate once).
  static Result<std::unique_ptr<SqlStore>> Open(std::unique_ptr<SqlBackend> db);

  Status PutModel(const ModelRecord& m, uint64_t tenant_max_bytes) override;
  using Store::PutModel;
  Result<ModelRecord> GetModel(const std::string& tenant, const std::string& id) override;
  Status PutDataset(const DatasetRecord& d, uint64_t tenant_max_bytes) override;
  using Store::PutDataset;
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
  Result<std::map<std::string, int64_t>> QueuedByDevice() override;
  Result<std::vector<std::string>> RecentModelDigests(int n) override;
  Result<TenantUsage> Usage(const std::string& tenant) override;
  void ListenForChanges(std::function<void(const std::string& job_id)> changed) override {
    db_->Listen(std::move(changed));
  }
  std::string backend() const override { return db_->dialect().name; }
  bool shared() const override { return db_->dialect().shared; }

 private:
  explicit SqlStore(std::unique_ptr<SqlBackend> db) : db_(std::move(db)) {}
  Status Migrate();

  std::unique_ptr<SqlBackend> db_;
};

// The store a server runs on: "sqlite" (the default: DATA_DIR/pare.db) or a PostgreSQL URL
// ("postgresql://user@host:5432/db?sslmode=require"; the password from `password`, else from
// PGPASSWORD or ~/.pgpass as libpq finds it, never from the URL in manifests).
// Whether `spec` names a PostgreSQL database: a postgresql:// or postgres:// URL (any case) or a
// libpq keyword/value string ("host=db dbname=pare ...").
bool IsPostgresSpec(const std::string& spec);

Result<std::unique_ptr<Store>> OpenStore(const std::string& spec, const std::string& data_dir,
                                         const std::string& password = "");

}  // namespace pare::server
