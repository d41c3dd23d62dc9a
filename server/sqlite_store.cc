#include "server/sqlite_store.h"

#include <sqlite3.h>

#include <sstream>

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

constexpr int kSchemaVersion = 3;

const char* kSchemaV1 = R"SQL(
CREATE TABLE models (
  id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
  size_bytes INTEGER NOT NULL, input_shape TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE datasets (
  id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
  size_bytes INTEGER NOT NULL, format TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, request_id TEXT,
  model_id TEXT NOT NULL, recipe BLOB NOT NULL,
  calibration_dataset_id TEXT NOT NULL, train_dataset_id TEXT NOT NULL, eval_dataset_id TEXT NOT NULL,
  device TEXT NOT NULL, state INTEGER NOT NULL, attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL,
  lease_id TEXT NOT NULL DEFAULT '', worker TEXT NOT NULL DEFAULT '', lease_expires_ms INTEGER NOT NULL DEFAULT 0,
  cancel_requested INTEGER NOT NULL DEFAULT 0, progress BLOB NOT NULL DEFAULT x'', reports BLOB NOT NULL DEFAULT x'',
  error_code TEXT NOT NULL DEFAULT '', error_reason TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
  result_sha256 TEXT NOT NULL DEFAULT '', result_size_bytes INTEGER NOT NULL DEFAULT 0,
  report_sha256 TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL, started_ms INTEGER NOT NULL DEFAULT 0, finished_ms INTEGER NOT NULL DEFAULT 0,
  UNIQUE (tenant, request_id));
CREATE INDEX jobs_by_state ON jobs (state, seq);
)SQL";

// v2: a wall-clock limit per job.
const char* kSchemaV2 = "ALTER TABLE jobs ADD COLUMN timeout_seconds INTEGER NOT NULL DEFAULT 0;";
// v3: what a running attempt checkpoints for the next (an auto search's finished trials).
const char* kSchemaV3 = "ALTER TABLE jobs ADD COLUMN checkpoint BLOB NOT NULL DEFAULT x'';";

const char* kJobColumns =
    "seq, id, tenant, COALESCE(request_id, ''), model_id, recipe, calibration_dataset_id, train_dataset_id, "
    "eval_dataset_id, device, state, attempts, max_attempts, lease_id, worker, lease_expires_ms, "
    "cancel_requested, "
    "progress, reports, error_code, error_reason, error_message, result_sha256, result_size_bytes, "
    "report_sha256, "
    "created_ms, started_ms, finished_ms, timeout_seconds, checkpoint";

