// Two pare-server replicas on one PostgreSQL (started by the test, as an unprivileged user when
// run as root) and one shared blob folder (or blobs in the database): what is done through one is
// seen through the other, and killing one (kill -9) mid-upload, mid-watch and mid-job loses
// nothing acknowledged.
// Reported SKIPPED where there is no PostgreSQL.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "client/client.h"
#include "common/sha256.h"
#include "pg_server.h"
#include "test_util.h"
#include "worker/recipe_convert.h"

namespace pare {
namespace {

using pare::testing::Fixture;
using pare::testing::PgServer;
using pare::testing::ServerProcess;
using pare::testing::TempDir;

client::Client ClientFor(const std::string& target) {
  client::ClientOptions o;
  o.server = target;
  return client::Client(o);
}

// The health status a readiness probe gets ("pare.readiness"): 1 SERVING, 2 NOT_SERVING, -1 no
// answer. A raw call (grpc.health.v1 messages written by hand: the proto is not installed).
int Readiness(const std::string& address) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  const std::string service = "pare.readiness";
  std::string request = std::string(1, '\x0a') + char(service.size()) + service;  // field 1, string
  grpc::Slice slice(request);
  grpc::ByteBuffer in(&slice, 1), out;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &in, &out, [&](grpc::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = s;
    done = true;
    cv.notify_one();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  if (!status.ok()) return -1;
  std::vector<grpc::Slice> slices;
  if (!out.Dump(&slices).ok()) return -1;
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes.size() == 2 && bytes[0] == '\x08' ? bytes[1] : 0;  // field 1, varint (0 omitted: UNKNOWN)
}

Result<v1::Job> Submit(client::Client& c, const std::string& model_id, const std::string& request_id) {
  v1::SubmitJobRequest req;
  req.set_model_id(model_id);
  req.set_request_id(request_id);
  *req.mutable_recipe() =
      ParseRecipeJson(R"({"steps":[{"prune":{"magnitude":{"amount":0.5,"scope":"GLOBAL"}}}]})").value();
  return c.Submit(req);
}

// Submits through `by` and follows the job through `watch` to its end.
Result<v1::Job> RunToEnd(client::Client& by, client::Client& watch, const std::string& model_id,
                         const std::string& request_id) {
  PARE_ASSIGN_OR_RETURN(auto job, Submit(by, model_id, request_id));
  return watch.Watch(job.id(), nullptr);
}

class ReplicasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    pg_ = PgServer::Start(&why);
    if (!pg_) GTEST_SKIP() << "no PostgreSQL to test against: " << why;
  }
  // A replica on the shared database and blob folder; `workers` local workers; leases of
  // `lease_ttl` seconds.
  std::unique_ptr<ServerProcess> Replica(int workers, int lease_ttl = 3) {
    auto s = std::make_unique<ServerProcess>(
        dir_.path() + "/shared",
        std::vector<std::string>{"--store", pg_->url(), "--local-workers", std::to_string(workers),
                                 "--worker-threads", "1", "--lease-ttl", std::to_string(lease_ttl)});
    s->SetEnv("PARE_TEST_HOLD_JOB", hold_);
    return s;
  }

  // Starts replicas A and B with these many local workers and uploads the small CNN through A.
  void StartBoth(int workers_a, int workers_b, int lease_ttl = 3) {
    a_ = Replica(workers_a, lease_ttl);
    b_ = Replica(workers_b, lease_ttl);
    at_a_ = a_->Start();
    at_b_ = b_->Start();
    ASSERT_FALSE(at_a_.empty());
    ASSERT_FALSE(at_b_.empty());
    auto c = ClientFor(at_a_);
    auto m = c.UploadModel(Fixture("small_cnn.pt"), "cnn", {1, 1, 28, 28});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_ = m.value();
  }

