// The service end to end: an in-process server on port 0 with real pare-worker processes,
// a real SQLite file and real TorchScript models from the fixture script.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <thread>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "client/client.h"
#include "common/protocol.h"
#include "common/sha256.h"
#include "pare/v1/workers.grpc.pb.h"
#include "server/server.h"
#include "test_util.h"
#include "worker/recipe_convert.h"

namespace pare {
namespace {

namespace fs = std::filesystem;
using pare::testing::BinDir;
using pare::testing::CountFiles;
using pare::testing::Eventually;
using pare::testing::Fixture;
using pare::testing::Python;
using pare::testing::TempDir;

v1::Recipe Recipe(const std::string& json) {
  auto r = ParseRecipeJson(json);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.value();
}

class ServiceTest : public ::testing::Test {
 protected:
  void StartServerWith(const std::string& worker_binary) { StartServer({}, 1, worker_binary); }
  void StartServer(std::vector<std::string> worker_args = {}, int workers = 1,
                   std::string worker_binary = "") {
    server::ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.data_dir = dir_.path() + "/data";
    o.local_workers = workers;
    o.worker_binary = worker_binary.empty() ? BinDir() + "/worker/pare-worker" : worker_binary;
    // Quick measurements by default; a test's own flags replace these.
    std::map<std::string, std::string> flags = {
        {"--latency-batches", "1"}, {"--latency-budget", "0.05"}, {"--poll-ms", "100"}, {"--threads", "1"}};
    for (size_t i = 0; i + 1 < worker_args.size(); i += 2) flags[worker_args[i]] = worker_args[i + 1];
    o.worker_threads = std::stoi(flags["--threads"]);
    flags.erase("--threads");
    for (const auto& [flag, value] : flags) {
      o.worker_args.push_back(flag);
      o.worker_args.push_back(value);
    }
    o.limits.lease_ttl_ms = 3000;
    o.reaper_interval_ms = 200;
    o.auth_tokens_file = tokens_file_;
    o.drain_seconds = 5;
    auto s = server::Server::Create(o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    server_ = std::move(s).value();
    ASSERT_TRUE(server_->Start().ok());
    client_ = MakeClient(client_token_);
  }
  std::unique_ptr<client::Client> MakeClient(const std::string& token) {
    client::ClientOptions co;
    co.server = server_->address();
    co.token = token;
    return std::make_unique<client::Client>(co);
  }
  void TearDown() override { server_.reset(); }

  std::string UploadModel(const std::string& fixture, std::vector<int64_t> shape) {
    auto m = client_->UploadModel(Fixture(fixture), fixture, shape);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? m->id() : "";
  }

  v1::Job Submit(const std::string& model, const std::string& recipe, const std::string& eval = "") {
    v1::SubmitJobRequest req;
    req.set_model_id(model);
    *req.mutable_recipe() = Recipe(recipe);
    req.set_eval_dataset_id(eval);
    auto j = client_->Submit(req);
    EXPECT_TRUE(j.ok()) << j.status().ToString();
    return j.ok() ? j.value() : v1::Job();
  }

  v1::Job WaitEnd(const std::string& id, std::vector<v1::JobState>* seen = nullptr) {
    auto j = client_->Watch(id, [&](const v1::Job& u) {
      if (seen && (seen->empty() || seen->back() != u.state())) seen->push_back(u.state());
    });
    EXPECT_TRUE(j.ok()) << j.status().ToString();
    return j.ok() ? j.value() : v1::Job();
  }

  TempDir dir_;
  std::string tokens_file_;  // set before StartServer to turn authentication on
  std::string client_token_;
  std::unique_ptr<server::Server> server_;
  std::unique_ptr<client::Client> client_;
};

TEST_F(ServiceTest, UploadSubmitWatchDownloadAndTheReportMatchesPython) {
  StartServer();
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  auto ds = client_->UploadDataset(Fixture("mnist_like.pt"), "tensors", "eval");
  ASSERT_TRUE(ds.ok()) << ds.status().ToString();
  v1::Job job =
      Submit(model, R"({"steps":[{"prune":{"magnitude":{"amount":0.6,"scope":"LAYER"}}}]})", ds->id());
  std::vector<v1::JobState> seen;
  v1::Job done = WaitEnd(job.id(), &seen);
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error().message();
  EXPECT_EQ(seen.front(), v1::QUEUED);
  EXPECT_NE(std::find(seen.begin(), seen.end(), v1::RUNNING), seen.end());
  EXPECT_EQ(done.attempts(), 1);
  ASSERT_EQ(done.reports_size(), 2);
  EXPECT_EQ(done.reports(0).step(), "original");
  EXPECT_EQ(done.reports(1).step(), "prune.magnitude");
  EXPECT_TRUE(done.reports(1).stats().has_accuracy());

  std::string out = dir_.path() + "/out.pt", report = dir_.path() + "/report.json";
  ASSERT_TRUE(client_->Download(job.id(), v1::MODEL, out).ok());
  ASSERT_TRUE(client_->Download(job.id(), v1::REPORT, report).ok());
  EXPECT_EQ(Sha256OfFile(out), done.result_sha256());
  EXPECT_EQ(fs::file_size(out), done.result_size_bytes());

  // Python PyTorch loads and runs the result; its own counts match the report.
  std::string py;
  std::string cmd = Python() + " -c \"import torch,json;m=torch.jit.load('" + out +
                    "');y=m(torch.randn(3,1,28,28));"
                    "ws=[p for n,p in m.named_parameters() if n.endswith('weight')];"
                    "print(json.dumps({'shape':list(y.shape),'params':sum(p.numel() for p in m.parameters()),"
                    "'nonzero':sum(int((p!=0).sum()) for p in m.parameters()),"
                    "'wsparsity':[1-float((w!=0).sum())/w.numel() for w in ws]}))\"";
  ASSERT_EQ(pare::testing::Run(cmd, &py), 0) << py;
  EXPECT_NE(py.find("\"shape\": [3, 10]"), std::string::npos) << py;
  const auto& stats = done.reports(1).stats();
  EXPECT_NE(py.find("\"params\": " + std::to_string(stats.parameters())), std::string::npos) << py;
  EXPECT_NE(py.find("\"nonzero\": " + std::to_string(stats.nonzero_parameters())), std::string::npos) << py;
  // Every weight lost 60% (to the element: floor(0.6 * n) of n).
  EXPECT_NE(py.find("\"wsparsity\": [0.6, 0.6, 0.6, 0.6]"), std::string::npos) << py;
  std::ifstream rf(report);
  std::string rtext((std::istreambuf_iterator<char>(rf)), std::istreambuf_iterator<char>());
  EXPECT_NE(rtext.find("\"job_id\": \"" + job.id() + "\""), std::string::npos);
  EXPECT_NE(rtext.find("\"layers\""), std::string::npos);
}

TEST_F(ServiceTest, DynamicQuantizationResultRunsInPythonAndAgrees) {
  StartServer();
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  v1::Job done = WaitEnd(Submit(model, R"({"steps":[{"quantize":{"dynamic":{}}}]})").id());
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error().message();
  EXPECT_LT(done.reports(1).stats().size_bytes(), done.reports(0).stats().size_bytes() / 2);
  EXPECT_GT(done.reports(1).stats().output_cosine(), 0.99);
  std::string out = dir_.path() + "/q.pt";
  ASSERT_TRUE(client_->Download(done.id(), v1::MODEL, out).ok());
  std::string py;
  std::string cmd =
      Python() + " -c \"import torch;torch.backends.quantized.engine='onednn';m=torch.jit.load('" + out +
      "');print('linear_dynamic' in str(m.inlined_graph), tuple(m(torch.randn(2,1,28,28)).shape))\"";
  ASSERT_EQ(pare::testing::Run(cmd, &py), 0) << py;
  EXPECT_EQ(py, "True (2, 10)\n");
}

TEST_F(ServiceTest, AKilledWorkerLosesItsLeaseAndTheJobSucceedsOnTheNextOne) {
  // Latency timing long enough that the job is surely still running when its worker dies.
  StartServer({"--latency-budget", "3"});
  std::string model = UploadModel("resnet18.pt", {1, 3, 64, 64});
  // kill -9 at several points: as soon as the job is leased (fetching its inputs), while the
  // original is measured, and after the step, while the result is measured.
  const std::vector<std::pair<const char*, std::function<bool(const v1::Job&)>>> points = {
      {"leased", [](const v1::Job& u) { return u.state() == v1::RUNNING; }},
      {"measuring the original", [](const v1::Job& u) { return u.progress().fraction() > 0; }},
      {"measuring the result", [](const v1::Job& u) { return u.progress().fraction() > 0.5; }}};
  int restarts = 0;
  for (const auto& [name, when] : points) {
    SCOPED_TRACE(name);
    v1::Job job = Submit(model, R"({"steps":[{"prune":{"magnitude":{"amount":0.3,"scope":"GLOBAL"}}}]})");
    bool killed = false;
    auto final_job = client_->Watch(job.id(), [&](const v1::Job& u) {
      if (!killed && u.attempts() == 1 && u.state() == v1::RUNNING && when(u)) {
        auto pids = server_->supervisor()->Pids();
        ASSERT_EQ(pids.size(), 1u);
        ::kill(pids[0], SIGKILL);
        killed = true;
      }
    });
    ASSERT_TRUE(killed);
    ASSERT_TRUE(final_job.ok()) << final_job.status().ToString();
    EXPECT_EQ(final_job->state(), v1::SUCCEEDED) << final_job->error().message();
    EXPECT_EQ(final_job->attempts(), 2);
    EXPECT_GE(server_->supervisor()->restarts(), ++restarts);
  }
}

// The job's own process (pare-worker --run-job) of the worker `worker_pid`, once it exists.
pid_t JobProcessOf(pid_t worker_pid) {
  for (int i = 0; i < 200; ++i) {
    std::ifstream children("/proc/" + std::to_string(worker_pid) + "/task/" + std::to_string(worker_pid) +
                           "/children");
    pid_t child = 0;
    if (children >> child && child > 0) return child;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return 0;
}

TEST_F(ServiceTest, HostileModelsFailTheirJobWithAReasonAndTheWorkerGoesOn) {
  // A 1.5 GiB address-space limit per job process, an 8 s wall-clock limit.
  StartServer({"--job-memory-mb", "1536", "--job-timeout", "8"});
  std::string small = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  const std::string recipe = R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})";

