#include "server/sql_store.h"

#include <cctype>
#include <regex>

#include <sstream>

#include "server/pg_backend.h"
#include "server/sqlite_backend.h"

namespace pare::server {

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kQueued: return "QUEUED";
    case JobState::kRunning: return "RUNNING";
    case JobState::kSucceeded: return "SUCCEEDED";
    case JobState::kFailed: return "FAILED";
    case JobState::kCancelled: return "CANCELLED";
  }
  return "UNKNOWN";
}

namespace {

const char* kJobColumns =
    "seq, id, tenant, COALESCE(request_id, ''), model_id, recipe, calibration_dataset_id, train_dataset_id, "
    "eval_dataset_id, device, state, attempts, max_attempts, lease_id, worker, lease_expires_ms, "
    "cancel_requested, progress, reports, error_code, error_reason, error_message, result_sha256, "
    "result_size_bytes, report_sha256, created_ms, started_ms, finished_ms, timeout_seconds, checkpoint";

int64_t State(JobState s) { return static_cast<int64_t>(s); }

std::string JoinShape(const std::vector<int64_t>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? "," : "") << v[i];
  return os.str();
}

std::vector<int64_t> SplitShape(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (!part.empty()) out.push_back(std::stoll(part));
  }
  return out;
}

// A model's input shapes in its `input_shape` column: "1,3,32,32;1,3,32,32" (the first, then
// the further inputs of a forward that takes several; rows from before hold one shape).
std::string JoinShapes(const ModelRecord& m) {
  std::string s = JoinShape(m.input_shape);
  for (const auto& more : m.more_input_shapes) s += ";" + JoinShape(more);
  return s;
}

void SplitShapes(const std::string& s, ModelRecord& m) {
  std::stringstream ss(s);
  std::string part;
  bool first = true;
  while (std::getline(ss, part, ';')) {
    if (first)
      m.input_shape = SplitShape(part);
    else
      m.more_input_shapes.push_back(SplitShape(part));
    first = false;
  }
}

JobRecord ReadJob(const SqlRow& r) {
  JobRecord j;
  size_t c = 0;
  j.seq = r.Int(c++);
  j.id = r.Text(c++);
  j.tenant = r.Text(c++);
  j.request_id = r.Text(c++);
  j.model_id = r.Text(c++);
  j.recipe_pb = r.Text(c++);
  j.calibration_dataset_id = r.Text(c++);
  j.train_dataset_id = r.Text(c++);
  j.eval_dataset_id = r.Text(c++);
  j.device = r.Text(c++);
  j.state = static_cast<JobState>(r.Int(c++));
  j.attempts = static_cast<int>(r.Int(c++));
  j.max_attempts = static_cast<int>(r.Int(c++));
  j.lease_id = r.Text(c++);
  j.worker = r.Text(c++);
  j.lease_expires_ms = r.Int(c++);
  j.cancel_requested = r.Int(c++) != 0;
  j.progress_pb = r.Text(c++);
  j.reports_pb = r.Text(c++);
  j.error_code = r.Text(c++);
  j.error_reason = r.Text(c++);
  j.error_message = r.Text(c++);
  j.result_sha256 = r.Text(c++);
  j.result_size_bytes = static_cast<uint64_t>(r.Int(c++));
  j.report_sha256 = r.Text(c++);
  j.created_ms = r.Int(c++);
  j.started_ms = r.Int(c++);
  j.finished_ms = r.Int(c++);
  j.timeout_seconds = r.Int(c++);
  j.checkpoint = r.Text(c++);
  return j;
}

// The job's row; `lock` holds it until the transaction ends (what the transaction reads is
// then what it changes, whatever another server does meanwhile).
Result<JobRecord> ReadJob(SqlTx& tx, const SqlDialect& d, const std::string& tenant, const std::string& id,
                          bool lock) {
  SqlParams params{id};
  if (!tenant.empty()) params.emplace_back(tenant);
  PARE_ASSIGN_OR_RETURN(auto rows,
                        tx.Query(std::string("SELECT ") + kJobColumns + " FROM jobs WHERE id = ?" +
                                     (tenant.empty() ? "" : " AND tenant = ?") + (lock ? d.for_update : ""),
                                 params));
  if (rows.empty()) return NotFound("job '" + id + "' does not exist");
  return ReadJob(rows.front());
}