  // Uploads the 43 MB ResNet-18 through `c` (a client of replica A) and kills A with SIGKILL
  // halfway through: the upload fails.
  void KillAMidUpload(client::Client& c) {
    bool killed = false;
    auto cut =
        c.UploadModel(Fixture("resnet18.pt"), "resnet", {1, 3, 64, 64}, [&](uint64_t n, uint64_t total) {
          if (!killed && n > total / 2) {
            a_->Kill(SIGKILL);
            killed = true;
          }
        });
    ASSERT_TRUE(killed);
    EXPECT_FALSE(cut.ok());
  }

  TempDir dir_;
  std::unique_ptr<PgServer> pg_;
  std::unique_ptr<ServerProcess> a_, b_;
  std::string at_a_, at_b_;
  v1::Model model_;
  const std::string hold_ = dir_.path() + "/hold";
};

TEST_F(ReplicasTest, WhatOneReplicaDoesTheOtherSeesAndAKilledOneLosesNothing) {
  // A has no workers: every job runs on B's, so a watch on A follows changes made through B.
  StartBoth(0, 1);
  if (HasFatalFailure()) return;
  const std::string at_a = at_a_, at_b = at_b_;
  auto ca = ClientFor(at_a), cb = ClientFor(at_b);
  const v1::Model* m = &model_;
  // A replica with no worker of its own is ready: on a shared database it serves every call.
  EXPECT_TRUE(pare::testing::Eventually([&] { return Readiness(at_a) == 1; }, 10)) << Readiness(at_a);

  // Uploaded on A; submit on B, watch on A, download from B: byte-identical.
  auto job = Submit(cb, m->id(), "first");
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  auto done = ca.Watch(job->id(), nullptr);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  ASSERT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
  const std::string from_b = dir_.path() + "/from_b.pt", from_a = dir_.path() + "/from_a.pt";
  ASSERT_TRUE(cb.Download(job->id(), v1::MODEL, from_b).ok());
  ASSERT_TRUE(ca.Download(job->id(), v1::MODEL, from_a).ok());
  EXPECT_EQ(Sha256OfFile(from_b), done->result_sha256());
  EXPECT_EQ(Sha256OfFile(from_a), done->result_sha256());
  // The submit is idempotent across replicas.
  auto again = Submit(ca, m->id(), "first");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->id(), job->id());

  // One client for both replicas (gRPC's ipv4 resolver: the first reachable address), as a
  // Kubernetes Service would give. A job held running; a watch on A; A killed mid-upload and
  // mid-watch.
  auto both = ClientFor("ipv4:" + at_a + "," + at_b);
  std::ofstream(hold_) << "held\n";
  auto held = Submit(both, m->id(), "second");
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  ASSERT_TRUE(pare::testing::Eventually(
      [&] {
        auto now = cb.GetJob(held->id());
        return now.ok() && now->state() == v1::RUNNING && now->progress().fraction() > 0;
      },
      60));
  std::atomic<int> updates{0};
  Result<v1::Job> watched = Status(Code::kUnknown, "not watched");
  std::thread watch([&] { watched = both.Watch(held->id(), [&](const v1::Job&) { ++updates; }); });
  ASSERT_TRUE(pare::testing::Eventually([&] { return updates.load() > 0; }, 30));
  KillAMidUpload(ca);
  if (HasFatalFailure()) return;
  std::filesystem::remove(hold_);
  watch.join();
  ASSERT_TRUE(watched.ok()) << watched.status().ToString();
  EXPECT_EQ(watched->state(), v1::SUCCEEDED) << watched->error().message();
  // Everything acknowledged is there through B; the cut upload can be made again.
  auto model = cb.GetModel(m->id());
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  EXPECT_EQ(model->sha256(), m->sha256());
  auto first = cb.GetJob(job->id());
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->state(), v1::SUCCEEDED);
  const std::string second = dir_.path() + "/second.pt";
  ASSERT_TRUE(both.Download(held->id(), v1::MODEL, second).ok());
  EXPECT_EQ(Sha256OfFile(second), watched->result_sha256());
  auto redo = cb.UploadModel(Fixture("resnet18.pt"), "resnet", {1, 3, 64, 64});
  ASSERT_TRUE(redo.ok()) << redo.status().ToString();
  EXPECT_EQ(redo->sha256(), Sha256OfFile(Fixture("resnet18.pt")));
  // A replica on a blob folder of its own would accept uploads whose jobs fail elsewhere: it is
  // refused at start.
  ServerProcess alone(dir_.path() + "/not-shared", {"--store", pg_->url(), "--local-workers", "0"});
  EXPECT_TRUE(alone.Start().empty()) << "a replica started on a folder without the database's blobs";
  // Nor may one keep blobs in the database when the database's models are in a folder.
  ServerProcess in_db(dir_.path() + "/in-db",
                      {"--store", pg_->url(), "--blob-store", "postgresql", "--local-workers", "0"});
  EXPECT_TRUE(in_db.Start().empty()) << "a replica kept blobs in a database whose models are in a folder";
}