  // Allocates 4 GiB: the limit stops it, not the machine.
  v1::Job hog = WaitEnd(Submit(UploadModel("hog.pt", {1, 1, 28, 28}), recipe).id());
  EXPECT_EQ(hog.state(), v1::FAILED);
  EXPECT_EQ(hog.error().reason(), "JOB_MEMORY_LIMIT") << hog.error().message();

  // Loops for minutes: the wall-clock limit ends it — the worker's (8 s), or the job's own
  // when it asks for less (4 s); more than the server's maximum is refused at submit.
  const std::string slow_model = UploadModel("slow.pt", {1, 1, 28, 28});
  v1::Job slow = WaitEnd(Submit(slow_model, recipe).id());
  EXPECT_EQ(slow.state(), v1::FAILED);
  EXPECT_EQ(slow.error().reason(), "JOB_TIMEOUT") << slow.error().message();
  EXPECT_NE(slow.error().message().find("8 s"), std::string::npos) << slow.error().message();
  v1::SubmitJobRequest timed;
  timed.set_model_id(slow_model);
  *timed.mutable_recipe() = Recipe(recipe);
  timed.set_timeout_seconds(4);
  auto own = client_->Submit(timed);
  ASSERT_TRUE(own.ok()) << own.status().ToString();
  v1::Job own_end = WaitEnd(own->id());
  EXPECT_EQ(own_end.error().reason(), "JOB_TIMEOUT") << own_end.error().message();
  EXPECT_NE(own_end.error().message().find("4 s"), std::string::npos) << own_end.error().message();
  timed.set_timeout_seconds(100000);
  auto too_long = client_->Submit(timed);
  EXPECT_EQ(too_long.status().code(), Code::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("timeout_seconds"), std::string::npos)
      << too_long.status().message();