// The job, if `lease_id` is its current lease (locked for the change that follows).
Result<JobRecord> HeldLease(SqlTx& tx, const SqlDialect& d, const std::string& job_id,
                            const std::string& lease_id) {
  PARE_ASSIGN_OR_RETURN(auto job, ReadJob(tx, d, "", job_id, /*lock=*/true));
  if (job.state != JobState::kRunning || job.lease_id != lease_id || lease_id.empty()) {
    return FailedPrecondition("the lease on job '" + job_id + "' is no longer held by this worker (job is " +
                              JobStateName(job.state) + ")");
  }
  return job;
}

// Tells the other servers (at commit) that the job changed.
Status Changed(SqlTx& tx, const SqlDialect& d, const std::string& job_id) {
  if (d.notify.empty()) return Status::Ok();
  return tx.Query(d.notify, {job_id}).status();
}

Status LockScope(SqlTx& tx, const SqlDialect& d, const std::string& scope) {
  if (d.scope_lock.empty()) return Status::Ok();
  return tx.Query(d.scope_lock, {scope}).status();
}

// The bytes a tenant's models and datasets hold.
Result<uint64_t> StoredBytes(SqlTx& tx, const std::string& tenant) {
  PARE_ASSIGN_OR_RETURN(auto rows,
                        tx.Query("SELECT (SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE "
                                 "tenant = ?) + (SELECT COALESCE(SUM(size_bytes), 0) FROM datasets "
                                 "WHERE tenant = ?)",
                                 {tenant, tenant}));
  return static_cast<uint64_t>(rows.at(0).Int(0));
}

Status CheckStorageQuota(SqlTx& tx, const SqlDialect& d, const std::string& tenant, uint64_t size,
                         uint64_t max_bytes) {
  if (max_bytes == 0) return Status::Ok();
  PARE_RETURN_IF_ERROR(LockScope(tx, d, "tenant:" + tenant));
  PARE_ASSIGN_OR_RETURN(uint64_t stored, StoredBytes(tx, tenant));
  if (stored + size > max_bytes) {
    return ResourceExhausted("tenant '" + tenant + "' stored-bytes quota: it stores " +
                             std::to_string(stored) + " of " + std::to_string(max_bytes) +
                             " bytes and this upload is " + std::to_string(size));
  }
  return Status::Ok();
}

}  // namespace

Result<std::unique_ptr<SqlStore>> SqlStore::Open(std::unique_ptr<SqlBackend> db) {
  std::unique_ptr<SqlStore> store(new SqlStore(std::move(db)));
  PARE_RETURN_IF_ERROR(store->Migrate());
  return store;
}