// A prepared statement with positional binding.
class Stmt {
 public:
  Stmt(sqlite3* db, const std::string& sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt_, nullptr);
  }
  ~Stmt() { sqlite3_finalize(stmt_); }
  bool ok() const { return rc_ == SQLITE_OK; }
  Stmt& Bind(const std::string& v) {
    sqlite3_bind_text(stmt_, ++idx_, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindBlob(const std::string& v) {
    sqlite3_bind_blob(stmt_, ++idx_, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& BindNullIfEmpty(const std::string& v) {
    if (v.empty())
      sqlite3_bind_null(stmt_, ++idx_);
    else
      Bind(v);
    return *this;
  }
  Stmt& Bind(int64_t v) {
    sqlite3_bind_int64(stmt_, ++idx_, v);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE, or an error code.
  int Step() { return rc_ = sqlite3_step(stmt_); }
  std::string Text(int col) const {
    const void* p = sqlite3_column_blob(stmt_, col);
    int n = sqlite3_column_bytes(stmt_, col);
    return p ? std::string(static_cast<const char*>(p), static_cast<size_t>(n)) : std::string();
  }
  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  Status Error(const std::string& what) const { return Internal(what + ": " + sqlite3_errmsg(db_)); }

 private:
  sqlite3* db_;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
  int idx_ = 0;
};

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

JobRecord ReadJob(const Stmt& s) {
  JobRecord j;
  int c = 0;
  j.seq = s.Int(c++);
  j.id = s.Text(c++);
  j.tenant = s.Text(c++);
  j.request_id = s.Text(c++);
  j.model_id = s.Text(c++);
  j.recipe_pb = s.Text(c++);
  j.calibration_dataset_id = s.Text(c++);
  j.train_dataset_id = s.Text(c++);
  j.eval_dataset_id = s.Text(c++);
  j.device = s.Text(c++);
  j.state = static_cast<JobState>(s.Int(c++));
  j.attempts = static_cast<int>(s.Int(c++));
  j.max_attempts = static_cast<int>(s.Int(c++));
  j.lease_id = s.Text(c++);
  j.worker = s.Text(c++);
  j.lease_expires_ms = s.Int(c++);
  j.cancel_requested = s.Int(c++) != 0;
  j.progress_pb = s.Text(c++);
  j.reports_pb = s.Text(c++);
  j.error_code = s.Text(c++);
  j.error_reason = s.Text(c++);
  j.error_message = s.Text(c++);
  j.result_sha256 = s.Text(c++);
  j.result_size_bytes = static_cast<uint64_t>(s.Int(c++));
  j.report_sha256 = s.Text(c++);
  j.created_ms = s.Int(c++);
  j.started_ms = s.Int(c++);
  j.finished_ms = s.Int(c++);
  j.timeout_seconds = s.Int(c++);
  j.checkpoint = s.Text(c++);
  return j;
}

// Commits on success, rolls back otherwise (BEGIN IMMEDIATE: one writer at a time).
class Txn {
 public:
  explicit Txn(sqlite3* db) : db_(db) {
    ok_ = sqlite3_exec(db, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK;
  }
  ~Txn() {
    if (ok_ && !done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  bool ok() const { return ok_; }
  Status Commit() {
    done_ = true;
    if (sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) != SQLITE_OK) {
      return Internal(std::string("commit: ") + sqlite3_errmsg(db_));
    }
    return Status::Ok();
  }

 private:
  sqlite3* db_;
  bool ok_ = false;
  bool done_ = false;
};

}  // namespace

Result<std::unique_ptr<SqliteStore>> SqliteStore::Open(const std::string& path) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string err = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Internal("cannot open database " + path + ": " + err);
  }
  std::unique_ptr<SqliteStore> store(new SqliteStore(db));
  PARE_RETURN_IF_ERROR(store->Exec("PRAGMA journal_mode=WAL"));
  PARE_RETURN_IF_ERROR(store->Exec("PRAGMA synchronous=FULL"));
  PARE_RETURN_IF_ERROR(store->Exec("PRAGMA foreign_keys=ON"));
  sqlite3_busy_timeout(db, 5000);
  PARE_RETURN_IF_ERROR(store->Migrate());
  return store;
}

SqliteStore::~SqliteStore() { sqlite3_close(db_); }

Status SqliteStore::Exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return Internal("sqlite: " + msg);
  }
  return Status::Ok();
}

Status SqliteStore::Migrate() {
  std::lock_guard<std::mutex> lock(mu_);
  PARE_RETURN_IF_ERROR(Exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"));
  int64_t version = 0;
  {
    Stmt s(db_, "SELECT COALESCE(MAX(version), 0) FROM schema_version");
    if (s.Step() == SQLITE_ROW) version = s.Int(0);
  }
  if (version > kSchemaVersion) {
    return FailedPrecondition("the database has schema version " + std::to_string(version) +
                              ", newer than this server's " + std::to_string(kSchemaVersion));
  }
  if (version < 1) {
    Txn t(db_);
    PARE_RETURN_IF_ERROR(Exec(kSchemaV1));
    PARE_RETURN_IF_ERROR(Exec("INSERT INTO schema_version (version) VALUES (1)"));
    PARE_RETURN_IF_ERROR(t.Commit());
  }
  if (version < 2) {
    Txn t(db_);
    PARE_RETURN_IF_ERROR(Exec(kSchemaV2));
    PARE_RETURN_IF_ERROR(Exec("INSERT INTO schema_version (version) VALUES (2)"));
    PARE_RETURN_IF_ERROR(t.Commit());
  }
  if (version < 3) {
    Txn t(db_);
    PARE_RETURN_IF_ERROR(Exec(kSchemaV3));
    PARE_RETURN_IF_ERROR(Exec("INSERT INTO schema_version (version) VALUES (3)"));
    PARE_RETURN_IF_ERROR(t.Commit());
  }
  return Status::Ok();
}

Status SqliteStore::PutModel(const ModelRecord& m) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_,
         "INSERT INTO models (id, tenant, name, sha256, size_bytes, input_shape, created_ms) VALUES "
         "(?,?,?,?,?,?,?)");
  s.Bind(m.id)
      .Bind(m.tenant)
      .Bind(m.name)
      .Bind(m.sha256)
      .Bind(static_cast<int64_t>(m.size_bytes))
      .Bind(JoinShapes(m))
      .Bind(m.created_ms);
  if (s.Step() != SQLITE_DONE) return s.Error("insert model");
  return Status::Ok();
}

