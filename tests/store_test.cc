// The store's contract (job state machine, leases, quotas, truthful errors), driven by an
// injected clock, on every backend: SQLite in a temporary folder, and PostgreSQL started by the
// test from Debian's packages (store_pg_test: SKIPPED where there is no PostgreSQL).
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <set>
#include <thread>

#include "common/sha256.h"
#include "pg_server.h"
#include "server/blob_store.h"
#include "server/clock.h"
#include "server/pg_backend.h"
#include "server/sql_store.h"
#include "server/sqlite_backend.h"
#include "test_util.h"

namespace pare::server {
namespace {

using pare::testing::PgServer;
using pare::testing::TempDir;

// One PostgreSQL for the whole binary (started on first use); each test gets its own database.
PgServer* Postgres(std::string* why) {
  static std::string reason;
  static std::unique_ptr<PgServer> server = PgServer::Start(&reason);
  *why = reason;
  return server.get();
}

class StoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (postgres()) {
      std::string why;
      pg_ = Postgres(&why);
      if (!pg_) GTEST_SKIP() << "no PostgreSQL to test against: " << why;
      static int n = 0;
      db_ = "store_test_" + std::to_string(++n);
      ASSERT_TRUE(pg_->CreateDatabase(db_)) << db_;
    }
    store_ = Open();
    ASSERT_TRUE(store_);
  }
  bool postgres() const { return GetParam() == "postgresql"; }
  // Another server on the same database (for PostgreSQL, a replica; for SQLite, a second
  // connection to the same file).
  std::unique_ptr<Store> Open() {
    auto s = OpenStore(postgres() ? pg_->url(db_) : "sqlite", dir_.path());
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return s.ok() ? std::move(s).value() : nullptr;
  }
  JobRecord NewJob(const std::string& id, const std::string& device = "auto",
                   const std::string& request_id = "", Store* store = nullptr) {
    JobRecord j;
    j.id = id;
    j.tenant = "t1";
    j.model_id = "mdl_1";
    j.recipe_pb = std::string("\x0a\x00", 2);
    j.device = device;
    j.request_id = request_id;
    j.max_attempts = 3;
    j.created_ms = clock_.NowMs();
    auto r = (store ? store : store_.get())->CreateJob(j);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r->first : JobRecord{};
  }
  std::optional<JobRecord> Lease(const std::string& worker, bool cuda = false,
                                 const std::string& lease = "L") {
    auto r = store_->LeaseJob(worker, cuda, lease, clock_.NowMs(), kTtl);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r.value() : std::nullopt;
  }

  static constexpr int64_t kTtl = 10000;
  TempDir dir_;
  FakeClock clock_;
  PgServer* pg_ = nullptr;
  std::string db_;
  std::unique_ptr<Store> store_;
};

INSTANTIATE_TEST_SUITE_P(Backends, StoreTest, ::testing::Values("sqlite", "postgresql"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST_P(StoreTest, SubmitIsIdempotentOnRequestId) {
  JobRecord a = NewJob("job_a", "auto", "req-1");
  JobRecord j = a;  // the same request again (a client's retry)
  j.id = "job_b";
  auto again = store_->CreateJob(j);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->second);
  EXPECT_EQ(again->first.id, "job_a");
  // The same key for another job is refused, naming the job that holds it.
  j.model_id = "mdl_other";
  auto other_job = store_->CreateJob(j);
  EXPECT_EQ(other_job.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(other_job.status().message().find("job_a"), std::string::npos) << other_job.status().message();
  // The same request id in another tenant is another job.
  j.tenant = "t2";
  auto other = store_->CreateJob(j);
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->second);
  EXPECT_EQ(store_->GetJob("t2", "job_a").status().code(), Code::kNotFound);
  EXPECT_EQ(a.state, JobState::kQueued);
}

TEST_P(StoreTest, LeasesOldestFirstAndRespectsDevice) {
  NewJob("job_gpu", "cuda");
  NewJob("job_cpu", "cpu");
  auto queued = store_->QueuedByDevice();  // what worker autoscaling follows
  ASSERT_TRUE(queued.ok());
  EXPECT_EQ(queued.value(), (std::map<std::string, int64_t>{{"cpu", 1}, {"cuda", 1}}));
  auto first = Lease("w1", /*cuda=*/false);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->id, "job_cpu");  // a CPU worker skips the cuda job
  EXPECT_EQ(first->state, JobState::kRunning);
  EXPECT_EQ(first->attempts, 1);
  EXPECT_EQ(first->lease_expires_ms, clock_.NowMs() + kTtl);
  EXPECT_FALSE(Lease("w1", false).has_value());
  auto gpu = Lease("w2", /*cuda=*/true, "L2");
  ASSERT_TRUE(gpu.has_value());
  EXPECT_EQ(gpu->id, "job_gpu");
}