  // A job process that crashes (SIGSEGV, as a LibTorch fault would) fails only its job.
  v1::Job crashing = Submit(UploadModel("slow.pt", {1, 1, 28, 28}), recipe);
  auto pids = server_->supervisor()->Pids();
  ASSERT_EQ(pids.size(), 1u);
  pid_t job_process = JobProcessOf(pids[0]);
  ASSERT_GT(job_process, 0);
  ::kill(job_process, SIGSEGV);
  v1::Job crashed = WaitEnd(crashing.id());
  EXPECT_EQ(crashed.state(), v1::FAILED);
  EXPECT_EQ(crashed.error().reason(), "JOB_CRASHED") << crashed.error().message();
  EXPECT_NE(crashed.error().message().find("SIGSEGV"), std::string::npos) << crashed.error().message();

  // The same worker process (not restarted) runs the next job.
  v1::Job ok = WaitEnd(Submit(small, recipe).id());
  EXPECT_EQ(ok.state(), v1::SUCCEEDED) << ok.error().message();
  EXPECT_EQ(server_->supervisor()->Pids(), pids);
  EXPECT_EQ(server_->supervisor()->restarts(), 0);
}

TEST_F(ServiceTest, HostileFilesFailTheirJobsWithClearErrorsAndTheServerServes) {
  StartServer();
  const std::string recipe = R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})";
  struct Case {
    const char* model;
    const char* eval;  // dataset fixture, or ""
    const char* reason;
    const char* says;
  };
  for (const Case& k :
       {Case{"unknown_op.pt", "", "MODEL_LOAD", "pare_missing"},
        Case{"evil_pickle.pt", "", "MODEL_LOAD", "os.system"},
        Case{"throws.pt", "", "MODEL_RUN", "this model always fails"},
        Case{"small_cnn.pt", "labels_out_of_range.pt", "BAD_DATASET", "eval labels go up to 50"}}) {
    SCOPED_TRACE(k.model);
    std::string eval;
    if (*k.eval) {
      auto d = client_->UploadDataset(Fixture(k.eval), "tensors", "eval");
      ASSERT_TRUE(d.ok()) << d.status().ToString();
      eval = d->id();
    }
    v1::Job j = WaitEnd(Submit(UploadModel(k.model, {1, 1, 28, 28}), recipe, eval).id());
    EXPECT_EQ(j.state(), v1::FAILED);
    EXPECT_EQ(j.error().reason(), k.reason) << j.error().message();
    EXPECT_NE(j.error().message().find(k.says), std::string::npos) << j.error().message();
  }
  // The server and its worker are fine.
  v1::Job ok = WaitEnd(Submit(UploadModel("small_cnn.pt", {1, 1, 28, 28}), recipe).id());
  EXPECT_EQ(ok.state(), v1::SUCCEEDED) << ok.error().message();
}

