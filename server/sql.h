// What the store's rules (sql_store.cc) need from a database: transactions of statements with
// positional `?` parameters and rows of values. SQLite (sqlite_backend.*) and PostgreSQL
// (pg_backend.*) provide it; where their SQL differs, the backend says so in its SqlDialect.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace pare::server {

// A statement's parameter: an integer, text, bytes or NULL.
struct SqlParam {
  enum class Kind { kNull, kInt, kText, kBlob };
  Kind kind = Kind::kNull;
  int64_t i = 0;
  std::string s;

  SqlParam(int64_t v) : kind(Kind::kInt), i(v) {}                  // NOLINT: implicit, so calls read as lists
  SqlParam(int v) : kind(Kind::kInt), i(v) {}                      // NOLINT
  SqlParam(std::string v) : kind(Kind::kText), s(std::move(v)) {}  // NOLINT
  SqlParam(const char* v) : kind(Kind::kText), s(v) {}             // NOLINT
  static SqlParam Blob(std::string v) {
    SqlParam p(std::move(v));
    p.kind = Kind::kBlob;
    return p;
  }
  static SqlParam Null() { return SqlParam(); }
  static SqlParam NullIfEmpty(const std::string& v) { return v.empty() ? Null() : SqlParam(v); }

 private:
  SqlParam() = default;
};
using SqlParams = std::vector<SqlParam>;

// One row: each value as bytes (integers in decimal, blobs raw), nullopt for NULL.
class SqlRow {
 public:
  explicit SqlRow(std::vector<std::optional<std::string>> values) : values_(std::move(values)) {}
  size_t size() const { return values_.size(); }
  bool IsNull(size_t col) const { return !values_.at(col).has_value(); }
  const std::string& Text(size_t col) const {
    static const std::string kEmpty;
    return values_.at(col) ? *values_[col] : kEmpty;
  }
  int64_t Int(size_t col) const;  // 0 for NULL

 private:
  std::vector<std::optional<std::string>> values_;
};
using SqlRows = std::vector<SqlRow>;

// The statements of one transaction. Errors: UNAVAILABLE when the database cannot be reached
// or is busy, ALREADY_EXISTS for a unique-constraint violation, INTERNAL otherwise; the cause is
// in the message and the server's log.
class SqlTx {
 public:
  virtual ~SqlTx() = default;
  virtual Result<SqlRows> Query(const std::string& sql, const SqlParams& params = {}) = 0;
  // Returns how many rows the statement changed.
  virtual Result<int64_t> Exec(const std::string& sql, const SqlParams& params = {}) = 0;
  // Query for rows of text and bytes columns only (no integers), which PostgreSQL may then send
  // as they are rather than hex-encoded: half the bytes for a blob's chunks.
  virtual Result<SqlRows> QueryBytes(const std::string& sql, const SqlParams& params = {}) {
    return Query(sql, params);
  }
};

// Where the backends' SQL differs.
struct SqlDialect {
  std::string name;     // "sqlite", "postgresql"
  bool shared = false;  // several servers may use the database at once
  // Appended to a SELECT of rows the transaction goes on to change ("" where transactions
  // already run one at a time): other transactions wait for them (for_update) or pass them by
  // (skip_locked: two workers leasing at once take different jobs).
  std::string for_update;
  std::string skip_locked;
  // A statement run first in a transaction that checks a bound and then inserts (quotas,
  // idempotent submit): holds a lock across servers until the transaction ends ("" where writers
  // are serialized anyway). Takes one text parameter, the scope (a tenant, or "jobs").
  std::string scope_lock;
  // Run in a transaction that changed a job, with the job's id: tells every server's Listen
  // (at commit) so their WatchJob streams follow changes made through any of them ("" where
  // there is one server).
  std::string notify;
  // The schema, one script per version (index 0 is version 1).
  std::vector<std::string> schema;
};

// What a transaction does: reads only (a lookup: on PostgreSQL its statements run without
// BEGIN/COMMIT, saving two round trips; on SQLite it takes no write lock), or writes.
enum class Access { kRead, kWrite };

class SqlBackend {
 public:
  virtual ~SqlBackend() = default;
  virtual const SqlDialect& dialect() const = 0;
  // Runs `body` in a transaction: committed when it returns OK, rolled back otherwise (its
  // status is returned). A body that lost a deadlock or a serialization conflict is run again.
  virtual Status Transact(const std::function<Status(SqlTx&)>& body, Access access = Access::kWrite) = 0;
  // Calls `changed` with the id of every job a committed transaction (of any server) notified,
  // from a thread of the backend's, until the backend is destroyed; `changed` with an empty id
  // when notifications may have been missed (the connection was lost): every job may have
  // changed. Backends without notifications never call it.
  virtual void Listen(std::function<void(const std::string& job_id)> changed) { (void)changed; }
};

// What callers (any tenant) are told when the database fails: the cause is only in the log.
inline Status DatabaseUnavailable(const std::string& detail = "") {
  return Unavailable("the job database is unavailable" + (detail.empty() ? "" : " (" + detail + ")") +
                     "; retry later (the cause is in pare-server's log)");
}
inline Status DatabaseFailed() {
  return Internal("the job database failed (the cause is in pare-server's log)");
}

// Runs `body` in a transaction of `db`, returning what it produced.
template <typename T, typename F>
Result<T> InTransaction(SqlBackend& db, F&& body, Access access = Access::kWrite) {
  std::optional<T> out;
  Status s = db.Transact(
      [&](SqlTx& tx) -> Status {
        Result<T> r = body(tx);
        if (!r.ok()) return r.status();
        out = std::move(r).value();
        return Status::Ok();
      },
      access);
  if (!s.ok()) return s;
  return std::move(*out);
}

}  // namespace pare::server
