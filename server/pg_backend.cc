#include "server/pg_backend.h"

#include <libpq-fe.h>
#include <spdlog/spdlog.h>

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <regex>
#include <thread>

#include "common/logging.h"

namespace pare::server {
namespace {

constexpr Oid kByteaOid = 17;  // pg_type.oid of bytea (fixed in PostgreSQL's catalog)
constexpr int kMaxAttempts = 5;

const char* kSchemaV1 = R"SQL(
CREATE TABLE models (
  id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
  size_bytes BIGINT NOT NULL, input_shape TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE INDEX models_by_tenant ON models (tenant);
CREATE TABLE datasets (
  id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
  size_bytes BIGINT NOT NULL, format TEXT NOT NULL, created_ms BIGINT NOT NULL);
CREATE INDEX datasets_by_tenant ON datasets (tenant);
CREATE TABLE jobs (
  seq BIGSERIAL PRIMARY KEY,
  id TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, request_id TEXT,
  model_id TEXT NOT NULL, recipe BYTEA NOT NULL,
  calibration_dataset_id TEXT NOT NULL, train_dataset_id TEXT NOT NULL, eval_dataset_id TEXT NOT NULL,
  device TEXT NOT NULL, state BIGINT NOT NULL, attempts BIGINT NOT NULL, max_attempts BIGINT NOT NULL,
  lease_id TEXT NOT NULL DEFAULT '', worker TEXT NOT NULL DEFAULT '', lease_expires_ms BIGINT NOT NULL DEFAULT 0,
  cancel_requested BIGINT NOT NULL DEFAULT 0, progress BYTEA NOT NULL DEFAULT '', reports BYTEA NOT NULL DEFAULT '',
  error_code TEXT NOT NULL DEFAULT '', error_reason TEXT NOT NULL DEFAULT '', error_message TEXT NOT NULL DEFAULT '',
  result_sha256 TEXT NOT NULL DEFAULT '', result_size_bytes BIGINT NOT NULL DEFAULT 0,
  report_sha256 TEXT NOT NULL DEFAULT '',
  created_ms BIGINT NOT NULL, started_ms BIGINT NOT NULL DEFAULT 0, finished_ms BIGINT NOT NULL DEFAULT 0,
  UNIQUE (tenant, request_id));
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_tenant ON jobs (tenant, seq);
)SQL";
// The same versions as SQLite's, so a version number means the same columns on both.
const char* kSchemaV2 = "ALTER TABLE jobs ADD COLUMN timeout_seconds BIGINT NOT NULL DEFAULT 0;";
const char* kSchemaV3 = "ALTER TABLE jobs ADD COLUMN checkpoint BYTEA NOT NULL DEFAULT '';";
// Blobs in the database (--blob-store postgresql). Chunk bytes are stored out of line and
// uncompressed (STORAGE EXTERNAL): model weights and gzip'd datasets do not compress, and
// PostgreSQL would spend CPU trying on every write.
const char* kSchemaV4 = R"SQL(
CREATE TABLE blobs (
  sha256 TEXT PRIMARY KEY, size_bytes BIGINT NOT NULL, chunk_bytes BIGINT NOT NULL, created_ms BIGINT NOT NULL);
CREATE TABLE blob_chunks (sha256 TEXT PRIMARY KEY, size_bytes BIGINT NOT NULL, data BYTEA NOT NULL);
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE blob_parts (
  blob TEXT NOT NULL REFERENCES blobs (sha256), idx BIGINT NOT NULL,
  chunk TEXT NOT NULL REFERENCES blob_chunks (sha256), PRIMARY KEY (blob, idx));
)SQL";

// `?` placeholders as PostgreSQL's $1, $2, ... (outside quoted literals).
std::string Numbered(const std::string& sql) {
  std::string out;
  out.reserve(sql.size() + 16);
  int n = 0;
  bool quoted = false;
  for (char c : sql) {
    if (c == '\'') quoted = !quoted;
    if (c == '?' && !quoted) {
      out += "$" + std::to_string(++n);
    } else {
      out += c;
    }
  }
  return out;
}

bool Retryable(const std::string& state) { return state == "40001" || state == "40P01"; }

// The database cannot be reached or refuses work for now: connection failures (08), shutting
// down or restarting (57P01-57P03), out of resources (53).
bool Unreachable(const std::string& state) {
  return state.rfind("08", 0) == 0 || state.rfind("57P0", 0) == 0 || state.rfind("53", 0) == 0;
}

std::string OneLine(const char* message) {
  std::string s = message ? message : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (char& c : s) {
    if (c == '\n') c = ' ';
  }
  return s;
}

class PgTx final : public SqlTx {
 public:
  explicit PgTx(PGconn* conn) : conn_(conn) {}