Status SqlStore::Migrate() {
  const SqlDialect& d = db_->dialect();
  const int64_t latest = static_cast<int64_t>(d.schema.size());
  for (int64_t version = 1; version <= latest; ++version) {
    Status s = db_->Transact([&](SqlTx& tx) -> Status {
      PARE_RETURN_IF_ERROR(LockScope(tx, d, "schema"));
      PARE_RETURN_IF_ERROR(
          tx.Exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").status());
      PARE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT COALESCE(MAX(version), 0) FROM schema_version"));
      const int64_t have = rows.at(0).Int(0);
      if (have > latest) {
        return FailedPrecondition("the database has schema version " + std::to_string(have) +
                                  ", newer than this server's " + std::to_string(latest));
      }
      if (have >= version) return Status::Ok();
      PARE_RETURN_IF_ERROR(tx.Exec(d.schema[version - 1]).status());
      return tx.Exec("INSERT INTO schema_version (version) VALUES (?)", {version}).status();
    });
    PARE_RETURN_IF_ERROR(s);
  }
  return Status::Ok();
}

Status SqlStore::PutModel(const ModelRecord& m, uint64_t tenant_max_bytes) {
  return db_->Transact([&](SqlTx& tx) -> Status {
    PARE_RETURN_IF_ERROR(CheckStorageQuota(tx, db_->dialect(), m.tenant, m.size_bytes, tenant_max_bytes));
    return tx
        .Exec(
            "INSERT INTO models (id, tenant, name, sha256, size_bytes, input_shape, created_ms) VALUES "
            "(?,?,?,?,?,?,?)",
            {m.id, m.tenant, m.name, m.sha256, static_cast<int64_t>(m.size_bytes), JoinShapes(m),
             m.created_ms})
        .status();
  });
}

Result<ModelRecord> SqlStore::GetModel(const std::string& tenant, const std::string& id) {
  return InTransaction<ModelRecord>(
      *db_,
      [&](SqlTx& tx) -> Result<ModelRecord> {
        PARE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT id, tenant, name, sha256, size_bytes, input_shape, "
                                                  "created_ms FROM models WHERE id = ? AND tenant = ?",
                                                  {id, tenant}));
        if (rows.empty()) return NotFound("model '" + id + "' does not exist");
        const SqlRow& r = rows.front();
        ModelRecord m{r.Text(0), r.Text(1), r.Text(2), r.Text(3), static_cast<uint64_t>(r.Int(4)),
                      {},        {},        r.Int(6)};
        SplitShapes(r.Text(5), m);
        return m;
      },
      Access::kRead);
}

Status SqlStore::PutDataset(const DatasetRecord& d, uint64_t tenant_max_bytes) {
  return db_->Transact([&](SqlTx& tx) -> Status {
    PARE_RETURN_IF_ERROR(CheckStorageQuota(tx, db_->dialect(), d.tenant, d.size_bytes, tenant_max_bytes));
    return tx
        .Exec(
            "INSERT INTO datasets (id, tenant, name, sha256, size_bytes, format, created_ms) VALUES "
            "(?,?,?,?,?,?,?)",
            {d.id, d.tenant, d.name, d.sha256, static_cast<int64_t>(d.size_bytes), d.format, d.created_ms})
        .status();
  });
}

Result<DatasetRecord> SqlStore::GetDataset(const std::string& tenant, const std::string& id) {
  return InTransaction<DatasetRecord>(
      *db_,
      [&](SqlTx& tx) -> Result<DatasetRecord> {
        PARE_ASSIGN_OR_RETURN(auto rows,
                              tx.Query("SELECT id, tenant, name, sha256, size_bytes, format, created_ms "
                                       "FROM datasets WHERE id = ? AND tenant = ?",
                                       {id, tenant}));
        if (rows.empty()) return NotFound("dataset '" + id + "' does not exist");
        const SqlRow& r = rows.front();
        return DatasetRecord{r.Text(0), r.Text(1), r.Text(2), r.Text(3), static_cast<uint64_t>(r.Int(4)),
                             r.Text(5), r.Int(6)};
      },
      Access::kRead);
}