// A result the server takes longer than the lease to store (a big model into PostgreSQL): the
// worker's heartbeat goes on while it reports, so the job is not taken from it and run again.
TEST_F(ServiceTest, AnOutcomeSlowerToStoreThanTheLeaseKeepsItsLease) {
  ::setenv("PARE_TEST_COMPLETE_DELAY_MS", "5000", 1);  // the lease lasts 3 s
  StartServer();
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  v1::Job done = WaitEnd(Submit(model, R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})").id());
  ::unsetenv("PARE_TEST_COMPLETE_DELAY_MS");
  EXPECT_EQ(done.state(), v1::SUCCEEDED) << done.error().message();
  EXPECT_EQ(done.attempts(), 1) << "the lease expired while the outcome was stored";
}

TEST_F(ServiceTest, CancelStopsARunningJob) {
  StartServer({"--latency-budget", "3"});
  std::string model = UploadModel("resnet18.pt", {1, 3, 64, 64});
  v1::Job job = Submit(model, R"({"steps":[{"prune":{"magnitude":{"amount":0.3}}}]})");
  bool asked = false;
  auto final_job = client_->Watch(job.id(), [&](const v1::Job& u) {
    if (!asked && u.state() == v1::RUNNING) {
      auto c = client_->Cancel(job.id());
      ASSERT_TRUE(c.ok()) << c.status().ToString();
      asked = true;
    }
  });
  ASSERT_TRUE(final_job.ok());
  EXPECT_EQ(final_job->state(), v1::CANCELLED);
  EXPECT_EQ(final_job->attempts(), 1);
  auto d = client_->Download(job.id(), v1::MODEL, dir_.path() + "/x.pt");
  EXPECT_EQ(d.code(), Code::kFailedPrecondition);
}

TEST_F(ServiceTest, AnUploadCutOffLeavesNothingBehind) {
  StartServer();
  const std::string data_dir = dir_.path() + "/data";
  size_t blobs_before = CountFiles(data_dir + "/blobs");
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = v1::Compression::NewStub(channel);
  grpc::ClientContext ctx;
  v1::Model resp;
  auto writer = stub->UploadModel(&ctx, &resp);
  v1::UploadRequest header;
  header.mutable_header()->set_name("half");
  header.mutable_header()->set_size_bytes(4 << 20);
  ASSERT_TRUE(writer->Write(header));
  v1::UploadRequest chunk;
  chunk.set_chunk(std::string(1 << 20, 'z'));
  ASSERT_TRUE(writer->Write(chunk));
  ASSERT_TRUE(Eventually([&] { return CountFiles(data_dir + "/tmp") == 1; }, 10));  // the part on disk
  ctx.TryCancel();
  EXPECT_FALSE(writer->Finish().ok());
  EXPECT_TRUE(Eventually([&] { return CountFiles(data_dir + "/tmp") == 0; }, 10));
  EXPECT_EQ(CountFiles(data_dir + "/blobs"), blobs_before);
  // Declaring fewer bytes than are sent is refused as the bytes arrive.
  grpc::ClientContext ctx2;
  auto w2 = stub->UploadModel(&ctx2, &resp);
  header.mutable_header()->set_size_bytes(10);
  w2->Write(header);
  w2->Write(chunk);
  w2->WritesDone();
  grpc::Status st = w2->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("size_bytes"), std::string::npos) << st.error_message();
  // A restart on the same data finds no temporary file and keeps serving.
  server_.reset();
  StartServer();
  EXPECT_EQ(CountFiles(data_dir + "/tmp"), 0u);
  EXPECT_FALSE(UploadModel("small_cnn.pt", {1, 1, 28, 28}).empty());
}