TEST_P(StoreTest, HeartbeatExtendsTheLeaseAndExpiryRequeues) {
  NewJob("job_1");
  auto j = Lease("w1");
  ASSERT_TRUE(j.has_value());
  clock_.Advance(kTtl - 1);
  ASSERT_TRUE(store_->Heartbeat("job_1", "L", "progress", clock_.NowMs(), kTtl).ok());
  clock_.Advance(kTtl - 1);
  auto none = store_->ExpireLeases(clock_.NowMs());
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());  // the heartbeat kept it alive
  clock_.Advance(2);
  auto expired = store_->ExpireLeases(clock_.NowMs());
  ASSERT_TRUE(expired.ok());
  ASSERT_EQ(expired->size(), 1u);
  EXPECT_EQ((*expired)[0].state, JobState::kQueued);
  EXPECT_EQ((*expired)[0].attempts, 1);
  // The old lease is dead: heartbeats and completion with it are refused.
  EXPECT_EQ(store_->Heartbeat("job_1", "L", "", clock_.NowMs(), kTtl).status().code(),
            Code::kFailedPrecondition);
  auto again = Lease("w2", false, "L2");
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->attempts, 2);
  JobOutcome ok;
  ok.state = JobState::kSucceeded;
  EXPECT_EQ(store_->CompleteJob("job_1", "L", ok, clock_.NowMs()).status().code(), Code::kFailedPrecondition);
  auto done = store_->CompleteJob("job_1", "L2", ok, clock_.NowMs());
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state, JobState::kSucceeded);
  EXPECT_EQ(done->attempts, 2);
}

TEST_P(StoreTest, FailsAfterMaxAttemptsWithAReason) {
  NewJob("job_1");
  for (int attempt = 1; attempt <= 3; ++attempt) {
    auto j = Lease("w" + std::to_string(attempt), false, "L" + std::to_string(attempt));
    ASSERT_TRUE(j.has_value()) << attempt;
    clock_.Advance(kTtl + 1);
    ASSERT_TRUE(store_->ExpireLeases(clock_.NowMs()).ok());
  }
  auto j = store_->GetJob("t1", "job_1");
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j->state, JobState::kFailed);
  EXPECT_EQ(j->attempts, 3);
  EXPECT_EQ(j->error_reason, "LEASE_EXPIRED");
  EXPECT_NE(j->error_message.find("3 attempts"), std::string::npos) << j->error_message;
  EXPECT_FALSE(Lease("w9").has_value());
}

TEST_P(StoreTest, CancelQueuedAtOnceRunningThroughTheWorker) {
  NewJob("job_q");
  auto q = store_->CancelJob("t1", "job_q", clock_.NowMs());
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->state, JobState::kCancelled);
  EXPECT_FALSE(Lease("w1").has_value());

  NewJob("job_r");
  ASSERT_TRUE(Lease("w1").has_value());
  auto r = store_->CancelJob("t1", "job_r", clock_.NowMs());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->state, JobState::kRunning);
  EXPECT_TRUE(r->cancel_requested);
  auto hb = store_->Heartbeat("job_r", "L", "", clock_.NowMs(), kTtl);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->cancel_requested);  // the worker learns it here
  // A worker that died after the cancel leaves the job CANCELLED, not requeued.
  clock_.Advance(kTtl + 1);
  auto expired = store_->ExpireLeases(clock_.NowMs());
  ASSERT_TRUE(expired.ok());
  ASSERT_EQ(expired->size(), 1u);
  EXPECT_EQ((*expired)[0].state, JobState::kCancelled);
  EXPECT_EQ(store_->CancelJob("t1", "job_nope", clock_.NowMs()).status().code(), Code::kNotFound);
}