Result<std::pair<JobRecord, bool>> SqlStore::CreateJob(const JobRecord& j, const QueueLimits& limits) {
  const SqlDialect& d = db_->dialect();
  using Created = std::pair<JobRecord, bool>;
  return InTransaction<Created>(*db_, [&](SqlTx& tx) -> Result<Created> {
    // One creation at a time across servers: the bounds below and the submit's idempotence hold
    // for all of them, and jobs' seq follows the order in which they became visible (ListJobs
    // pages by it).
    PARE_RETURN_IF_ERROR(LockScope(tx, d, "jobs"));
    if (!j.request_id.empty()) {
      PARE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT id FROM jobs WHERE tenant = ? AND request_id = ?",
                                                {j.tenant, j.request_id}));
      if (!rows.empty()) {
        PARE_ASSIGN_OR_RETURN(auto existing, ReadJob(tx, d, j.tenant, rows.front().Text(0), false));
        // A retry is the same request; the same key for another job is a client's mistake, not
        // something to answer with the old job as if it were this one.
        if (existing.model_id != j.model_id || existing.recipe_pb != j.recipe_pb ||
            existing.calibration_dataset_id != j.calibration_dataset_id ||
            existing.train_dataset_id != j.train_dataset_id ||
            existing.eval_dataset_id != j.eval_dataset_id || existing.device != j.device) {
          return FailedPrecondition("request_id '" + j.request_id + "' was already used for job '" +
                                    existing.id +
                                    "' with another model, recipe, datasets or device; give this job a new "
                                    "request_id");
        }
        return Created{existing, false};
      }
    }
    PARE_ASSIGN_OR_RETURN(
        auto counts,
        tx.Query("SELECT (SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN "
                 "(?, ?)), (SELECT COUNT(*) FROM jobs WHERE state = ?)",
                 {j.tenant, State(JobState::kQueued), State(JobState::kRunning), State(JobState::kQueued)}));
    const int64_t active = counts.at(0).Int(0), queued = counts.at(0).Int(1);
    if (active >= limits.tenant_active_jobs) {
      return ResourceExhausted("tenant '" + j.tenant + "' active-jobs quota: " + std::to_string(active) +
                               " jobs queued or running, the limit is " +
                               std::to_string(limits.tenant_active_jobs));
    }
    if (queued >= limits.queued_jobs) {
      return ResourceExhausted("the job queue is full (" + std::to_string(limits.queued_jobs) +
                               " queued jobs, the server's limit); retry later");
    }
    PARE_RETURN_IF_ERROR(
        tx.Exec("INSERT INTO jobs (id, tenant, request_id, model_id, recipe, calibration_dataset_id, "
                "train_dataset_id, eval_dataset_id, device, state, attempts, max_attempts, created_ms, "
                "timeout_seconds) VALUES (?,?,?,?,?,?,?,?,?,?,0,?,?,?)",
                {j.id, j.tenant, SqlParam::NullIfEmpty(j.request_id), j.model_id, SqlParam::Blob(j.recipe_pb),
                 j.calibration_dataset_id, j.train_dataset_id, j.eval_dataset_id, j.device,
                 State(JobState::kQueued), static_cast<int64_t>(j.max_attempts), j.created_ms,
                 j.timeout_seconds})
            .status());
    PARE_ASSIGN_OR_RETURN(auto created, ReadJob(tx, d, j.tenant, j.id, false));
    return Created{created, true};
  });
}

Result<JobRecord> SqlStore::GetJob(const std::string& tenant, const std::string& id) {
  return InTransaction<JobRecord>(
      *db_, [&](SqlTx& tx) { return ReadJob(tx, db_->dialect(), tenant, id, /*lock=*/false); },
      Access::kRead);
}

Result<std::vector<JobRecord>> SqlStore::ListJobs(const std::string& tenant, int64_t after_seq, int limit) {
  using Jobs = std::vector<JobRecord>;
  return InTransaction<Jobs>(
      *db_,
      [&](SqlTx& tx) -> Result<Jobs> {
        PARE_ASSIGN_OR_RETURN(auto rows,
                              tx.Query(std::string("SELECT ") + kJobColumns +
                                           " FROM jobs WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?",
                                       {tenant, after_seq, static_cast<int64_t>(limit)}));
        Jobs out;
        for (const auto& r : rows) out.push_back(ReadJob(r));
        return out;
      },
      Access::kRead);
}