TEST_F(ServiceTest, ADownloadResumedFromAnOffsetYieldsTheSameBytes) {
  StartServer();
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  v1::Job done = WaitEnd(Submit(model, R"({"steps":[{"prune":{"nm":{"n":2,"m":4}}}]})").id());
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error().message();
  std::string full = dir_.path() + "/full.pt";
  ASSERT_TRUE(client_->Download(done.id(), v1::MODEL, full).ok());
  std::ifstream in(full, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (size_t cut : {size_t(0), bytes.size() / 3, bytes.size() - 1, bytes.size()}) {
    std::string out = dir_.path() + "/resumed" + std::to_string(cut) + ".pt";
    std::ofstream(out + ".part", std::ios::binary) << bytes.substr(0, cut);
    ASSERT_TRUE(client_->Download(done.id(), v1::MODEL, out).ok()) << cut;
    EXPECT_EQ(Sha256OfFile(out), done.result_sha256()) << cut;
    EXPECT_FALSE(fs::exists(out + ".part"));
  }
  // A corrupt partial file is caught by the digest, not handed over.
  std::string out = dir_.path() + "/corrupt.pt";
  std::string bad = bytes.substr(0, 100);
  bad[10] ^= 1;
  std::ofstream(out + ".part", std::ios::binary) << bad;
  EXPECT_EQ(client_->Download(done.id(), v1::MODEL, out).code(), Code::kDataLoss);
  EXPECT_FALSE(fs::exists(out));
}

TEST_F(ServiceTest, BadUploadsAreRefusedClearlyAndTheServerKeepsServing) {
  StartServer();
  for (const auto& [file, words] :
       std::vector<std::pair<std::string, std::string>>{{"garbage.bin", "not a zip archive"},
                                                        {"truncated.pt", "not a zip archive"},
                                                        {"not_torchscript.zip", "not a PyTorch archive"},
                                                        {"mnist_like.pt", "no TorchScript code"},
                                                        {"zip_slip.pt", "unsafe path"}}) {
    auto m = client_->UploadModel(Fixture(file), file, {});
    EXPECT_EQ(m.status().code(), Code::kInvalidArgument) << file;
    EXPECT_NE(m.status().message().find(words), std::string::npos) << file << ": " << m.status().message();
  }
  auto bad_ds = client_->UploadDataset(Fixture("idx-bad-magic"), "idx", "x");
  EXPECT_EQ(bad_ds.status().code(), Code::kInvalidArgument);
  auto tar = client_->UploadDataset(Fixture("tar_symlink.tar"), "image-folder", "x");
  EXPECT_EQ(tar.status().code(), Code::kInvalidArgument);
  auto bad_format = client_->UploadDataset(Fixture("mnist_like.pt"), "csv", "x");
  EXPECT_NE(bad_format.status().message().find("header.format"), std::string::npos);
  // A name past the protocol's limit is refused by the client before a byte is sent.
  auto long_name = client_->UploadModel(Fixture("small_cnn.pt"), std::string(kMaxNameLength + 1, 'n'), {});
  EXPECT_EQ(long_name.status().code(), Code::kInvalidArgument);
  EXPECT_NE(long_name.status().message().find("longer than 256"), std::string::npos)
      << long_name.status().message();
  EXPECT_EQ(CountFiles(dir_.path() + "/data/tmp"), 0u);
  // A model that throws in forward: the job fails with a reason, the worker lives on.
  std::string throws = UploadModel("throws.pt", {1, 1, 28, 28});
  v1::Job failed = WaitEnd(Submit(throws, R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})").id());
  EXPECT_EQ(failed.state(), v1::FAILED);
  EXPECT_EQ(failed.attempts(), 1);
  EXPECT_EQ(failed.error().reason(), "MODEL_RUN");
  EXPECT_NE(failed.error().message().find("this model always fails"), std::string::npos)
      << failed.error().message();
  std::string good = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  EXPECT_EQ(WaitEnd(Submit(good, R"({"steps":[{"quantize":{"dynamic":{}}}]})").id()).state(), v1::SUCCEEDED);
}

TEST_F(ServiceTest, SubmitValidatesIsIdempotentAndListsInPages) {
  StartServer({}, /*workers=*/0);  // nothing runs: jobs stay queued
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  v1::SubmitJobRequest req;
  req.set_model_id(model);
  *req.mutable_recipe() = Recipe(R"({"steps":[{"factorize":{"rankRatio":1.5}}]})");
  auto bad_field = client_->Submit(req);
  EXPECT_EQ(bad_field.status().code(), Code::kInvalidArgument);
  EXPECT_NE(bad_field.status().message().find("steps[0].factorize.rankRatio"), std::string::npos)
      << bad_field.status().message();
  *req.mutable_recipe() = Recipe(R"({"steps":[{"distill":{"epochs":1,"teacherModel":"mdl_nope"}}]})");
  req.set_train_dataset_id("");
  auto no_teacher = client_->Submit(req);
  EXPECT_NE(no_teacher.status().message().find("distill.teacherModel"), std::string::npos)
      << no_teacher.status().message();
  *req.mutable_recipe() = Recipe(R"({"steps":[{"distill":{"epochs":1}}]})");
  auto no_train = client_->Submit(req);
  EXPECT_EQ(no_train.status().code(), Code::kInvalidArgument);
  EXPECT_NE(no_train.status().message().find("train_dataset_id is required"), std::string::npos);
  *req.mutable_recipe() = Recipe(R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})");
  req.set_model_id("mdl_missing");
  EXPECT_EQ(client_->Submit(req).status().code(), Code::kNotFound);
  req.set_model_id(model);
  req.set_eval_dataset_id("ds_missing");
  auto missing_ds = client_->Submit(req);
  EXPECT_EQ(missing_ds.status().code(), Code::kNotFound);
  EXPECT_NE(missing_ds.status().message().find("eval_dataset_id"), std::string::npos);
  req.set_eval_dataset_id("");
  req.set_device("tpu");
  EXPECT_NE(client_->Submit(req).status().message().find("device"), std::string::npos);
  req.set_device("cpu");
  req.set_request_id("retry-me");
  auto first = client_->Submit(req);
  auto second = client_->Submit(req);
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->id(), second->id());
  req.set_request_id("");
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(client_->Submit(req).ok());
  std::set<std::string> ids;
  std::string token;
  int pages = 0;
  do {
    auto page = client_->ListJobs(2, token);
    ASSERT_TRUE(page.ok());
    for (const auto& j : page->jobs()) ids.insert(j.id());
    token = page->next_page_token();
    ++pages;
  } while (!token.empty());
  EXPECT_EQ(ids.size(), 5u);
  EXPECT_EQ(pages, 3);
  EXPECT_EQ(client_->ListJobs(2, "garbage").status().code(), Code::kInvalidArgument);
  auto cancelled = client_->Cancel(first->id());
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->state(), v1::CANCELLED);
  EXPECT_EQ(client_->GetJob("job_missing").status().code(), Code::kNotFound);
}