TEST_P(StoreTest, HandBackDoesNotCountAnAttempt) {
  NewJob("job_1");
  ASSERT_TRUE(Lease("w1").has_value());
  JobOutcome back;
  back.state = JobState::kQueued;
  auto j = store_->CompleteJob("job_1", "L", back, clock_.NowMs());
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j->state, JobState::kQueued);
  EXPECT_EQ(j->attempts, 0);
}

TEST_P(StoreTest, SucceededJobsCannotBeCancelledAndListPages) {
  for (int i = 0; i < 5; ++i) NewJob("job_" + std::to_string(i));
  ASSERT_TRUE(Lease("w1").has_value());
  JobOutcome ok;
  ok.state = JobState::kSucceeded;
  ok.result_sha256 = std::string(64, 'a');
  ASSERT_TRUE(store_->CompleteJob("job_0", "L", ok, clock_.NowMs()).ok());
  EXPECT_EQ(store_->CancelJob("t1", "job_0", clock_.NowMs()).status().code(), Code::kFailedPrecondition);
  auto page1 = store_->ListJobs("t1", 0, 2);
  ASSERT_TRUE(page1.ok());
  ASSERT_EQ(page1->size(), 2u);
  auto page2 = store_->ListJobs("t1", page1->back().seq, 10);
  ASSERT_TRUE(page2.ok());
  ASSERT_EQ(page2->size(), 3u);
  EXPECT_EQ((*page2)[0].id, "job_2");
  EXPECT_EQ(store_->ListJobs("t2", 0, 10)->size(), 0u);
}

TEST_P(StoreTest, StateSurvivesReopening) {
  NewJob("job_1");
  ModelRecord m{"mdl_1", "t1", "resnet", std::string(64, 'b'), 123, {1, 3, 224, 224}, {}, 5};
  ASSERT_TRUE(store_->PutModel(m).ok());
  ModelRecord pair{
      "mdl_2", "t1", "siamese", std::string(64, 'c'), 456, {1, 3, 32, 32}, {{1, 3, 32, 32}, {1, 8}}, 6};
  ASSERT_TRUE(store_->PutModel(pair).ok());
  store_.reset();
  store_ = Open();
  auto j = store_->GetJob("t1", "job_1");
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j->state, JobState::kQueued);
  auto back = store_->GetModel("t1", "mdl_1");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->input_shape, (std::vector<int64_t>{1, 3, 224, 224}));
  EXPECT_TRUE(back->more_input_shapes.empty());
  auto two = store_->GetModel("t1", "mdl_2");
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->input_shape, (std::vector<int64_t>{1, 3, 32, 32}));
  EXPECT_EQ(two->more_input_shapes, (std::vector<std::vector<int64_t>>{{1, 3, 32, 32}, {1, 8}}));
  EXPECT_EQ(store_->GetModel("t2", "mdl_1").status().code(), Code::kNotFound);
  auto recent = store_->RecentModelDigests(1);  // what a replica checks its blob folder against
  ASSERT_TRUE(recent.ok());
  EXPECT_EQ(recent.value(), std::vector<std::string>{std::string(64, 'c')});
}