  Result<SqlRows> Query(const std::string& sql, const SqlParams& params) override {
    SqlRows rows;
    PARE_RETURN_IF_ERROR(Run(sql, params, &rows, nullptr));
    return rows;
  }
  Result<SqlRows> QueryBytes(const std::string& sql, const SqlParams& params) override {
    SqlRows rows;
    PARE_RETURN_IF_ERROR(Run(sql, params, &rows, nullptr, /*binary=*/true));
    return rows;
  }
  Result<int64_t> Exec(const std::string& sql, const SqlParams& params) override {
    int64_t changed = 0;
    PARE_RETURN_IF_ERROR(Run(sql, params, nullptr, &changed));
    return changed;
  }

  // Whether a statement failed for a conflict the transaction can be run again for.
  bool retry() const { return retry_; }
  // Whether the connection broke (then it is dropped, not returned to the pool).
  bool broken() const { return PQstatus(conn_) != CONNECTION_OK; }

  // Runs a statement of its own (BEGIN, COMMIT, ROLLBACK).
  Status Command(const char* sql) {
    Status s = Run(sql, {}, nullptr, nullptr);
    if (s.ok() && std::string(sql) == "BEGIN") began_ = true;
    return s;
  }
  // Whether BEGIN succeeded (then a failure after it may have happened mid-transaction).
  bool began() const { return began_; }

 private:
  // `binary`: results in PostgreSQL's binary format (text and bytea columns come as their bytes).
  Status Run(const std::string& sql, const SqlParams& params, SqlRows* rows, int64_t* changed,
             bool binary = false) {
    PGresult* raw;
    if (params.empty() && !binary) {
      raw = PQexec(conn_, sql.c_str());  // schema scripts hold several statements
    } else {
      std::vector<const char*> values;
      std::vector<int> lengths, formats;
      std::vector<std::string> ints;
      ints.reserve(params.size());
      for (const SqlParam& p : params) {
        switch (p.kind) {
          case SqlParam::Kind::kNull: values.push_back(nullptr); break;
          case SqlParam::Kind::kInt:
            ints.push_back(std::to_string(p.i));
            values.push_back(ints.back().c_str());
            break;
          case SqlParam::Kind::kText:
          case SqlParam::Kind::kBlob: values.push_back(p.s.data()); break;
        }
        lengths.push_back(static_cast<int>(p.s.size()));
        formats.push_back(p.kind == SqlParam::Kind::kBlob ? 1 : 0);  // bytes as they are
      }
      raw = PQexecParams(conn_, Numbered(sql).c_str(), static_cast<int>(params.size()), nullptr,
                         values.data(), lengths.data(), formats.data(), /*resultFormat=*/binary ? 1 : 0);
    }
    std::unique_ptr<PGresult, void (*)(PGresult*)> res(raw, PQclear);
    const ExecStatusType st = res ? PQresultStatus(res.get()) : PGRES_FATAL_ERROR;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) return Failure(res.get(), sql);
    if (changed) {
      const char* n = PQcmdTuples(res.get());
      *changed = (n && *n) ? std::stoll(n) : 0;
    }
    if (rows) {
      const int nrows = PQntuples(res.get()), ncols = PQnfields(res.get());
      for (int r = 0; r < nrows; ++r) {
        std::vector<std::optional<std::string>> values;
        for (int c = 0; c < ncols; ++c) {
          if (PQgetisnull(res.get(), r, c)) {
            values.emplace_back();
          } else if (!binary && PQftype(res.get(), c) == kByteaOid) {
            size_t size = 0;
            unsigned char* bytes =
                PQunescapeBytea(reinterpret_cast<const unsigned char*>(PQgetvalue(res.get(), r, c)), &size);
            if (!bytes) return Internal("database error: cannot decode a bytea value");
            values.emplace_back(std::string(reinterpret_cast<char*>(bytes), size));
            PQfreemem(bytes);
          } else {
            values.emplace_back(
                std::string(PQgetvalue(res.get(), r, c), static_cast<size_t>(PQgetlength(res.get(), r, c))));
          }
        }
        rows->emplace_back(std::move(values));
      }
    }
    return Status::Ok();
  }

