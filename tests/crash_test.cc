// pare-server as its own process: kill -9 and restart on the same data, and SIGTERM drain.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/client.h"
#include "common/sha256.h"
#include "test_util.h"
#include "worker/recipe_convert.h"

namespace pare {
namespace {

using pare::testing::Fixture;
using pare::testing::ServerProcess;
using pare::testing::TempDir;

const std::vector<std::string> kWorkerFlags = {"--local-workers", "1", "--worker-threads", "1"};

// Submits `recipe_json` for `model_id` (with `request_id` when given).
Result<v1::Job> SubmitRecipe(client::Client& c, const std::string& model_id, const std::string& recipe_json,
                             const std::string& request_id = "") {
  v1::SubmitJobRequest req;
  req.set_model_id(model_id);
  *req.mutable_recipe() = ParseRecipeJson(recipe_json).value();
  req.set_request_id(request_id);
  return c.Submit(req);
}

client::Client ClientFor(const std::string& address) {
  client::ClientOptions o;
  o.server = address;
  return client::Client(o);
}

TEST(CrashTest, KillNineAfterSuccessLosesNothing) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  std::string model_id, model_sha, job_id, result_sha, result_file = dir.path() + "/first.pt";
  {
    ServerProcess server(data, kWorkerFlags);
    std::string address = server.Start();
    ASSERT_FALSE(address.empty());
    auto c = ClientFor(address);
    auto m = c.UploadModel(Fixture("small_cnn.pt"), "cnn", {1, 1, 28, 28});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    model_id = m->id();
    model_sha = m->sha256();
    auto job = SubmitRecipe(
        c, model_id, R"({"steps":[{"prune":{"magnitude":{"amount":0.5,"scope":"GLOBAL"}}}]})", "crash-test");
    ASSERT_TRUE(job.ok());
    job_id = job->id();
    auto done = c.Watch(job_id, nullptr);
    ASSERT_TRUE(done.ok());
    ASSERT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
    result_sha = done->result_sha256();
    ASSERT_TRUE(c.Download(job_id, v1::MODEL, result_file).ok());
    server.Kill(SIGKILL);
  }
  ServerProcess again(data, kWorkerFlags);
  std::string address = again.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  auto job = c.GetJob(job_id);
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  EXPECT_EQ(job->state(), v1::SUCCEEDED);
  EXPECT_EQ(job->result_sha256(), result_sha);
  EXPECT_EQ(job->reports_size(), 2);
  auto model = c.GetModel(model_id);
  ASSERT_TRUE(model.ok());
  EXPECT_EQ(model->sha256(), model_sha);
  std::string second = dir.path() + "/second.pt";
  ASSERT_TRUE(c.Download(job_id, v1::MODEL, second).ok());
  EXPECT_EQ(Sha256OfFile(second), result_sha);
  EXPECT_EQ(Sha256OfFile(second), Sha256OfFile(result_file));
  // The idempotency key survived too.
  auto same = SubmitRecipe(
      c, model_id, R"({"steps":[{"prune":{"magnitude":{"amount":0.5,"scope":"GLOBAL"}}}]})", "crash-test");
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->id(), job_id);
}