TEST_P(StoreTest, UploadsThroughTwoServersCannotPassTheQuotaTogether) {
  auto other = Open();
  ASSERT_TRUE(other);
  constexpr uint64_t kQuota = 450, kSize = 100;  // room for 4 uploads
  std::atomic<int> stored{0}, refused{0}, failed{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 12; ++i) {
    threads.emplace_back([&, i] {
      Store* s = i % 2 ? other.get() : store_.get();
      ModelRecord m{"mdl_" + std::to_string(i), "t1", "m", std::string(64, 'a'), kSize, {1, 3, 8, 8}, {}, 1};
      Status st = s->PutModel(m, kQuota);
      if (st.ok())
        ++stored;
      else if (st.code() == Code::kResourceExhausted && st.message().find("quota") != std::string::npos)
        ++refused;
      else
        ++failed;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(stored.load(), 4);
  EXPECT_EQ(refused.load(), 8);
  EXPECT_EQ(failed.load(), 0);
  auto usage = store_->Usage("t1");
  ASSERT_TRUE(usage.ok());
  EXPECT_EQ(usage->stored_bytes, 400u);
  // Another tenant's quota is its own.
  DatasetRecord d{"ds_1", "t2", "d", std::string(64, 'b'), 400, "tensors", 1};
  EXPECT_TRUE(store_->PutDataset(d, kQuota).ok());
}

TEST_P(StoreTest, WorkersLeasingThroughTwoServersNeverShareAJob) {
  constexpr int kJobs = 60;
  for (int i = 0; i < kJobs; ++i) NewJob("job_" + std::to_string(i));
  auto other = Open();
  ASSERT_TRUE(other);
  std::mutex mu;
  std::vector<std::string> leased;
  std::atomic<int> errors{0};
  std::vector<std::thread> workers;
  for (int w = 0; w < 8; ++w) {
    workers.emplace_back([&, w] {
      Store* s = w % 2 ? other.get() : store_.get();
      for (;;) {
        auto r = s->LeaseJob("w" + std::to_string(w), false, "L" + std::to_string(w), clock_.NowMs(), kTtl);
        if (!r.ok()) {
          ++errors;
          return;
        }
        if (!r->has_value()) return;
        std::lock_guard<std::mutex> lock(mu);
        leased.push_back((*r)->id);
      }
    });
  }
  for (auto& t : workers) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(leased.size(), static_cast<size_t>(kJobs));
  EXPECT_EQ(std::set<std::string>(leased.begin(), leased.end()).size(), static_cast<size_t>(kJobs));
  auto counts = store_->CountJobs();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ((*counts)[JobState::kRunning], kJobs);
}

TEST_P(StoreTest, ReapersOnEveryServerExpireALeaseOnce) {
  constexpr int kJobs = 20;
  for (int i = 0; i < kJobs; ++i) NewJob("job_" + std::to_string(i));
  for (int i = 0; i < kJobs; ++i) ASSERT_TRUE(Lease("w", false, "L" + std::to_string(i)).has_value());
  clock_.Advance(kTtl + 1);
  auto other = Open();
  ASSERT_TRUE(other);
  std::vector<JobRecord> a, b;
  std::thread ta([&] { a = store_->ExpireLeases(clock_.NowMs()).value(); });
  std::thread tb([&] { b = other->ExpireLeases(clock_.NowMs()).value(); });
  ta.join();
  tb.join();
  std::multiset<std::string> ids;
  for (const auto& j : a) ids.insert(j.id);
  for (const auto& j : b) ids.insert(j.id);
  EXPECT_EQ(ids.size(), static_cast<size_t>(kJobs));
  EXPECT_EQ(std::set<std::string>(ids.begin(), ids.end()).size(), static_cast<size_t>(kJobs));
  auto counts = store_->CountJobs();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ((*counts)[JobState::kQueued], kJobs);
}

TEST_P(StoreTest, ARetriedSubmitThroughTwoServersMakesOneJob) {
  auto other = Open();
  ASSERT_TRUE(other);
  std::atomic<int> created{0};
  std::mutex mu;
  std::set<std::string> ids;
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      JobRecord j;
      j.id = "job_" + std::to_string(i);
      j.tenant = "t1";
      j.model_id = "mdl_1";
      j.request_id = "req-1";
      j.max_attempts = 3;
      auto r = (i % 2 ? other.get() : store_.get())->CreateJob(j);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      if (r->second) ++created;
      std::lock_guard<std::mutex> lock(mu);
      ids.insert(r->first.id);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(created.load(), 1);
  EXPECT_EQ(ids.size(), 1u);
}

TEST_P(StoreTest, AnUnreachableDatabaseIsUnavailableNotNotFound) {
  NewJob("job_1");
  if (postgres()) {
    ASSERT_TRUE(pg_->Stop());
    for (int i = 0; i < 2; ++i) {  // the pooled connection, then a new one
      auto j = store_->GetJob("t1", "job_1");
      EXPECT_EQ(j.status().code(), Code::kUnavailable) << j.status().ToString();
    }
    EXPECT_EQ(store_->GetModel("t1", "mdl_1").status().code(), Code::kUnavailable);
    EXPECT_EQ(store_->LeaseJob("w", false, "L", clock_.NowMs(), kTtl).status().code(), Code::kUnavailable);
    ASSERT_TRUE(pg_->Restart());
  } else {
    // Another process holds the database's write lock past the busy timeout.
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_.path() + "/pare.db").c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "BEGIN EXCLUSIVE", nullptr, nullptr, nullptr), SQLITE_OK);
    auto j = store_->LeaseJob("w", false, "L", clock_.NowMs(), kTtl);
    EXPECT_EQ(j.status().code(), Code::kUnavailable) << j.status().ToString();
    sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
    sqlite3_close(db);
  }
  // Back without reopening the store: nothing was lost.
  auto j = store_->GetJob("t1", "job_1");
  ASSERT_TRUE(j.ok()) << j.status().ToString();
  EXPECT_EQ(j->state, JobState::kQueued);
  EXPECT_TRUE(Lease("w1").has_value());
  EXPECT_EQ(store_->GetJob("t1", "job_nope").status().code(), Code::kNotFound);
}

