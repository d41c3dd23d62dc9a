// The SQLite store's job state machine and leases, driven by an injected clock.
#include <gtest/gtest.h>

#include "server/clock.h"
#include "server/sqlite_store.h"
#include "test_util.h"

namespace pare::server {
namespace {

using pare::testing::TempDir;

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override { store_ = Open(); }
  std::unique_ptr<SqliteStore> Open() {
    auto s = SqliteStore::Open(dir_.path() + "/pare.db");
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    return std::move(s).value();
  }
  JobRecord NewJob(const std::string& id, const std::string& device = "auto",
                   const std::string& request_id = "") {
    JobRecord j;
    j.id = id;
    j.tenant = "t1";
    j.model_id = "mdl_1";
    j.recipe_pb = std::string("\x0a\x00", 2);
    j.device = device;
    j.request_id = request_id;
    j.max_attempts = 3;
    j.created_ms = clock_.NowMs();
    auto r = store_->CreateJob(j);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r->first;
  }
  std::optional<JobRecord> Lease(const std::string& worker, bool cuda = false,
                                 const std::string& lease = "L") {
    auto r = store_->LeaseJob(worker, cuda, lease, clock_.NowMs(), kTtl);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.value();
  }

  static constexpr int64_t kTtl = 10000;
  TempDir dir_;
  FakeClock clock_;
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(StoreTest, SubmitIsIdempotentOnRequestId) {
  JobRecord a = NewJob("job_a", "auto", "req-1");
  JobRecord j;
  j.id = "job_b";
  j.tenant = "t1";
  j.model_id = "mdl_other";
  j.request_id = "req-1";
  j.created_ms = 1;
  auto again = store_->CreateJob(j);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->second);
  EXPECT_EQ(again->first.id, "job_a");
  // The same request id in another tenant is another job.
  j.tenant = "t2";
  auto other = store_->CreateJob(j);
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->second);
  EXPECT_EQ(store_->GetJob("t2", "job_a").status().code(), Code::kNotFound);
  EXPECT_EQ(a.state, JobState::kQueued);
}

TEST_F(StoreTest, LeasesOldestFirstAndRespectsDevice) {
  NewJob("job_gpu", "cuda");
  NewJob("job_cpu", "cpu");
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

TEST_F(StoreTest, HeartbeatExtendsTheLeaseAndExpiryRequeues) {
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

TEST_F(StoreTest, FailsAfterMaxAttemptsWithAReason) {
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

TEST_F(StoreTest, CancelQueuedAtOnceRunningThroughTheWorker) {
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

TEST_F(StoreTest, HandBackDoesNotCountAnAttempt) {
  NewJob("job_1");
  ASSERT_TRUE(Lease("w1").has_value());
  JobOutcome back;
  back.state = JobState::kQueued;
  auto j = store_->CompleteJob("job_1", "L", back, clock_.NowMs());
  ASSERT_TRUE(j.ok());
  EXPECT_EQ(j->state, JobState::kQueued);
  EXPECT_EQ(j->attempts, 0);
}

TEST_F(StoreTest, SucceededJobsCannotBeCancelledAndListPages) {
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

TEST_F(StoreTest, StateSurvivesReopening) {
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
}

}  // namespace
}  // namespace pare::server