// kill -9 of the server in the middle of an upload and of a download: after a restart every
// acknowledged upload is intact, the cut upload left nothing behind, and the download resumes
// to a byte-identical file.
TEST(CrashTest, KillNineDuringAnUploadAndADownloadLosesNothingAcknowledged) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  const std::string big = Fixture("resnet18.pt");  // 45 MB: many chunks
  const std::string big_sha = Sha256OfFile(big);
  std::string small_id, small_sha;
  {
    ServerProcess server(data, kWorkerFlags);
    std::string address = server.Start();
    ASSERT_FALSE(address.empty());
    auto c = ClientFor(address);
    auto small = c.UploadModel(Fixture("small_cnn.pt"), "cnn", {1, 1, 28, 28});
    ASSERT_TRUE(small.ok()) << small.status().ToString();
    small_id = small->id();
    small_sha = small->sha256();
    bool killed = false;
    auto cut = c.UploadModel(big, "resnet", {1, 3, 64, 64}, [&](uint64_t done, uint64_t total) {
      if (!killed && done > total / 2) {
        server.Kill(SIGKILL);
        killed = true;
      }
    });
    ASSERT_TRUE(killed);
    EXPECT_FALSE(cut.ok());
  }
  ServerProcess again(data, kWorkerFlags);
  std::string address = again.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  auto small = c.GetModel(small_id);
  ASSERT_TRUE(small.ok()) << small.status().ToString();
  EXPECT_EQ(small->sha256(), small_sha);
  EXPECT_TRUE(std::filesystem::exists(data + "/blobs/" + small_sha.substr(0, 2) + "/" + small_sha));
  // Nothing half-written is visible: no blob of the cut upload, no temporary file left.
  EXPECT_FALSE(std::filesystem::exists(data + "/blobs/" + big_sha.substr(0, 2) + "/" + big_sha));
  EXPECT_TRUE(std::filesystem::is_empty(data + "/tmp"));

  // A job with a large result; the server dies a third of the way into its download.
  auto model = c.UploadModel(big, "resnet", {1, 3, 64, 64});
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  auto job = SubmitRecipe(c, model->id(), R"({"steps":[{"prune":{"nm":{"n":2,"m":4}}}]})");
  ASSERT_TRUE(job.ok());
  auto done = c.Watch(job->id(), nullptr);
  ASSERT_TRUE(done.ok());
  ASSERT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
  const std::string out = dir.path() + "/result.pt";
  bool killed = false;
  Status first = c.Download(job->id(), v1::MODEL, out, [&](uint64_t got, uint64_t total) {
    if (!killed && got > total / 3) {
      again.Kill(SIGKILL);
      killed = true;
    }
  });
  ASSERT_TRUE(killed);
  EXPECT_FALSE(first.ok());
  EXPECT_FALSE(std::filesystem::exists(out));  // only the .part, never a wrong final file
  ServerProcess third(data, kWorkerFlags);
  address = third.Start();
  ASSERT_FALSE(address.empty());
  auto c3 = ClientFor(address);
  uint64_t resumed_from = UINT64_MAX;
  Status second = c3.Download(job->id(), v1::MODEL, out,
                              [&](uint64_t got, uint64_t) { resumed_from = std::min(resumed_from, got); });
  ASSERT_TRUE(second.ok()) << second.ToString();
  EXPECT_GT(resumed_from, 0u);  // it went on from the part, not from zero
  EXPECT_EQ(Sha256OfFile(out), done->result_sha256());
}

// A full disk during an upload, made with a file-size limit on the server process (write()
// then fails with EFBIG, as it would with ENOSPC): the upload gets a clear error, nothing of
// it stays, the server keeps serving and earlier data is intact.
// kill -9 of the server while a job runs: after a restart the job's lease runs out, it is
// queued again and a new worker finishes it.
TEST(CrashTest, KillNineDuringAJobAndTheRestartFinishesIt) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  std::vector<std::string> flags = kWorkerFlags;
  flags.insert(flags.end(), {"--lease-ttl", "3"});
  // The job is held running (the worker's test hook) until the server is killed.
  const std::string hold = dir.path() + "/hold";
  std::ofstream(hold) << "held\n";
  std::string job_id;
  {
    ServerProcess server(data, flags);
    server.SetEnv("PARE_TEST_HOLD_JOB", hold);
    std::string address = server.Start();
    ASSERT_FALSE(address.empty());
    auto c = ClientFor(address);
    auto m = c.UploadModel(Fixture("resnet18.pt"), "resnet", {1, 3, 64, 64});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    auto job = SubmitRecipe(c, m->id(), R"({"steps":[{"prune":{"nm":{"n":2,"m":4}}}]})");
    ASSERT_TRUE(job.ok());
    job_id = job->id();
    ASSERT_TRUE(pare::testing::Eventually(
        [&] {
          auto now = c.GetJob(job_id);
          return now.ok() && now->state() == v1::RUNNING && now->progress().fraction() > 0;
        },
        60));
    server.Kill(SIGKILL);
  }
  std::filesystem::remove(hold);
  ServerProcess again(data, flags);
  std::string address = again.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  auto done = c.Watch(job_id, nullptr);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
  EXPECT_GE(done->attempts(), 2);
  std::string out = dir.path() + "/result.pt";
  ASSERT_TRUE(c.Download(job_id, v1::MODEL, out).ok());
  EXPECT_EQ(Sha256OfFile(out), done->result_sha256());
}