Result<ModelRecord> SqliteStore::GetModel(const std::string& tenant, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_,
         "SELECT id, tenant, name, sha256, size_bytes, input_shape, created_ms FROM models WHERE id = ? AND "
         "tenant = ?");
  s.Bind(id).Bind(tenant);
  if (s.Step() != SQLITE_ROW) return NotFound("model '" + id + "' does not exist");
  ModelRecord m{s.Text(0), s.Text(1), s.Text(2), s.Text(3), static_cast<uint64_t>(s.Int(4)),
                {},        {},        s.Int(6)};
  SplitShapes(s.Text(5), m);
  return m;
}

Status SqliteStore::PutDataset(const DatasetRecord& d) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_,
         "INSERT INTO datasets (id, tenant, name, sha256, size_bytes, format, created_ms) VALUES "
         "(?,?,?,?,?,?,?)");
  s.Bind(d.id)
      .Bind(d.tenant)
      .Bind(d.name)
      .Bind(d.sha256)
      .Bind(static_cast<int64_t>(d.size_bytes))
      .Bind(d.format)
      .Bind(d.created_ms);
  if (s.Step() != SQLITE_DONE) return s.Error("insert dataset");
  return Status::Ok();
}

Result<DatasetRecord> SqliteStore::GetDataset(const std::string& tenant, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_,
         "SELECT id, tenant, name, sha256, size_bytes, format, created_ms FROM datasets WHERE id = ? AND "
         "tenant = ?");
  s.Bind(id).Bind(tenant);
  if (s.Step() != SQLITE_ROW) return NotFound("dataset '" + id + "' does not exist");
  DatasetRecord d{s.Text(0), s.Text(1), s.Text(2), s.Text(3), static_cast<uint64_t>(s.Int(4)),
                  s.Text(5), s.Int(6)};
  return d;
}

Result<JobRecord> SqliteStore::GetJobLocked(const std::string& tenant, const std::string& id) {
  std::string sql = std::string("SELECT ") + kJobColumns + " FROM jobs WHERE id = ?" +
                    (tenant.empty() ? "" : " AND tenant = ?");
  Stmt s(db_, sql);
  s.Bind(id);
  if (!tenant.empty()) s.Bind(tenant);
  if (s.Step() != SQLITE_ROW) return NotFound("job '" + id + "' does not exist");
  return ReadJob(s);
}