// Blobs in the database (--blob-store postgresql): replicas on data folders of their own share
// nothing but PostgreSQL. Uploaded through A, run by B's worker (which fetches the model from
// the database through B), downloaded through both byte-identical; an upload cut by killing A
// leaves no blob behind and is made again through B.
TEST_F(ReplicasTest, BlobsInTheDatabaseNeedNoSharedFolder) {
  auto replica = [&](const std::string& dir, int workers) {
    return std::make_unique<ServerProcess>(
        dir_.path() + "/" + dir,
        std::vector<std::string>{"--store", pg_->url(), "--blob-store", "postgresql", "--local-workers",
                                 std::to_string(workers), "--worker-threads", "1", "--lease-ttl", "3"});
  };
  a_ = replica("a", 0);
  b_ = replica("b", 1);
  const std::string at_a = a_->Start(), at_b = b_->Start();
  ASSERT_FALSE(at_a.empty());
  ASSERT_FALSE(at_b.empty());
  auto ca = ClientFor(at_a), cb = ClientFor(at_b);
  auto m = ca.UploadModel(Fixture("small_cnn.pt"), "cnn", {1, 1, 28, 28});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto done = RunToEnd(cb, ca, m->id(), "in-db");
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  ASSERT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
  for (auto* c : {&ca, &cb}) {
    const std::string out = dir_.path() + "/result.pt";
    ASSERT_TRUE(c->Download(done->id(), v1::MODEL, out).ok());
    EXPECT_EQ(Sha256OfFile(out), done->result_sha256());
    ASSERT_TRUE(c->Download(done->id(), v1::REPORT, out).ok());
    EXPECT_FALSE(Sha256OfFile(out).empty());
  }
  // No blob file on either replica's disk: only uploads in progress pass through DATA/tmp.
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/a/blobs"));
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/b/blobs"));

  // Bytes changed in the database are never served: a download of the result fails DATA_LOSS and
  // keeps nothing to resume from; a job on the model fails DATA_LOSS (not "unavailable"); the
  // model uploaded again repairs it.
  auto corrupt = [&](const std::string& blob) {
    ASSERT_TRUE(pg_->Sql("pare",
                         "UPDATE blob_chunks SET data = overlay(data placing '\\xdeadbeef'::bytea from 10 "
                         "for 4) WHERE sha256 = (SELECT chunk FROM blob_parts WHERE blob = '" +
                             blob + "' AND idx = 0)"));
  };
  corrupt(done->result_sha256());
  const std::string bad = dir_.path() + "/bad.pt";
  auto lost = cb.Download(done->id(), v1::MODEL, bad);
  EXPECT_EQ(lost.code(), Code::kDataLoss) << lost.ToString();
  EXPECT_FALSE(std::filesystem::exists(bad + ".part"));
  EXPECT_FALSE(std::filesystem::exists(bad));
  corrupt(m->sha256());
  auto failed = RunToEnd(cb, cb, m->id(), "on-corrupt");
  ASSERT_TRUE(failed.ok()) << failed.status().ToString();
  EXPECT_EQ(failed->state(), v1::FAILED);
  EXPECT_EQ(failed->error().reason(), "FETCH_FAILED");
  EXPECT_EQ(failed->error().code(), "DATA_LOSS") << failed->error().message();
  auto again = ca.UploadModel(Fixture("small_cnn.pt"), "cnn", {1, 1, 28, 28});
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  auto fine = RunToEnd(cb, cb, again->id(), "repaired");
  ASSERT_TRUE(fine.ok()) << fine.status().ToString();
  EXPECT_EQ(fine->state(), v1::SUCCEEDED) << fine->error().message();

  KillAMidUpload(ca);
  if (HasFatalFailure()) return;
  // A 43 MB model is many chunks; stored through B, it runs on B's worker from the database.
  auto big = cb.UploadModel(Fixture("resnet18.pt"), "resnet", {1, 3, 64, 64});
  ASSERT_TRUE(big.ok()) << big.status().ToString();
  EXPECT_EQ(big->sha256(), Sha256OfFile(Fixture("resnet18.pt")));
  auto pruned_done = RunToEnd(cb, cb, big->id(), "big");
  ASSERT_TRUE(pruned_done.ok()) << pruned_done.status().ToString();
  EXPECT_EQ(pruned_done->state(), v1::SUCCEEDED) << pruned_done->error().message();
  const std::string out = dir_.path() + "/pruned.pt";
  ASSERT_TRUE(cb.Download(pruned_done->id(), v1::MODEL, out).ok());
  EXPECT_EQ(Sha256OfFile(out), pruned_done->result_sha256());
  // A replica on the same database with a store that is not PostgreSQL cannot keep blobs there.
  ServerProcess wrong(dir_.path() + "/c", {"--blob-store", "postgresql", "--local-workers", "0"});
  EXPECT_TRUE(wrong.Start().empty()) << "--blob-store postgresql was accepted on the SQLite store";
  ServerProcess url(dir_.path() + "/d",
                    {"--store", pg_->url(), "--blob-store", pg_->url(), "--local-workers", "0"});
  EXPECT_TRUE(url.Start().empty()) << "--blob-store took a URL for a folder name";
  EXPECT_FALSE(std::filesystem::exists("postgresql:"));  // no folder made of the URL
}