TEST(CrashTest, AFullDiskDuringAnUploadFailsItCleanly) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  const std::string launcher = dir.path() + "/small-disk.sh";
  std::ofstream(launcher) << "#!/bin/bash\ntrap '' XFSZ\nulimit -f 20480\nexec \"$@\"\n";  // 20 MiB files
  std::filesystem::permissions(launcher, std::filesystem::perms::owner_all);
  ServerProcess server(data, {"--local-workers", "0"}, launcher);
  std::string address = server.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  auto small = c.UploadModel(Fixture("small_cnn.pt"), "cnn", {1, 1, 28, 28});
  ASSERT_TRUE(small.ok()) << small.status().ToString();
  auto big = c.UploadModel(Fixture("resnet18.pt"), "resnet", {1, 3, 64, 64});  // 45 MB
  ASSERT_FALSE(big.ok());
  EXPECT_NE(big.status().message().find("writing blob"), std::string::npos) << big.status().ToString();
  EXPECT_TRUE(std::filesystem::is_empty(data + "/tmp"));
  // Still serving, earlier data intact.
  auto again = c.GetModel(small->id());
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->sha256(), small->sha256());
  EXPECT_TRUE(c.UploadModel(Fixture("small_cnn_5.pt"), "cnn5", {1, 1, 28, 28}).ok());
}

TEST(CrashTest, SigtermHandsARunningJobBackAndARestartFinishesIt) {
  TempDir dir;
  const std::string data = dir.path() + "/data";
  // The job is held running (the worker's test hook) until the server has drained, so it
  // cannot finish inside half the drain grace however fast the machine is; the hold is lifted
  // before the restart.
  const std::string hold = dir.path() + "/hold";
  std::ofstream(hold) << "held\n";
  const std::vector<std::string> flags = {"--local-workers", "1", "--worker-threads", "1",
                                          "--drain-seconds", "6"};
  std::string job_id;
  {
    ServerProcess server(data, flags);
    server.SetEnv("PARE_TEST_HOLD_JOB", hold);
    std::string address = server.Start();
    ASSERT_FALSE(address.empty());
    auto c = ClientFor(address);
    auto m = c.UploadModel(Fixture("resnet18.pt"), "r18", {1, 3, 224, 224});
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    auto job = SubmitRecipe(
        c, m->id(), R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}},{"prune":{"nm":{"n":2,"m":4}}}]})");
    ASSERT_TRUE(job.ok());
    job_id = job->id();
    ASSERT_TRUE(pare::testing::Eventually(
        [&] {
          auto j = c.GetJob(job_id);
          return j.ok() && j->state() == v1::RUNNING && j->progress().fraction() > 0;
        },
        60));
    int status = server.Terminate();
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
  std::filesystem::remove(hold);
  ServerProcess again(data, flags);
  std::string address = again.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  auto j = c.GetJob(job_id);
  ASSERT_TRUE(j.ok());
  // Handed back, not lost, and the interrupted attempt did not count.
  EXPECT_EQ(j->state(), v1::QUEUED) << v1::JobState_Name(j->state());
  EXPECT_EQ(j->attempts(), 0);
  auto done = c.Watch(job_id, nullptr);
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
  EXPECT_EQ(done->attempts(), 1);
}