Result<std::optional<JobRecord>> SqlStore::LeaseJob(const std::string& worker, bool has_cuda,
                                                    const std::string& lease_id, int64_t now_ms,
                                                    int64_t ttl_ms) {
  const SqlDialect& d = db_->dialect();
  using Leased = std::optional<JobRecord>;
  return InTransaction<Leased>(*db_, [&](SqlTx& tx) -> Result<Leased> {
    // The oldest queued job no other lease being granted now holds: workers leasing at once
    // through any server take different jobs, and none waits for another.
    PARE_ASSIGN_OR_RETURN(auto rows, tx.Query(std::string("SELECT id FROM jobs WHERE state = ?") +
                                                  (has_cuda ? "" : " AND device != 'cuda'") +
                                                  " ORDER BY seq LIMIT 1" + d.skip_locked,
                                              {State(JobState::kQueued)}));
    if (rows.empty()) return Leased();
    const std::string id = rows.front().Text(0);
    PARE_RETURN_IF_ERROR(
        tx.Exec(
              "UPDATE jobs SET state = ?, attempts = attempts + 1, lease_id = ?, worker = ?, "
              "lease_expires_ms = ?, started_ms = CASE WHEN started_ms = 0 THEN ? ELSE "
              "started_ms END, progress = ? WHERE id = ?",
              {State(JobState::kRunning), lease_id, worker, now_ms + ttl_ms, now_ms, SqlParam::Blob(""), id})
            .status());
    PARE_RETURN_IF_ERROR(Changed(tx, d, id));
    PARE_ASSIGN_OR_RETURN(auto job, ReadJob(tx, d, "", id, false));
    return Leased(job);
  });
}

Result<JobRecord> SqlStore::Heartbeat(const std::string& job_id, const std::string& lease_id,
                                      const std::string& progress_pb, int64_t now_ms, int64_t ttl_ms,
                                      const std::string& checkpoint) {
  const SqlDialect& d = db_->dialect();
  return InTransaction<JobRecord>(*db_, [&](SqlTx& tx) -> Result<JobRecord> {
    PARE_RETURN_IF_ERROR(HeldLease(tx, d, job_id, lease_id).status());
    SqlParams params{now_ms + ttl_ms, SqlParam::Blob(progress_pb)};
    if (!checkpoint.empty()) params.push_back(SqlParam::Blob(checkpoint));
    params.emplace_back(job_id);
    PARE_RETURN_IF_ERROR(
        tx.Exec(checkpoint.empty()
                    ? "UPDATE jobs SET lease_expires_ms = ?, progress = ? WHERE id = ?"
                    : "UPDATE jobs SET lease_expires_ms = ?, progress = ?, checkpoint = ? WHERE id = ?",
                params)
            .status());
    PARE_RETURN_IF_ERROR(Changed(tx, d, job_id));
    return ReadJob(tx, d, "", job_id, false);
  });
}

Result<JobRecord> SqlStore::CompleteJob(const std::string& job_id, const std::string& lease_id,
                                        const JobOutcome& o, int64_t now_ms) {
  const SqlDialect& d = db_->dialect();
  if (o.state != JobState::kQueued && !IsTerminal(o.state)) {
    return InvalidArgument("a job can only end SUCCEEDED, FAILED, CANCELLED or be handed back");
  }
  return InTransaction<JobRecord>(*db_, [&](SqlTx& tx) -> Result<JobRecord> {
    PARE_RETURN_IF_ERROR(HeldLease(tx, d, job_id, lease_id).status());
    if (o.state == JobState::kQueued) {
      // Handed back (the worker is draining): the attempt does not count.
      PARE_RETURN_IF_ERROR(
          tx.Exec("UPDATE jobs SET state = ?, attempts = CASE WHEN attempts > 0 THEN attempts - 1 "
                  "ELSE 0 END, lease_id = '', worker = '', lease_expires_ms = 0 WHERE id = ?",
                  {State(JobState::kQueued), job_id})
              .status());
    } else {
      PARE_RETURN_IF_ERROR(
          tx.Exec(
                "UPDATE jobs SET state = ?, lease_id = '', lease_expires_ms = 0, error_code = ?, "
                "error_reason = ?, "
                "error_message = ?, reports = ?, result_sha256 = ?, result_size_bytes = ?, report_sha256 = "
                "?, "
                "finished_ms = ? WHERE id = ?",
                {State(o.state), o.error_code, o.error_reason, o.error_message, SqlParam::Blob(o.reports_pb),
                 o.result_sha256, static_cast<int64_t>(o.result_size_bytes), o.report_sha256, now_ms, job_id})
              .status());
    }
    PARE_RETURN_IF_ERROR(Changed(tx, d, job_id));
    return ReadJob(tx, d, "", job_id, false);
  });
}