// A worker on each replica, many small jobs submitted through both: every job runs once.
TEST_F(ReplicasTest, WorkersOnTwoReplicasRunEveryJobOnce) {
  // Leases of 10 s: four workers' jobs, two servers and PostgreSQL share the machine with the
  // other tests, and a heartbeat 2 s late on a 3 s lease would run a job twice for the wrong reason.
  StartBoth(2, 2, 10);
  if (HasFatalFailure()) return;
  auto ca = ClientFor(at_a_), cb = ClientFor(at_b_);
  const v1::Model* m = &model_;
  std::vector<std::string> ids;
  for (int i = 0; i < 12; ++i) {
    auto j = Submit(i % 2 ? cb : ca, m->id(), "job-" + std::to_string(i));
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    ids.push_back(j->id());
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string& id = ids[i];
    auto done = (i % 2 ? ca : cb).Watch(id, nullptr);
    ASSERT_TRUE(done.ok()) << done.status().ToString();
    EXPECT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
    EXPECT_EQ(done->attempts(), 1) << id;  // leased once: no two workers took it
  }
}

// Contention: 2 replicas, 8 workers leasing through them at once (bench/control_plane.cc's
// hand-off mode: the worker protocol's Lease and Complete, no model run), 1,000 jobs: each
// leased exactly once (the driver counts the grants by job id), none left unfinished.
TEST_F(ReplicasTest, EightWorkersThroughTwoReplicasLeaseEachOfAThousandJobsOnce) {
  const std::string token = dir_.path() + "/worker-token";
  std::ofstream(token) << "contention-worker-token\n";
  std::vector<std::unique_ptr<ServerProcess>> replicas;
  std::string addresses;
  for (int i = 0; i < 2; ++i) {
    replicas.push_back(std::make_unique<ServerProcess>(
        dir_.path() + "/shared",
        std::vector<std::string>{"--store", pg_->url(), "--local-workers", "0", "--worker-token-file", token,
                                 "--max-queued-jobs", "100000", "--tenant-max-active-jobs", "100000"}));
    const std::string at = replicas.back()->Start();
    ASSERT_FALSE(at.empty());
    addresses += (addresses.empty() ? "" : ",") + at;
  }
  std::string out;
  const int rc = pare::testing::Run(pare::testing::BinDir() + "/bench/pare-control-plane --servers " +
                                        addresses + " --model " + Fixture("small_cnn.pt") +
                                        " --jobs 1000 --workers 8 --worker-token contention-worker-token",
                                    &out);
  EXPECT_EQ(rc, 0) << out;
  // | jobs | workers | servers | seconds | jobs/s | lease grants | duplicate grants | errors | not ended once
  // |
  EXPECT_NE(out.find("| 1000 | 8 | 2 |"), std::string::npos) << out;
  EXPECT_NE(out.find(" | 1000 | 0 | 0 | 0 |"), std::string::npos) << out;
}