TEST(CrashTest, SigtermDrainsAndExitsCleanly) {
  TempDir dir;
  ServerProcess server(dir.path() + "/data", kWorkerFlags);
  std::string address = server.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  ASSERT_TRUE(c.UploadModel(Fixture("small_cnn.pt"), "cnn", {}).ok());
  int status = server.Terminate();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// The local worker (not the job's own process) of a server, found by its parent: -1 if none.
pid_t LocalWorkerOf(pid_t server) {
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    std::getline(stat, line);
    const auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    std::string state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != server) continue;
    std::ifstream cmd(entry.path() / "cmdline");
    std::string args((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    if (args.find("pare-worker") != std::string::npos && args.find("--run-job") == std::string::npos)
      return static_cast<pid_t>(std::stoi(name));
  }
  return -1;
}

// A worker killed in the middle of an auto search: the job's next attempt takes the trials the
// first one checkpointed to the server and runs only the rest.
TEST(CrashTest, AWorkerKilledMidSearchResumesWithoutRerunningFinishedTrials) {
  TempDir dir;
  std::vector<std::string> flags = kWorkerFlags;
  flags.insert(flags.end(), {"--lease-ttl", "3"});
  // The job is held once its third trial starts (two are checkpointed) until the worker is killed.
  const std::string hold = dir.path() + "/hold";
  std::ofstream(hold) << "held\n";
  ServerProcess server(dir.path() + "/data", flags);
  server.SetEnv("PARE_TEST_HOLD_JOB", hold);
  server.SetEnv("PARE_TEST_HOLD_AT", "trial 3");
  std::string address = server.Start();
  ASSERT_FALSE(address.empty());
  auto c = ClientFor(address);
  auto m = c.UploadModel(Fixture("small_cnn_trained.pt"), "cnn", {1, 1, 28, 28});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  auto eval = c.UploadDataset(Fixture("quadrants_eval.pt"), "tensors", "eval");
  ASSERT_TRUE(eval.ok()) << eval.status().ToString();
  v1::SubmitJobRequest req;
  req.set_model_id(m->id());
  req.set_eval_dataset_id(eval->id());
  *req.mutable_recipe() =
      ParseRecipeJson(
          R"({"steps":[{"auto":{"maxAccuracyDrop":50,"objective":"SIZE","timeBudgetSeconds":300,
                                  "methods":["quantize.static","optimize","prune.channel"]}}]})")
          .value();
  auto job = c.Submit(req);
  ASSERT_TRUE(job.ok()) << job.status().ToString();
  ASSERT_TRUE(pare::testing::Eventually(
      [&] {
        auto now = c.GetJob(job->id());
        return now.ok() && now->progress().message().find("trial 3") != std::string::npos;
      },
      120));
  const pid_t worker = LocalWorkerOf(server.pid());
  ASSERT_GT(worker, 0);
  ASSERT_EQ(::kill(worker, SIGKILL), 0);
  std::filesystem::remove(hold);
  auto done = c.Watch(job->id(), nullptr);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  ASSERT_EQ(done->state(), v1::SUCCEEDED) << done->error().message();
  EXPECT_GE(done->attempts(), 2);
  const std::string report = dir.path() + "/report.json";
  ASSERT_TRUE(c.Download(job->id(), v1::REPORT, report).ok());
  std::ifstream in(report);
  const auto j = nlohmann::json::parse(in);
  const auto& trials = j["search"]["trials"];
  // Trials 1 and 2 come from the first attempt's checkpoint; the rest ran once, in the second.
  EXPECT_EQ(j["search"]["resumed_trials"].get<int>(), 2) << j["search"].dump(2);
  ASSERT_GE(trials.size(), 4u);
  std::set<std::string> keys;
  for (size_t i = 1; i < trials.size(); ++i) {
    EXPECT_EQ(trials[i]["resumed"].get<bool>(), i <= 2) << trials[i].dump(2);
    EXPECT_TRUE(keys.insert(trials[i]["key"].get<std::string>()).second) << "trial run twice: " << i;
  }
}

}  // namespace
}  // namespace pare