TEST_F(ServiceTest, TokensSeparateTenantsAndOnlyWorkersMayLease) {
  const std::string alice = "alice-token-0123456789", bob = "bob-token-0123456789";
  tokens_file_ = dir_.path() + "/tokens";
  std::ofstream(tokens_file_) << "# tenant token\nalice " << alice << "\nbob " << bob << "\n";
  client_token_ = alice;
  StartServer();
  // Alice's job runs on the local worker, which got the worker token through its environment.
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  v1::Job done = WaitEnd(Submit(model, R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})").id());
  ASSERT_EQ(done.state(), v1::SUCCEEDED) << done.error().message();

  auto anonymous = MakeClient("");
  EXPECT_EQ(anonymous->GetJob(done.id()).status().code(), Code::kUnauthenticated);
  EXPECT_EQ(anonymous->UploadModel(Fixture("small_cnn.pt"), "x", {}).status().code(), Code::kUnauthenticated);
  auto forged = MakeClient("alice-token-0123456788");
  EXPECT_EQ(forged->ListJobs(10, "").status().code(), Code::kUnauthenticated);

  // Bob sees none of Alice's things: her ids answer NOT_FOUND, as if they did not exist.
  auto bob_client = MakeClient(bob);
  EXPECT_EQ(bob_client->GetJob(done.id()).status().code(), Code::kNotFound);
  EXPECT_EQ(bob_client->GetModel(model).status().code(), Code::kNotFound);
  EXPECT_EQ(bob_client->Cancel(done.id()).status().code(), Code::kNotFound);
  EXPECT_EQ(bob_client->Download(done.id(), v1::MODEL, dir_.path() + "/stolen.pt").code(), Code::kNotFound);
  EXPECT_EQ(bob_client->Watch(done.id(), nullptr).status().code(), Code::kNotFound);
  v1::SubmitJobRequest req;
  req.set_model_id(model);
  *req.mutable_recipe() = Recipe(R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})");
  EXPECT_EQ(bob_client->Submit(req).status().code(), Code::kNotFound);
  auto bob_list = bob_client->ListJobs(10, "");
  ASSERT_TRUE(bob_list.ok());
  EXPECT_EQ(bob_list->jobs_size(), 0);

  // A client token does not open the Workers service.
  auto stub =
      v1::Workers::NewStub(grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + alice);
  v1::LeaseRequest lease;
  lease.set_worker_id("intruder");
  v1::LeaseResponse resp;
  EXPECT_EQ(stub->Lease(&ctx, lease, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(ServiceTest, WithoutTokensOnlyLoopbackIsServed) {
  server::ServerOptions o;
  o.listen = "0.0.0.0:0";
  o.data_dir = dir_.path() + "/open";
  o.local_workers = 0;
  auto s = server::Server::Create(o);
  EXPECT_EQ(s.status().code(), Code::kInvalidArgument);
  EXPECT_NE(s.status().message().find("--auth-tokens"), std::string::npos) << s.status().message();
}

TEST_F(ServiceTest, HealthAndReflectionAnswerAnotherLanguagesClient) {
  StartServer();
  // python3-grpcio, without generated code: the raw health check answers SERVING (field 1 = 1),
  // and reflection lists both services.
  std::string py;
  std::string cmd = Python() + " -c \"" + "import grpc;ch=grpc.insecure_channel('" + server_->address() +
                    "');"
                    "h=ch.unary_unary('/grpc.health.v1.Health/Check',request_serializer=lambda "
                    "x:x,response_deserializer=lambda x:x);"
                    "print(h(b'',timeout=10).hex());"
                    "r=ch.stream_stream('/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo',"
                    "request_serializer=lambda x:x,response_deserializer=lambda x:x);"
                    "print(b''.join(r(iter([b'\\x3a\\x00']),timeout=10)))\"";
  ASSERT_EQ(pare::testing::Run(cmd, &py), 0) << py;
  EXPECT_EQ(py.substr(0, 5), "0801\n") << py;
  EXPECT_NE(py.find("pare.v1.Compression"), std::string::npos) << py;
  EXPECT_NE(py.find("pare.v1.Workers"), std::string::npos) << py;
}

TEST_F(ServiceTest, QuotasAnswerResourceExhaustedNamingTheLimit) {
  const std::string alice = "alice-token-0123456789", bob = "bob-token-0123456789";
  tokens_file_ = dir_.path() + "/tokens";
  std::ofstream(tokens_file_) << "alice " << alice << "\nbob " << bob << "\n";
  client_token_ = alice;
  server::ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.data_dir = dir_.path() + "/quota";
  o.local_workers = 0;  // jobs stay queued
  o.auth_tokens_file = tokens_file_;
  o.limits.tenant_max_bytes = 150000;  // small_cnn.pt is about 97 kB: one fits, two do not
  o.limits.tenant_max_active_jobs = 2;
  auto s = server::Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  server_ = std::move(s).value();
  ASSERT_TRUE(server_->Start().ok());
  client_ = MakeClient(client_token_);
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  auto second = client_->UploadModel(Fixture("small_cnn_5.pt"), "again", {1, 1, 28, 28});
  ASSERT_EQ(second.status().code(), Code::kResourceExhausted);
  EXPECT_NE(second.status().message().find("stored-bytes quota"), std::string::npos)
      << second.status().message();
  v1::SubmitJobRequest req;
  req.set_model_id(model);
  *req.mutable_recipe() = Recipe(R"({"steps":[{"prune":{"nm":{"n":2,"m":4}}}]})");
  for (const char* id : {"q1", "q2"}) {
    req.set_request_id(id);
    ASSERT_TRUE(client_->Submit(req).ok());
  }
  req.set_request_id("q3");
  auto third = client_->Submit(req);
  ASSERT_EQ(third.status().code(), Code::kResourceExhausted);
  EXPECT_NE(third.status().message().find("active-jobs quota"), std::string::npos)
      << third.status().message();
  req.set_request_id("q1");  // a resubmission is still answered with its job
  EXPECT_TRUE(client_->Submit(req).ok());
  // Another tenant is not limited by this one's jobs.
  auto other = MakeClient(bob);
  auto upload = other->UploadModel(Fixture("small_cnn.pt"), "b", {1, 1, 28, 28});
  ASSERT_TRUE(upload.ok()) << upload.status().ToString();
  req.set_model_id(upload->id());
  req.set_request_id("b1");
  EXPECT_TRUE(other->Submit(req).ok());
}

TEST_F(ServiceTest, MutualTlsAdmitsOnlyClientsWithACertificate) {
  // A CA, a server certificate for localhost/127.0.0.1 and a client certificate, made here.
  const std::string d = dir_.path();
  std::string out;
  std::ofstream(d + "/san.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
  std::ofstream(d + "/certs.sh")
      << "set -e\ncd " << d << "\n"
      << "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj "
         "/CN=pare-test-ca\n"
      << "for n in server client; do\n"
      << "  openssl req -newkey rsa:2048 -nodes -keyout $n.key -out $n.csr -subj /CN=$n\n"
      << "  openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 1 "
         "-extfile san.ext\n"
      << "done\n";
  ASSERT_EQ(pare::testing::Run("bash " + d + "/certs.sh 2>&1", &out), 0) << out;
  const std::string alice = "alice-token-0123456789";
  tokens_file_ = d + "/tokens";
  std::ofstream(tokens_file_) << "alice " << alice << "\n";
  server::ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.data_dir = d + "/tls-data";
  o.local_workers = 1;
  o.worker_binary = BinDir() + "/worker/pare-worker";
  o.worker_args = {"--latency-batches", "1", "--latency-budget", "0.05"};
  o.worker_threads = 1;
  o.auth_tokens_file = tokens_file_;
  o.tls_cert_file = d + "/server.pem";
  o.tls_key_file = d + "/server.key";
  o.tls_client_ca_file = d + "/ca.pem";
  auto s = server::Server::Create(o);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  server_ = std::move(s).value();
  Status started = server_->Start();
  ASSERT_TRUE(started.ok()) << started.ToString();
  auto make = [&](bool with_cert, bool tls) {
    client::ClientOptions co;
    co.server = server_->address();
    co.token = alice;
    co.deadline_seconds = 5;
    if (tls) co.tls.ca = d + "/ca.pem";
    if (with_cert) {
      co.tls.cert = d + "/client.pem";
      co.tls.key = d + "/client.key";
    }
    return std::make_unique<client::Client>(co);
  };
  // With the client certificate: the whole story, the local worker running the job.
  client_ = make(true, true);
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  v1::Job done = WaitEnd(Submit(model, R"({"steps":[{"prune":{"nm":{"n":2,"m":4}}}]})").id());
  EXPECT_EQ(done.state(), v1::SUCCEEDED) << done.error().message();
  // Without a client certificate, or in plaintext: no connection.
  EXPECT_EQ(make(false, true)->ListJobs(10, "").status().code(), Code::kUnavailable);
  EXPECT_EQ(make(false, false)->ListJobs(10, "").status().code(), Code::kUnavailable);
}

TEST_F(ServiceTest, ReadinessFollowsConnectedWorkers) {
  // Health of service "pare.readiness" over python3-grpcio: 0801 SERVING, 0802 NOT_SERVING.
  auto readiness = [&](const std::string& address) {
    std::string out;
    std::string cmd = Python() + " -c \"" + "import grpc;ch=grpc.insecure_channel('" + address +
                      "');"
                      "h=ch.unary_unary('/grpc.health.v1.Health/Check',request_serializer=lambda x:x,"
                      "response_deserializer=lambda x:x);n=b'pare.readiness';"
                      "print(h(bytes([10,len(n)])+n,timeout=10).hex())\"";
    EXPECT_EQ(pare::testing::Run(cmd, &out), 0) << out;
    return out.substr(0, 4);
  };
  StartServer({}, /*workers=*/0);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_EQ(readiness(server_->address()), "0802");  // no worker: not ready (liveness stays SERVING)
  server_->Drain();
  server_.reset();
  StartServer({}, /*workers=*/1);
  std::string state;
  for (int i = 0; i < 100 && state != "0801"; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    state = readiness(server_->address());
  }
  EXPECT_EQ(state, "0801");  // the local worker connected
}

TEST_F(ServiceTest, AWorkerThatCannotWriteItsInputsFailsTheJobWithTheReasonAndGoesOn) {
  // The worker runs under a 200 KiB file size limit (as a full disk would stop it): the 14 MB
  // model cannot be written, the 96 KB one can. SIGXFSZ is ignored so that writes fail instead.
  const std::string wrapper = dir_.path() + "/small-disk-worker.sh";
  std::ofstream(wrapper) << "#!/bin/bash\ntrap '' XFSZ\nulimit -f 200\nexec " << BinDir()
                         << "/worker/pare-worker \"$@\"\n";
  fs::permissions(wrapper, fs::perms::owner_all);
  StartServerWith(wrapper);
  const std::string recipe = R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})";
  v1::Job big = WaitEnd(Submit(UploadModel("mobilenet_v2.pt", {1, 3, 64, 64}), recipe).id());
  EXPECT_EQ(big.state(), v1::FAILED);
  EXPECT_EQ(big.error().reason(), "WORKER_DISK") << big.error().message();
  EXPECT_NE(big.error().message().find("model.pt"), std::string::npos) << big.error().message();
  EXPECT_NE(big.error().message().find("File too large"), std::string::npos) << big.error().message();
  // The same worker process runs the next job.
  auto pids = server_->supervisor()->Pids();
  v1::Job small = WaitEnd(Submit(UploadModel("small_cnn.pt", {1, 1, 28, 28}), recipe).id());
  EXPECT_EQ(small.state(), v1::SUCCEEDED) << small.error().message();
  EXPECT_EQ(server_->supervisor()->Pids(), pids);
}

TEST_F(ServiceTest, AJobWhoseStoredRecipeIsCorruptFailsWithCorruptJob) {
  StartServer({}, /*workers=*/0);
  v1::Job job = Submit(UploadModel("small_cnn.pt", {1, 1, 28, 28}),
                       R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})");
  server_->Drain();
  server_.reset();
  // Garbage where the recipe's protobuf bytes are (a bad disk, a bad restore).
  std::string out;
  ASSERT_EQ(pare::testing::Run(
                Python() + " -c \"import sqlite3;c=sqlite3.connect('" + dir_.path() +
                    "/data/pare.db');c.execute('UPDATE jobs SET recipe=x\\'ffffffff0f\\' WHERE id=?',('" +
                    job.id() + "',));c.commit();print(c.total_changes)\"",
                &out),
            0)
      << out;
  ASSERT_EQ(out.substr(0, 1), "1") << out;
  StartServer({}, /*workers=*/1);
  v1::Job end = WaitEnd(job.id());
  EXPECT_EQ(end.state(), v1::FAILED);
  EXPECT_EQ(end.error().reason(), "CORRUPT_JOB") << end.error().message();
  EXPECT_NE(end.error().message().find("recipe"), std::string::npos) << end.error().message();
}

