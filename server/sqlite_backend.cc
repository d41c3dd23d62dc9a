#include "server/sqlite_backend.h"

#include <spdlog/spdlog.h>
#include <sqlite3.h>

#include <mutex>

#include "common/logging.h"

namespace pare::server {

int64_t SqlRow::Int(size_t col) const {
  const auto& v = values_.at(col);
  if (!v || v->empty()) return 0;
  return std::stoll(*v);
}

namespace {

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

// v2: a wall-clock limit per job. v3: what a running attempt checkpoints for the next.
const char* kSchemaV2 = "ALTER TABLE jobs ADD COLUMN timeout_seconds INTEGER NOT NULL DEFAULT 0;";
const char* kSchemaV3 = "ALTER TABLE jobs ADD COLUMN checkpoint BLOB NOT NULL DEFAULT x'';";
// Blobs in the database: the server keeps them there on PostgreSQL only (--blob-store
// postgresql); the same tables here keep the version numbers equal and let the tests run the
// database blob store on SQLite too.
const char* kSchemaV4 = R"SQL(
CREATE TABLE blobs (
  sha256 TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, chunk_bytes INTEGER NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE blob_chunks (sha256 TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE blob_parts (
  blob TEXT NOT NULL REFERENCES blobs (sha256), idx INTEGER NOT NULL,
  chunk TEXT NOT NULL REFERENCES blob_chunks (sha256), PRIMARY KEY (blob, idx));
)SQL";

// A failed call's status: a busy or locked database (another process holds it past the busy
// timeout), a full disk or an I/O error is UNAVAILABLE (it may pass); a constraint violation
// ALREADY_EXISTS; the rest INTERNAL. The cause goes to the log and the message.
Status Failure(sqlite3* db, int rc, const std::string& what) {
  const std::string cause = what + ": " + sqlite3_errmsg(db) + " (sqlite " + sqlite3_errstr(rc) + ")";
  const int primary = rc & 0xff;
  if (primary == SQLITE_CONSTRAINT) return Status(Code::kAlreadyExists, cause);
  spdlog::error(Kv({{"msg", "store: database error"}, {"backend", "sqlite"}, {"cause", cause}}));
  if (primary == SQLITE_BUSY || primary == SQLITE_LOCKED || primary == SQLITE_FULL ||
      primary == SQLITE_IOERR || primary == SQLITE_CANTOPEN) {
    return DatabaseUnavailable(sqlite3_errstr(rc));
  }
  return DatabaseFailed();
}

class SqliteTx final : public SqlTx {
 public:
  explicit SqliteTx(sqlite3* db) : db_(db) {}

  Result<SqlRows> Query(const std::string& sql, const SqlParams& params) override {
    SqlRows rows;
    PARE_RETURN_IF_ERROR(Run(sql, params, &rows));
    return rows;
  }
  Result<int64_t> Exec(const std::string& sql, const SqlParams& params) override {
    PARE_RETURN_IF_ERROR(Run(sql, params, nullptr));
    return static_cast<int64_t>(sqlite3_changes(db_));
  }

 private:
  // Runs every statement of `sql` (schema scripts hold several); rows of the last one.
  Status Run(const std::string& sql, const SqlParams& params, SqlRows* rows) {
    const char* tail = sql.c_str();
    while (tail && *tail) {
      sqlite3_stmt* raw = nullptr;
      int rc = sqlite3_prepare_v2(db_, tail, -1, &raw, &tail);
      if (rc != SQLITE_OK) return Failure(db_, rc, "prepare");
      if (!raw) break;  // trailing whitespace
      std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> stmt(raw, sqlite3_finalize);
      const int wanted = sqlite3_bind_parameter_count(raw);
      if (wanted != 0 && wanted != static_cast<int>(params.size())) {
        return Internal("statement takes " + std::to_string(wanted) + " parameters, given " +
                        std::to_string(params.size()));
      }
      for (int i = 0; i < wanted; ++i) {
        const SqlParam& p = params[static_cast<size_t>(i)];
        switch (p.kind) {
          case SqlParam::Kind::kNull: rc = sqlite3_bind_null(raw, i + 1); break;
          case SqlParam::Kind::kInt: rc = sqlite3_bind_int64(raw, i + 1, p.i); break;
          case SqlParam::Kind::kText:
            rc = sqlite3_bind_text(raw, i + 1, p.s.data(), static_cast<int>(p.s.size()), SQLITE_TRANSIENT);
            break;
          case SqlParam::Kind::kBlob:
            rc = sqlite3_bind_blob(raw, i + 1, p.s.data(), static_cast<int>(p.s.size()), SQLITE_TRANSIENT);
            break;
        }
        if (rc != SQLITE_OK) return Failure(db_, rc, "bind");
      }
      if (rows) rows->clear();
      while ((rc = sqlite3_step(raw)) == SQLITE_ROW) {
        if (!rows) continue;
        const int n = sqlite3_column_count(raw);
        std::vector<std::optional<std::string>> values;
        for (int c = 0; c < n; ++c) {
          if (sqlite3_column_type(raw, c) == SQLITE_NULL) {
            values.emplace_back();
            continue;
          }
          const void* data = sqlite3_column_blob(raw, c);
          const int size = sqlite3_column_bytes(raw, c);
          values.emplace_back(data ? std::string(static_cast<const char*>(data), static_cast<size_t>(size))
                                   : "");
        }
        rows->emplace_back(std::move(values));
      }
      if (rc != SQLITE_DONE) return Failure(db_, rc, "step");
    }
    return Status::Ok();
  }

  sqlite3* db_;
};

class SqliteBackend final : public SqlBackend {
 public:
  explicit SqliteBackend(sqlite3* db) : db_(db) {
    // One transaction at a time in this process (one connection), so no SQL-level locks.
    dialect_.name = "sqlite";
    dialect_.schema = {kSchemaV1, kSchemaV2, kSchemaV3, kSchemaV4};
  }
  ~SqliteBackend() override { sqlite3_close(db_); }

  const SqlDialect& dialect() const override { return dialect_; }

  Status Transact(const std::function<Status(SqlTx&)>& body, Access access) override {
    std::lock_guard<std::mutex> lock(mu_);
    // IMMEDIATE for writes: the write lock is taken at the start, so a transaction never fails
    // half-way for another process's writer (it waits up to the busy timeout, then is
    // UNAVAILABLE). Reads take none (WAL: they see the last commit).
    int rc =
        sqlite3_exec(db_, access == Access::kWrite ? "BEGIN IMMEDIATE" : "BEGIN", nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) return Failure(db_, rc, "begin");
    SqliteTx tx(db_);
    Status s = body(tx);
    if (!s.ok()) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      return s;
    }
    rc = sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) {
      Status failed = Failure(db_, rc, "commit");
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      return failed;
    }
    return Status::Ok();
  }

 private:
  std::mutex mu_;  // guards db_: one connection, used by one thread at a time
  sqlite3* db_;
  SqlDialect dialect_;
};

}  // namespace

Result<std::unique_ptr<SqlBackend>> OpenSqlite(const std::string& path) {
  sqlite3* db = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &db,
                           SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string err = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return Unavailable("cannot open database " + path + ": " + err);
  }
  auto backend = std::make_unique<SqliteBackend>(db);
  sqlite3_busy_timeout(db, 5000);
  for (const char* pragma :
       {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON"}) {
    char* err = nullptr;
    if (sqlite3_exec(db, pragma, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "unknown error";
      sqlite3_free(err);
      return Unavailable("cannot open database " + path + ": " + pragma + ": " + msg);
    }
  }
  return std::unique_ptr<SqlBackend>(std::move(backend));
}

}  // namespace pare::server