  Status Failure(PGresult* res, const std::string& sql) {
    const char* code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : nullptr;
    const std::string state = code ? code : "";
    const std::string message = OneLine(res ? PQresultErrorMessage(res) : PQerrorMessage(conn_));
    std::string first_words = sql.substr(0, sql.find_first_of("(\n"));
    if (first_words.size() > 60) first_words.resize(60);
    const std::string cause =
        message + " (SQLSTATE " + (state.empty() ? "none" : state) + ", in: " + first_words + ")";
    if (state == "23505") return Status(Code::kAlreadyExists, cause);
    if (Retryable(state)) {
      retry_ = true;
      return DatabaseUnavailable("conflicting transactions; " + state);
    }
    // The cause is for the operator (the log); callers, who may be any tenant, get no database
    // details.
    spdlog::error(Kv({{"msg", "store: database error"}, {"backend", "postgresql"}, {"cause", cause}}));
    if (broken() || Unreachable(state)) return DatabaseUnavailable();
    if (state.rfind("22", 0) == 0) return InvalidArgument("the database refused a value: " + message);
    return DatabaseFailed();
  }

  PGconn* conn_;
  bool retry_ = false;
  bool began_ = false;
};

class PgBackend final : public SqlBackend {
 public:
  PgBackend(std::string url, std::string password, int pool_size)
      : url_(std::move(url)), password_(std::move(password)), pool_size_(pool_size) {
    dialect_.name = "postgresql";
    dialect_.shared = true;
    dialect_.for_update = " FOR UPDATE";
    dialect_.skip_locked = " FOR UPDATE SKIP LOCKED";
    // Transaction-scoped: released at commit or rollback, or when the connection dies.
    dialect_.scope_lock = "SELECT pg_advisory_xact_lock(7251, hashtext(?))";
    dialect_.notify = "SELECT pg_notify('pare_jobs', ?)";
    dialect_.schema = {kSchemaV1, kSchemaV2, kSchemaV3, kSchemaV4};
  }
  ~PgBackend() override {
    stop_ = true;
    if (listener_.joinable()) listener_.join();
    for (PGconn* c : idle_) PQfinish(c);
  }

  void Listen(std::function<void(const std::string& job_id)> changed) override {
    if (listener_.joinable()) return;
    listener_ = std::thread([this, changed = std::move(changed)] { ListenLoop(changed); });
  }

  const SqlDialect& dialect() const override { return dialect_; }

  Status Transact(const std::function<Status(SqlTx&)>& body, Access access) override {
    const bool write = access == Access::kWrite;
    Status last;
    for (int attempt = 0; attempt < kMaxAttempts; ++attempt) {
      PARE_ASSIGN_OR_RETURN(PGconn * conn, Acquire());
      PgTx tx(conn);
      // A read runs its statements each on its own (no BEGIN/COMMIT round trips); its first
      // statement then finds a stale connection the way BEGIN does.
      Status s = write ? tx.Command("BEGIN") : Status::Ok();
      if (s.ok()) {
        s = body(tx);
        if (s.ok() && write) {
          s = tx.Command("COMMIT");  // a connection lost here leaves the outcome unknown: not retried
        } else if (!s.ok() && write && !tx.broken()) {
          tx.Command("ROLLBACK");
        }
      }
      const bool broken = tx.broken();
      Release(conn, broken);
      if (!s.ok() && broken && (!write || !tx.began())) {
        // The pool's connections outlived the database (a restart, a failover): drop the idle
        // ones too, and go on with a new connection. Nothing was written.
        DropIdle();
        last = s;
        continue;
      }
      if (s.ok() || !tx.retry()) return s;
      last = s;
    }
    return last;
  }