Result<std::pair<JobRecord, bool>> SqliteStore::CreateJob(const JobRecord& j, const QueueLimits& limits) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn t(db_);
  if (!t.ok()) return Internal(std::string("begin: ") + sqlite3_errmsg(db_));
  if (!j.request_id.empty()) {
    Stmt s(db_, "SELECT id FROM jobs WHERE tenant = ? AND request_id = ?");
    s.Bind(j.tenant).Bind(j.request_id);
    if (s.Step() == SQLITE_ROW) {
      PARE_ASSIGN_OR_RETURN(auto existing, GetJobLocked(j.tenant, s.Text(0)));
      return std::make_pair(existing, false);
    }
  }
  {
    Stmt c(db_,
           "SELECT (SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN (?, ?)), "
           "(SELECT COUNT(*) FROM jobs WHERE state = ?)");
    c.Bind(j.tenant)
        .Bind(static_cast<int64_t>(JobState::kQueued))
        .Bind(static_cast<int64_t>(JobState::kRunning))
        .Bind(static_cast<int64_t>(JobState::kQueued));
    if (c.Step() != SQLITE_ROW) return c.Error("count jobs");
    if (c.Int(0) >= limits.tenant_active_jobs) {
      return ResourceExhausted("tenant '" + j.tenant + "' active-jobs quota: " + std::to_string(c.Int(0)) +
                               " jobs queued or running, the limit is " +
                               std::to_string(limits.tenant_active_jobs));
    }
    if (c.Int(1) >= limits.queued_jobs) {
      return ResourceExhausted("the job queue is full (" + std::to_string(limits.queued_jobs) +
                               " queued jobs, the server's limit); retry later");
    }
  }
  Stmt s(
      db_,
      "INSERT INTO jobs (id, tenant, request_id, model_id, recipe, calibration_dataset_id, train_dataset_id, "
      "eval_dataset_id, device, state, attempts, max_attempts, created_ms, timeout_seconds) "
      "VALUES (?,?,?,?,?,?,?,?,?,?,0,?,?,?)");
  s.Bind(j.id)
      .Bind(j.tenant)
      .BindNullIfEmpty(j.request_id)
      .Bind(j.model_id)
      .BindBlob(j.recipe_pb)
      .Bind(j.calibration_dataset_id)
      .Bind(j.train_dataset_id)
      .Bind(j.eval_dataset_id)
      .Bind(j.device)
      .Bind(static_cast<int64_t>(JobState::kQueued))
      .Bind(static_cast<int64_t>(j.max_attempts))
      .Bind(j.created_ms)
      .Bind(j.timeout_seconds);
  if (s.Step() != SQLITE_DONE) return s.Error("insert job");
  PARE_ASSIGN_OR_RETURN(auto created, GetJobLocked(j.tenant, j.id));
  PARE_RETURN_IF_ERROR(t.Commit());
  return std::make_pair(created, true);
}

Result<JobRecord> SqliteStore::GetJob(const std::string& tenant, const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  return GetJobLocked(tenant, id);
}

Result<std::vector<JobRecord>> SqliteStore::ListJobs(const std::string& tenant, int64_t after_seq,
                                                     int limit) {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_, std::string("SELECT ") + kJobColumns +
                  " FROM jobs WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?");
  s.Bind(tenant).Bind(after_seq).Bind(static_cast<int64_t>(limit));
  std::vector<JobRecord> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out.push_back(ReadJob(s));
  if (rc != SQLITE_DONE) return s.Error("list jobs");
  return out;
}

Result<std::optional<JobRecord>> SqliteStore::LeaseJob(const std::string& worker, bool has_cuda,
                                                       const std::string& lease_id, int64_t now_ms,
                                                       int64_t ttl_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn t(db_);
  if (!t.ok()) return Internal(std::string("begin: ") + sqlite3_errmsg(db_));
  Stmt s(db_, std::string("SELECT id FROM jobs WHERE state = ?") + (has_cuda ? "" : " AND device != 'cuda'") +
                  " ORDER BY seq LIMIT 1");
  s.Bind(static_cast<int64_t>(JobState::kQueued));
  int rc = s.Step();
  if (rc == SQLITE_DONE) return std::optional<JobRecord>();
  if (rc != SQLITE_ROW) return s.Error("lease select");
  std::string id = s.Text(0);
  Stmt u(
      db_,
      "UPDATE jobs SET state = ?, attempts = attempts + 1, lease_id = ?, worker = ?, lease_expires_ms = ?, "
      "started_ms = CASE WHEN started_ms = 0 THEN ? ELSE started_ms END, progress = x'' WHERE id = ?");
  u.Bind(static_cast<int64_t>(JobState::kRunning))
      .Bind(lease_id)
      .Bind(worker)
      .Bind(now_ms + ttl_ms)
      .Bind(now_ms)
      .Bind(id);
  if (u.Step() != SQLITE_DONE) return u.Error("lease update");
  PARE_ASSIGN_OR_RETURN(auto job, GetJobLocked("", id));
  PARE_RETURN_IF_ERROR(t.Commit());
  return std::optional<JobRecord>(job);
}