// An auto search whose goal no candidate meets: the job ends FAILED with GOAL_UNREACHABLE, and
// its closest model and report can still be downloaded; a search without an eval set is refused.
TEST_F(ServiceTest, AnUnreachableAutoGoalFailsButKeepsTheClosestModelAndReport) {
  StartServer();
  std::string model = UploadModel("small_cnn.pt", {1, 1, 28, 28});
  const std::string recipe =
      R"({"steps":[{"auto":{"maxAccuracyDrop":0,"objective":"MACS","methods":["prune.channel"],
          "timeBudgetSeconds":120}}]})";
  v1::SubmitJobRequest no_eval;
  no_eval.set_model_id(model);
  *no_eval.mutable_recipe() = Recipe(recipe);
  auto refused = client_->Submit(no_eval);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("eval_dataset_id is required"), std::string::npos)
      << refused.status().message();
  auto ds = client_->UploadDataset(Fixture("noise_eval.pt"), "tensors", "unlabelled");
  ASSERT_TRUE(ds.ok()) << ds.status().ToString();
  v1::Job done = WaitEnd(Submit(model, recipe, ds->id()).id());
  ASSERT_EQ(done.state(), v1::FAILED);
  EXPECT_EQ(done.error().reason(), "GOAL_UNREACHABLE");
  EXPECT_NE(done.error().message().find("the closest is trial"), std::string::npos) << done.error().message();
  EXPECT_FALSE(done.result_sha256().empty());
  std::string out = dir_.path() + "/closest.pt", report = dir_.path() + "/search.json";
  ASSERT_TRUE(client_->Download(done.id(), v1::MODEL, out).ok());
  EXPECT_EQ(Sha256OfFile(out), done.result_sha256());
  ASSERT_TRUE(client_->Download(done.id(), v1::REPORT, report).ok());
  std::ifstream in(report);
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["failure"]["reason"], "GOAL_UNREACHABLE");
  EXPECT_GE(j["search"]["trials"].size(), 2u);
}

}  // namespace
}  // namespace pare