// PostgreSQL restarted while jobs run through two replicas, down longer than a lease (a
// failover): calls fail UNAVAILABLE while it is down, work again after without restarting any
// server, and every job ends; the job that was running keeps its worker (no second attempt:
// its heartbeats could not land, which is not its worker's fault).
TEST_F(ReplicasTest, ADatabaseRestartUnderLoadLosesNoJob) {
  StartBoth(1, 1);
  if (HasFatalFailure()) return;
  auto ca = ClientFor(at_a_), cb = ClientFor(at_b_);
  const v1::Model* m = &model_;
  std::ofstream(hold_) << "held\n";
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) {
    auto j = Submit(i % 2 ? cb : ca, m->id(), "restart-" + std::to_string(i));
    ASSERT_TRUE(j.ok()) << j.status().ToString();
    ids.push_back(j->id());
  }
  ASSERT_TRUE(pare::testing::Eventually(
      [&] {
        auto now = cb.GetJob(ids[0]);
        return now.ok() && now->state() == v1::RUNNING && now->progress().fraction() > 0;
      },
      60));
  ASSERT_TRUE(pg_->Stop());
  auto down = cb.GetJob(ids[0]);
  EXPECT_EQ(down.status().code(), Code::kUnavailable) << down.status().ToString();
  EXPECT_EQ(down.status().message().find("127.0.0.1"), std::string::npos)  // no database details for clients
      << down.status().message();
  auto refused = Submit(ca, m->id(), "while-down");
  EXPECT_EQ(refused.status().code(), Code::kUnavailable) << refused.status().ToString();
  std::this_thread::sleep_for(std::chrono::seconds(5));  // longer than the 3 s lease
  ASSERT_TRUE(pg_->Restart());
  std::this_thread::sleep_for(std::chrono::seconds(2));  // the reapers run again meanwhile
  std::filesystem::remove(hold_);
  for (const auto& id : ids) {
    auto done = (id == ids[0] ? ca : cb).Watch(id, nullptr);
    ASSERT_TRUE(done.ok()) << id << ": " << done.status().ToString();
    EXPECT_EQ(done->state(), v1::SUCCEEDED) << id << ": " << done->error().message();
    if (id == ids[0]) {
      EXPECT_EQ(done->attempts(), 1) << "the running job was taken from its worker";
    }
  }
  auto after = Submit(cb, m->id(), "after");
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  auto done = ca.Watch(after->id(), nullptr);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->state(), v1::SUCCEEDED);
}

}  // namespace
}  // namespace pare