Result<JobRecord> SqliteStore::CheckLeaseLocked(const std::string& job_id, const std::string& lease_id) {
  PARE_ASSIGN_OR_RETURN(auto job, GetJobLocked("", job_id));
  if (job.state != JobState::kRunning || job.lease_id != lease_id || lease_id.empty()) {
    return FailedPrecondition("the lease on job '" + job_id + "' is no longer held by this worker (job is " +
                              JobStateName(job.state) + ")");
  }
  return job;
}

Result<JobRecord> SqliteStore::Heartbeat(const std::string& job_id, const std::string& lease_id,
                                         const std::string& progress_pb, int64_t now_ms, int64_t ttl_ms,
                                         const std::string& checkpoint) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn t(db_);
  PARE_ASSIGN_OR_RETURN(auto job, CheckLeaseLocked(job_id, lease_id));
  Stmt u(db_, checkpoint.empty()
                  ? "UPDATE jobs SET lease_expires_ms = ?, progress = ? WHERE id = ?"
                  : "UPDATE jobs SET lease_expires_ms = ?, progress = ?, checkpoint = ? WHERE id = ?");
  u.Bind(now_ms + ttl_ms).BindBlob(progress_pb);
  if (!checkpoint.empty()) u.BindBlob(checkpoint);
  u.Bind(job_id);
  if (u.Step() != SQLITE_DONE) return u.Error("heartbeat");
  auto updated = GetJobLocked("", job_id);
  PARE_RETURN_IF_ERROR(t.Commit());
  return updated;
}

Result<JobRecord> SqliteStore::CompleteJob(const std::string& job_id, const std::string& lease_id,
                                           const JobOutcome& o, int64_t now_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn t(db_);
  PARE_ASSIGN_OR_RETURN(auto job, CheckLeaseLocked(job_id, lease_id));
  if (o.state == JobState::kQueued) {
    // Handed back (the worker is draining): the attempt does not count.
    Stmt u(db_,
           "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), lease_id = '', worker = '', "
           "lease_expires_ms = 0 WHERE id = ?");
    u.Bind(static_cast<int64_t>(JobState::kQueued)).Bind(job_id);
    if (u.Step() != SQLITE_DONE) return u.Error("hand back");
  } else {
    if (!IsTerminal(o.state))
      return InvalidArgument("a job can only end SUCCEEDED, FAILED, CANCELLED or be handed back");
    Stmt u(
        db_,
        "UPDATE jobs SET state = ?, lease_id = '', lease_expires_ms = 0, error_code = ?, error_reason = ?, "
        "error_message = ?, reports = ?, result_sha256 = ?, result_size_bytes = ?, report_sha256 = ?, "
        "finished_ms = ? WHERE id = ?");
    u.Bind(static_cast<int64_t>(o.state))
        .Bind(o.error_code)
        .Bind(o.error_reason)
        .Bind(o.error_message)
        .BindBlob(o.reports_pb)
        .Bind(o.result_sha256)
        .Bind(static_cast<int64_t>(o.result_size_bytes))
        .Bind(o.report_sha256)
        .Bind(now_ms)
        .Bind(job_id);
    if (u.Step() != SQLITE_DONE) return u.Error("complete");
  }
  auto updated = GetJobLocked("", job_id);
  PARE_RETURN_IF_ERROR(t.Commit());
  return updated;
}

Result<JobRecord> SqliteStore::CancelJob(const std::string& tenant, const std::string& id, int64_t now_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn t(db_);
  PARE_ASSIGN_OR_RETURN(auto job, GetJobLocked(tenant, id));
  if (job.state == JobState::kCancelled) return job;
  if (IsTerminal(job.state)) {
    return FailedPrecondition("job '" + id + "' already ended " + JobStateName(job.state));
  }
  if (job.state == JobState::kQueued) {
    Stmt u(db_,
           "UPDATE jobs SET state = ?, cancel_requested = 1, finished_ms = ?, error_code = 'CANCELLED', "
           "error_reason = 'CANCELLED', error_message = 'cancelled before it started' WHERE id = ?");
    u.Bind(static_cast<int64_t>(JobState::kCancelled)).Bind(now_ms).Bind(id);
    if (u.Step() != SQLITE_DONE) return u.Error("cancel");
  } else {
    Stmt u(db_, "UPDATE jobs SET cancel_requested = 1 WHERE id = ?");
    u.Bind(id);
    if (u.Step() != SQLITE_DONE) return u.Error("cancel");
  }
  auto updated = GetJobLocked(tenant, id);
  PARE_RETURN_IF_ERROR(t.Commit());
  return updated;
}