TEST_P(StoreTest, TheStoreIsNamedAsUsersWriteIt) {
  EXPECT_TRUE(IsPostgresSpec("PostgreSQL://pare@db:5432/pare"));
  EXPECT_TRUE(IsPostgresSpec("postgres://db/pare"));
  EXPECT_TRUE(IsPostgresSpec("host=db port=5432 dbname=pare user=pare sslmode=require"));
  EXPECT_FALSE(IsPostgresSpec("mysql://db/pare"));
  EXPECT_FALSE(IsPostgresSpec("sqlite"));
  auto bad = OpenStore("mysql://db/pare", dir_.path());
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("--store"), std::string::npos) << bad.status().message();
  EXPECT_EQ(RedactUrl("PostgreSQL://pare:secret@db/pare"), "PostgreSQL://pare:***@db/pare");
  EXPECT_EQ(RedactUrl("host=db password = secret dbname=pare"), "host=db password=*** dbname=pare");
  if (!postgres()) return;
  // The scheme in any case, and libpq's keyword form, reach the same database.
  NewJob("job_1");
  const std::string url = pg_->url(db_);
  for (const std::string& spec :
       {"PostgreSQL" + url.substr(url.find("://")),
        "host=127.0.0.1 port=" + std::to_string(pg_->port()) + " dbname=" + db_ + " user=pare"}) {
    auto other = OpenStore(spec, dir_.path());
    ASSERT_TRUE(other.ok()) << spec << ": " << other.status().ToString();
    EXPECT_TRUE(other.value()->GetJob("t1", "job_1").ok()) << spec;
  }
}

// ---- blobs in the database (--blob-store postgresql; the same SQL runs on SQLite) ----