  // The last connection failure's cause (for OpenPostgres's message at start).
  std::string LastConnectError() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_connect_error_;
  }

  void DropIdle() {
    std::lock_guard<std::mutex> lock(mu_);
    for (PGconn* c : idle_) PQfinish(c);
    open_ -= static_cast<int>(idle_.size());
    idle_.clear();
    cv_.notify_all();
  }

  // One connection of its own, LISTENing; the notifications of committed transactions arrive on
  // its socket (no polling of the table). Reconnects after a failure, and then reports that
  // changes may have been missed.
  void ListenLoop(const std::function<void(const std::string&)>& changed) {
    bool missed = false;
    auto pause = std::chrono::milliseconds(200);
    while (!stop_) {
      auto conn = Connect();
      if (conn.ok()) {
        PGconn* c = conn.value();
        PgTx tx(c);
        if (tx.Command("LISTEN pare_jobs").ok()) {
          pause = std::chrono::milliseconds(200);
          if (missed) changed("");
          missed = true;
          while (!stop_) {
            pollfd fd{PQsocket(c), POLLIN, 0};
            if (poll(&fd, 1, 250) < 0 && errno != EINTR) break;
            if (!PQconsumeInput(c)) break;
            while (PGnotify* n = PQnotifies(c)) {
              const std::string id = n->extra ? n->extra : "";
              PQfreemem(n);
              if (!id.empty()) changed(id);
            }
          }
          if (!stop_) {
            spdlog::warn(
                Kv({{"msg", "store: lost the connection that listens for job changes; reconnecting"}}));
          }
        }
        PQfinish(c);
      }
      for (auto waited = std::chrono::milliseconds(0); waited < pause && !stop_;
           waited += std::chrono::milliseconds(50)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      pause = std::min(pause * 2, std::chrono::milliseconds(5000));
    }
  }

  // A connection from the pool, or a new one while the pool is not full.
  Result<PGconn*> Acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !idle_.empty() || open_ < pool_size_; });
    if (!idle_.empty()) {
      PGconn* c = idle_.back();
      idle_.pop_back();
      return c;
    }
    ++open_;
    lock.unlock();
    auto c = Connect();
    if (!c.ok()) {
      lock.lock();
      --open_;
      cv_.notify_one();
    }
    return c;
  }

  void Release(PGconn* conn, bool broken) {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken) {
      PQfinish(conn);
      --open_;
    } else {
      idle_.push_back(conn);
    }
    cv_.notify_one();
  }

  Result<PGconn*> Connect() {
    std::vector<const char*> keys{"dbname", "application_name", "connect_timeout"};
    std::vector<const char*> values{url_.c_str(), "pare-server", "5"};
    if (!password_.empty()) {
      keys.push_back("password");
      values.push_back(password_.c_str());
    }
    keys.push_back(nullptr);
    values.push_back(nullptr);
    PGconn* c = PQconnectdbParams(keys.data(), values.data(), /*expand_dbname=*/1);
    if (!c || PQstatus(c) != CONNECTION_OK) {
      const std::string why = c ? OneLine(PQerrorMessage(c)) : "out of memory";
      PQfinish(c);
      if (reachable_.exchange(false)) {  // once per outage, not once per call
        spdlog::error(
            Kv({{"msg", "store: cannot connect to the database"}, {"url", RedactUrl(url_)}, {"cause", why}}));
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        last_connect_error_ = why;
      }
      return DatabaseUnavailable();
    }
    if (!reachable_.exchange(true)) {
      spdlog::info(Kv({{"msg", "store: connected to the database again"}, {"url", RedactUrl(url_)}}));
    }
    // Notices ("relation ... already exists, skipping") are for people at a psql prompt.
    PQsetNoticeProcessor(
        c,
        [](void*, const char* message) {
          spdlog::debug(Kv({{"msg", "store: postgresql notice"}, {"notice", OneLine(message)}}));
        },
        nullptr);
    return c;
  }

 private:
  const std::string url_, password_;
  const int pool_size_;
  SqlDialect dialect_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<PGconn*> idle_;  // guarded by mu_
  int open_ = 0;               // connections out of or in the pool; guarded by mu_
  std::atomic<bool> stop_{false};
  std::atomic<bool> reachable_{true};
  std::string last_connect_error_;  // guarded by mu_
  std::thread listener_;
};

}  // namespace

std::string RedactUrl(const std::string& url) {
  static const std::regex kUserPassword(R"(^(postgres(ql)?://[^:@/]*):[^@/]*@)", std::regex::icase);
  static const std::regex kPasswordParam(R"(password\s*=\s*[^&\s]*)", std::regex::icase);
  return std::regex_replace(std::regex_replace(url, kUserPassword, "$1:***@"), kPasswordParam,
                            "password=***");
}

Result<std::unique_ptr<SqlBackend>> OpenPostgres(const std::string& url, const std::string& password,
                                                 int pool_size) {
  if (pool_size < 1) return InvalidArgument("the PostgreSQL connection pool needs at least 1 connection");
  // libpq knows the URL schemes in lower case only; a user may write "PostgreSQL://".
  std::string spec = url;
  const size_t scheme_end = spec.find("://");
  if (scheme_end != std::string::npos) {
    for (size_t i = 0; i < scheme_end; ++i)
      spec[i] = static_cast<char>(std::tolower(static_cast<unsigned char>(spec[i])));
  }
  auto backend = std::make_unique<PgBackend>(spec, password, pool_size);
  auto conn = backend->Acquire();
  if (!conn.ok()) {
    // At start the operator is the reader: the cause, and whether waiting can help. A refused
    // password, a database or role that does not exist, or a bad parameter will not pass.
    const std::string why = backend->LastConnectError();
    for (const char* permanent : {"password authentication failed", "does not exist", "invalid",
                                  "unrecognized", "no password supplied", "SSL", "certificate"}) {
      if (why.find(permanent) != std::string::npos) {
        return FailedPrecondition("the database refused the connection: " + why);
      }
    }
    return Unavailable("cannot reach the database: " + why);
  }
  backend->Release(conn.value(), false);
  return std::unique_ptr<SqlBackend>(std::move(backend));
}

}  // namespace pare::server