Result<std::vector<JobRecord>> SqliteStore::ExpireLeases(int64_t now_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  Txn t(db_);
  std::vector<JobRecord> expired;
  {
    Stmt s(db_, std::string("SELECT ") + kJobColumns + " FROM jobs WHERE state = ? AND lease_expires_ms < ?");
    s.Bind(static_cast<int64_t>(JobState::kRunning)).Bind(now_ms);
    while (s.Step() == SQLITE_ROW) expired.push_back(ReadJob(s));
  }
  std::vector<JobRecord> changed;
  for (const auto& j : expired) {
    if (j.cancel_requested) {
      Stmt u(db_,
             "UPDATE jobs SET state = ?, lease_id = '', finished_ms = ?, error_code = 'CANCELLED', "
             "error_reason = 'CANCELLED', error_message = 'cancelled; its worker stopped responding' WHERE "
             "id = ?");
      u.Bind(static_cast<int64_t>(JobState::kCancelled)).Bind(now_ms).Bind(j.id);
      if (u.Step() != SQLITE_DONE) return u.Error("expire");
    } else if (j.attempts >= j.max_attempts) {
      std::string msg = "the job's worker stopped responding on each of " + std::to_string(j.attempts) +
                        " attempts (last worker: " + j.worker +
                        "); the model may crash LibTorch or exceed the worker's memory";
      Stmt u(db_,
             "UPDATE jobs SET state = ?, lease_id = '', finished_ms = ?, error_code = 'ABORTED', "
             "error_reason = 'LEASE_EXPIRED', error_message = ? WHERE id = ?");
      u.Bind(static_cast<int64_t>(JobState::kFailed)).Bind(now_ms).Bind(msg).Bind(j.id);
      if (u.Step() != SQLITE_DONE) return u.Error("expire");
    } else {
      Stmt u(db_, "UPDATE jobs SET state = ?, lease_id = '', worker = '', lease_expires_ms = 0 WHERE id = ?");
      u.Bind(static_cast<int64_t>(JobState::kQueued)).Bind(j.id);
      if (u.Step() != SQLITE_DONE) return u.Error("expire");
    }
    PARE_ASSIGN_OR_RETURN(auto updated, GetJobLocked("", j.id));
    changed.push_back(updated);
  }
  PARE_RETURN_IF_ERROR(t.Commit());
  return changed;
}

Result<std::map<JobState, int64_t>> SqliteStore::CountJobs() {
  std::lock_guard<std::mutex> lock(mu_);
  Stmt s(db_, "SELECT state, COUNT(*) FROM jobs GROUP BY state");
  if (!s.ok()) return s.Error("count jobs");
  std::map<JobState, int64_t> out;
  int rc;
  while ((rc = s.Step()) == SQLITE_ROW) out[static_cast<JobState>(s.Int(0))] = s.Int(1);
  if (rc != SQLITE_DONE) return s.Error("count jobs");
  return out;
}

Result<Store::TenantUsage> SqliteStore::Usage(const std::string& tenant) {
  std::lock_guard<std::mutex> lock(mu_);
  TenantUsage u;
  Stmt s(db_,
         "SELECT (SELECT COALESCE(SUM(size_bytes), 0) FROM models WHERE tenant = ?) + "
         "(SELECT COALESCE(SUM(size_bytes), 0) FROM datasets WHERE tenant = ?), "
         "(SELECT COUNT(*) FROM jobs WHERE tenant = ? AND state IN (?, ?))");
  s.Bind(tenant)
      .Bind(tenant)
      .Bind(tenant)
      .Bind(static_cast<int64_t>(JobState::kQueued))
      .Bind(static_cast<int64_t>(JobState::kRunning));
  if (s.Step() != SQLITE_ROW) return s.Error("usage");
  u.stored_bytes = static_cast<uint64_t>(s.Int(0));
  u.active_jobs = s.Int(1);
  return u;
}

}  // namespace pare::server