class DatabaseBlobTest : public StoreTest {
 protected:
  // A connection of its own to the store's database (migrated by SetUp's OpenStore).
  std::unique_ptr<SqlBackend> Backend() {
    auto db = postgres() ? OpenPostgres(pg_->url(db_), "") : OpenSqlite(dir_.path() + "/pare.db");
    EXPECT_TRUE(db.ok()) << db.status().ToString();
    return db.ok() ? std::move(db).value() : nullptr;
  }
  std::unique_ptr<DatabaseBlobStore> Blobs(uint64_t chunk_bytes) {
    auto b = DatabaseBlobStore::Open(Backend(), dir_.path() + "/tmp", /*shared=*/true, chunk_bytes);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    return b.ok() ? std::move(b).value() : nullptr;
  }
  static Result<std::string> Put(BlobStore& blobs, const std::string& content) {
    PARE_ASSIGN_OR_RETURN(auto w, blobs.NewWriter(content.size() + 1));
    for (size_t off = 0; off < content.size(); off += 5)
      PARE_RETURN_IF_ERROR(w->Append(content.data() + off, std::min<size_t>(5, content.size() - off)));
    return w->Commit(content.size(), Sha256::Of(content));
  }
  // Reads a whole blob in reads of `step` bytes (not aligned to chunks).
  static Result<std::string> ReadAll(BlobStore& blobs, const std::string& sha, size_t step) {
    PARE_ASSIGN_OR_RETURN(auto r, blobs.NewReader(sha));
    std::string all, part;
    for (;;) {
      PARE_RETURN_IF_ERROR(r->ReadAt(all.size(), step, &part));
      if (part.empty()) return all;
      all += part;
    }
  }
  int64_t Count(SqlBackend& db, const std::string& table) {
    auto rows =
        InTransaction<SqlRows>(db, [&](SqlTx& tx) { return tx.Query("SELECT COUNT(*) FROM " + table); });
    EXPECT_TRUE(rows.ok()) << rows.status().ToString();
    return rows.ok() ? rows->at(0).Int(0) : -1;
  }
};