Result<JobRecord> SqlStore::CancelJob(const std::string& tenant, const std::string& id, int64_t now_ms) {
  const SqlDialect& d = db_->dialect();
  return InTransaction<JobRecord>(*db_, [&](SqlTx& tx) -> Result<JobRecord> {
    PARE_ASSIGN_OR_RETURN(auto job, ReadJob(tx, d, tenant, id, /*lock=*/true));
    if (job.state == JobState::kCancelled) return job;
    if (IsTerminal(job.state))
      return FailedPrecondition("job '" + id + "' already ended " + JobStateName(job.state));
    if (job.state == JobState::kQueued) {
      PARE_RETURN_IF_ERROR(
          tx.Exec("UPDATE jobs SET state = ?, cancel_requested = 1, finished_ms = ?, error_code = "
                  "'CANCELLED', error_reason = 'CANCELLED', error_message = 'cancelled before it "
                  "started' WHERE id = ?",
                  {State(JobState::kCancelled), now_ms, id})
              .status());
    } else {
      PARE_RETURN_IF_ERROR(tx.Exec("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", {id}).status());
    }
    PARE_RETURN_IF_ERROR(Changed(tx, d, id));
    return ReadJob(tx, d, tenant, id, false);
  });
}

Result<std::vector<JobRecord>> SqlStore::ExpireLeases(int64_t now_ms) {
  const SqlDialect& d = db_->dialect();
  using Jobs = std::vector<JobRecord>;
  return InTransaction<Jobs>(*db_, [&](SqlTx& tx) -> Result<Jobs> {
    // Every server's reaper may run at once: each takes the expired rows no other holds, and a
    // lease renewed meanwhile is not expired (the row is read locked, after the renewal).
    PARE_ASSIGN_OR_RETURN(auto rows,
                          tx.Query(std::string("SELECT ") + kJobColumns +
                                       " FROM jobs WHERE state = ? AND lease_expires_ms < ?" + d.skip_locked,
                                   {State(JobState::kRunning), now_ms}));
    Jobs changed;
    for (const auto& row : rows) {
      const JobRecord j = ReadJob(row);
      if (j.cancel_requested) {
        PARE_RETURN_IF_ERROR(
            tx.Exec("UPDATE jobs SET state = ?, lease_id = '', finished_ms = ?, error_code = "
                    "'CANCELLED', error_reason = 'CANCELLED', error_message = 'cancelled; its "
                    "worker stopped responding' WHERE id = ?",
                    {State(JobState::kCancelled), now_ms, j.id})
                .status());
      } else if (j.attempts >= j.max_attempts) {
        const std::string msg = "the job's worker stopped responding on each of " +
                                std::to_string(j.attempts) + " attempts (last worker: " + j.worker +
                                "); the model may crash LibTorch or exceed the worker's memory";
        PARE_RETURN_IF_ERROR(
            tx.Exec("UPDATE jobs SET state = ?, lease_id = '', finished_ms = ?, error_code = "
                    "'ABORTED', error_reason = 'LEASE_EXPIRED', error_message = ? WHERE id = ?",
                    {State(JobState::kFailed), now_ms, msg, j.id})
                .status());
      } else {
        PARE_RETURN_IF_ERROR(
            tx.Exec(
                  "UPDATE jobs SET state = ?, lease_id = '', worker = '', lease_expires_ms = 0 WHERE id = ?",
                  {State(JobState::kQueued), j.id})
                .status());
      }
      PARE_RETURN_IF_ERROR(Changed(tx, d, j.id));
      PARE_ASSIGN_OR_RETURN(auto updated, ReadJob(tx, d, "", j.id, false));
      changed.push_back(updated);
    }
    return changed;
  });
}