INSTANTIATE_TEST_SUITE_P(Backends, DatabaseBlobTest, ::testing::Values("sqlite", "postgresql"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

TEST_P(DatabaseBlobTest, StoresChunksOnceAndReadsThemBackFromAnyOffset) {
  auto blobs = Blobs(/*chunk_bytes=*/7);
  ASSERT_TRUE(blobs);
  // 8 chunks of 7 bytes; chunks 0, 2 and 4 are the same bytes.
  const std::string content = "abcdefg1234567abcdefgXYZ0123abcdefg--ab--cd--ef--the end";
  for (int copy = 0; copy < 2; ++copy) {  // stored once
    auto sha = Put(*blobs, content);
    ASSERT_TRUE(sha.ok()) << sha.status().ToString();
    EXPECT_EQ(sha.value(), Sha256::Of(content));
  }
  const std::string sha = Sha256::Of(content);
  auto db = Backend();
  ASSERT_TRUE(db);
  EXPECT_EQ(Count(*db, "blobs"), 1);
  EXPECT_EQ(Count(*db, "blob_parts"), 8);
  EXPECT_EQ(Count(*db, "blob_chunks"), 6);  // the repeated chunk is kept once
  EXPECT_EQ(pare::testing::CountFiles(blobs->tmp_dir()), 0u);
  EXPECT_EQ(blobs->SizeOf(sha).value(), content.size());
  EXPECT_TRUE(blobs->Has(sha).value());
  EXPECT_FALSE(blobs->Has(Sha256::Of("other")).value());
  EXPECT_EQ(blobs->SizeOf(Sha256::Of("other")).status().code(), Code::kNotFound);
  EXPECT_EQ(blobs->NewReader(Sha256::Of("other")).status().code(), Code::kNotFound);
  for (size_t step : {1, 5, 7, 100}) {
    auto all = ReadAll(*blobs, sha, step);
    ASSERT_TRUE(all.ok()) << step << ": " << all.status().ToString();
    EXPECT_EQ(all.value(), content) << step;
  }
  // A resumed download starts inside a chunk and gets the rest of it.
  auto r = blobs->NewReader(sha);
  ASSERT_TRUE(r.ok());
  std::string part;
  ASSERT_TRUE(r.value()->ReadAt(10, 100, &part).ok());
  EXPECT_EQ(part, content.substr(10, 4));
  ASSERT_TRUE(r.value()->ReadAt(content.size(), 100, &part).ok());
  EXPECT_TRUE(part.empty());
  auto [count, bytes] = blobs->CountAndBytes().value();
  EXPECT_EQ(count, 1u);
  EXPECT_EQ(bytes, content.size());
  // Empty content is a blob too (a report may be empty).
  auto empty = Put(*blobs, "");
  ASSERT_TRUE(empty.ok()) << empty.status().ToString();
  EXPECT_EQ(ReadAll(*blobs, empty.value(), 10).value(), "");
  // A failed check stores nothing.
  auto w = blobs->NewWriter(10);
  ASSERT_TRUE(w.value()->Append("abc", 3).ok());
  EXPECT_EQ(w.value()
                ->Commit(3, "", [](const std::string&) { return InvalidArgument("not a model"); })
                .status()
                .code(),
            Code::kInvalidArgument);
  EXPECT_FALSE(blobs->Has(Sha256::Of("abc")).value());
}

TEST_P(DatabaseBlobTest, BytesChangedInTheDatabaseAreDataLossNotServed) {
  auto blobs = Blobs(/*chunk_bytes=*/4);
  ASSERT_TRUE(blobs);
  const std::string content = "0123456789abcdefWXYZ";  // chunks 0123 4567 89ab cdef WXYZ
  auto sha = Put(*blobs, content);
  ASSERT_TRUE(sha.ok()) << sha.status().ToString();
  auto db = Backend();
  ASSERT_TRUE(db);
  auto exec = [&](const std::string& sql, const SqlParams& params) {
    Status s = db->Transact([&](SqlTx& tx) { return tx.Exec(sql, params).status(); });
    ASSERT_TRUE(s.ok()) << s.ToString();
  };
  // A chunk's bytes changed under its digest: that chunk is refused.
  exec("UPDATE blob_chunks SET data = ? WHERE sha256 = ?", {SqlParam::Blob("89aX"), Sha256::Of("89ab")});
  auto all = ReadAll(*blobs, sha.value(), 4);
  EXPECT_EQ(all.status().code(), Code::kDataLoss) << all.status().ToString();
  auto r = blobs->NewReader(sha.value());
  std::string part;
  EXPECT_TRUE(r.value()->ReadAt(0, 4, &part).ok());  // the chunks before it still read
  EXPECT_EQ(part, "0123");
  // Parts pointing at other (intact) chunks: each chunk checks, but the whole blob does not add
  // up, and its last bytes are not handed out.
  exec("UPDATE blob_chunks SET data = ? WHERE sha256 = ?", {SqlParam::Blob("89ab"), Sha256::Of("89ab")});
  ASSERT_TRUE(ReadAll(*blobs, sha.value(), 4).ok());
  exec("UPDATE blob_parts SET chunk = ? WHERE blob = ? AND idx = 1", {Sha256::Of("cdef"), sha.value()});
  all = ReadAll(*blobs, sha.value(), 4);
  EXPECT_EQ(all.status().code(), Code::kDataLoss) << all.status().ToString();
  EXPECT_NE(all.status().message().find("digest"), std::string::npos) << all.status().message();
  // Uploading the same content again repairs it.
  exec("UPDATE blob_chunks SET data = ? WHERE sha256 = ?", {SqlParam::Blob("89aX"), Sha256::Of("89ab")});
  ASSERT_TRUE(Put(*blobs, content).ok());
  all = ReadAll(*blobs, sha.value(), 4);
  ASSERT_TRUE(all.ok()) << all.status().ToString();
  EXPECT_EQ(all.value(), content);
}

TEST_P(DatabaseBlobTest, TwoServersStoringTheSameContentAtOnceKeepItOnce) {
  auto a = Blobs(1024), b = Blobs(1024);
  ASSERT_TRUE(a && b);
  std::string content(64 * 1024 + 17, 'x');
  for (size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>(i * 131 % 251);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] {
      auto sha = Put(i % 2 ? *a : *b, content);
      if (sha.ok() && sha.value() == Sha256::Of(content)) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 6);
  auto db = Backend();
  ASSERT_TRUE(db);
  EXPECT_EQ(Count(*db, "blobs"), 1);
  EXPECT_EQ(Count(*db, "blob_parts"), 65);
  EXPECT_EQ(ReadAll(*b, Sha256::Of(content), 1024).value(), content);
}

}  // namespace
}  // namespace pare::server