Result<std::map<JobState, int64_t>> SqlStore::CountJobs() {
  using Counts = std::map<JobState, int64_t>;
  return InTransaction<Counts>(
      *db_,
      [&](SqlTx& tx) -> Result<Counts> {
        PARE_ASSIGN_OR_RETURN(auto rows, tx.Query("SELECT state, COUNT(*) FROM jobs GROUP BY state"));
        Counts out;
        for (const auto& r : rows) out[static_cast<JobState>(r.Int(0))] = r.Int(1);
        return out;
      },
      Access::kRead);
}

Result<std::map<std::string, int64_t>> SqlStore::QueuedByDevice() {
  using Counts = std::map<std::string, int64_t>;
  return InTransaction<Counts>(
      *db_,
      [&](SqlTx& tx) -> Result<Counts> {
        PARE_ASSIGN_OR_RETURN(auto rows,
                              tx.Query("SELECT device, COUNT(*) FROM jobs WHERE state = ? GROUP BY device",
                                       {State(JobState::kQueued)}));
        Counts out;
        for (const auto& r : rows) out[r.Text(0)] = r.Int(1);
        return out;
      },
      Access::kRead);
}

Result<std::vector<std::string>> SqlStore::RecentModelDigests(int n) {
  using Digests = std::vector<std::string>;
  return InTransaction<Digests>(
      *db_,
      [&](SqlTx& tx) -> Result<Digests> {
        PARE_ASSIGN_OR_RETURN(auto rows,
                              tx.Query("SELECT sha256 FROM models ORDER BY created_ms DESC LIMIT ?",
                                       {static_cast<int64_t>(n)}));
        Digests out;
        for (const auto& r : rows) out.push_back(r.Text(0));
        return out;
      },
      Access::kRead);
}

Result<Store::TenantUsage> SqlStore::Usage(const std::string& tenant) {
  return InTransaction<TenantUsage>(
      *db_,
      [&](SqlTx& tx) -> Result<TenantUsage> {
        TenantUsage u;
        PARE_ASSIGN_OR_RETURN(u.stored_bytes, StoredBytes(tx, tenant));
        PARE_ASSIGN_OR_RETURN(auto rows,
                              tx.Query("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN (?, ?)",
                                       {tenant, State(JobState::kQueued), State(JobState::kRunning)}));
        u.active_jobs = rows.at(0).Int(0);
        return u;
      },
      Access::kRead);
}

bool IsPostgresSpec(const std::string& spec) {
  std::string lower = spec;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower.rfind("postgresql://", 0) == 0 || lower.rfind("postgres://", 0) == 0) return true;
  // libpq's keyword/value form: "host=db port=5432 dbname=pare user=pare".
  static const std::regex kKeywords(R"(^\s*(host|hostaddr|port|dbname|user|service)\s*=.*)");
  return std::regex_match(lower, kKeywords);
}

Result<std::unique_ptr<Store>> OpenStore(const std::string& spec, const std::string& data_dir,
                                         const std::string& password) {
  std::unique_ptr<SqlBackend> db;
  if (spec.empty() || spec == "sqlite") {
    PARE_ASSIGN_OR_RETURN(db, OpenSqlite(data_dir + "/pare.db"));
  } else if (IsPostgresSpec(spec)) {
    PARE_ASSIGN_OR_RETURN(db, OpenPostgres(spec, password));
  } else {
    return InvalidArgument(
        "--store must be 'sqlite' or a PostgreSQL URL (postgresql://user@host:5432/db) or libpq "
        "key=value string (host=... dbname=...); got '" +
        RedactUrl(spec) + "'");
  }
  PARE_ASSIGN_OR_RETURN(auto store, SqlStore::Open(std::move(db)));
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace pare::server
