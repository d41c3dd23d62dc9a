// Control-plane load driver: the calls clients and workers make to pare-server, without any
// compression work, against one or several replicas.
//
//   pare-control-plane --servers A[,B...] --model FILE --clients 64 --seconds 10
//   pare-control-plane --servers A,B --model FILE --jobs 1000 --workers 8 --worker-token T
//   pare-control-plane --servers A --model FILE --blobs F1,F2,F3 --worker-token T
//
// Load mode: each client thread (on server i % n) loops over a fixed mix — 6 GetJob, 2
// ListJobs (a page of 50), 1 SubmitJob, 1 WatchJob (open, first message, close) — and the table
// gives calls per second and p50/p99 latency per call, and errors. Hand-off mode: submits
// --jobs jobs, then --workers worker threads speak the worker protocol (Lease, then Complete as
// FAILED with reason BENCH: no model is run) until every job has ended; it prints the rate and
// checks that every job was leased exactly once (grants counted by job id). Blob mode (--blobs
// FILES): upload and worker-fetch rates of large files, for comparing the blob stores.
// Exit code 1 on any error, duplicate lease or job left unfinished.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "client/client.h"
#include "common/sha256.h"
#include "pare/v1/workers.grpc.pb.h"
#include "worker/recipe_convert.h"

namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string part;
  while (std::getline(ss, part, ',')) {
    if (!part.empty()) out.push_back(part);
  }
  return out;
}

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Percentile(std::vector<double>& v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

struct Samples {
  std::map<std::string, std::vector<double>> ms;
  std::map<std::string, int> errors;
  std::map<std::string, std::string> first_error;
};

pare::v1::SubmitJobRequest JobRequest(const std::string& model_id, const std::string& request_id) {
  pare::v1::SubmitJobRequest req;
  req.set_model_id(model_id);
  req.set_request_id(request_id);
  req.set_device("cpu");
  *req.mutable_recipe() =
      pare::ParseRecipeJson(R"({"steps":[{"prune":{"magnitude":{"amount":0.5}}}]})").value();
  return req;
}

pare::client::Client ClientFor(const std::string& server, const std::string& token) {
  pare::client::ClientOptions o;
  o.server = server;
  o.token = token;
  return pare::client::Client(o);
}

// Ends a leased job as FAILED with reason BENCH, as a worker that ran nothing.
grpc::Status CompleteUnrun(pare::v1::Workers::Stub& stub, const pare::v1::LeasedJob& job,
                           const std::string& worker_token) {
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + worker_token);
  pare::v1::CompleteResponse done;
  auto writer = stub.Complete(&ctx, &done);
  pare::v1::CompleteRequest part;
  auto* h = part.mutable_header();
  h->set_job_id(job.job_id());
  h->set_lease_id(job.lease_id());
  h->set_state(pare::v1::FAILED);
  h->mutable_error()->set_reason("BENCH");
  h->mutable_error()->set_message("control-plane benchmark: no model was run");
  writer->Write(part);
  writer->WritesDone();
  return writer->Finish();
}

int Load(const std::vector<std::string>& servers, const std::string& model_id,
         const std::vector<std::string>& jobs, int clients, double seconds, const std::string& token) {
  std::vector<Samples> per(static_cast<size_t>(clients));
  const auto end =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&, t] {
      const std::string& server = servers[static_cast<size_t>(t) % servers.size()];
      auto c = ClientFor(server, token);
      // Watches on a channel of their own made once, as the other calls' (the client's) is.
      auto watch_stub =
          pare::v1::Compression::NewStub(grpc::CreateChannel(server, grpc::InsecureChannelCredentials()));
      Samples& s = per[static_cast<size_t>(t)];
      for (int i = 0; Clock::now() < end; ++i) {
        const int op = i % 10;
        const std::string& job = jobs[static_cast<size_t>(i * 7 + t) % jobs.size()];
        std::string name;
        pare::Status st;
        const auto start = Clock::now();
        if (op < 6) {
          name = "GetJob";
          st = c.GetJob(job).status();
        } else if (op < 8) {
          name = "ListJobs";
          st = c.ListJobs(50, "").status();
        } else if (op == 8) {
          name = "SubmitJob";
          st = c.Submit(JobRequest(model_id, "load-" + std::to_string(t) + "-" + std::to_string(i))).status();
        } else {
          name = "WatchJob (first message)";
          grpc::ClientContext ctx;
          if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
          ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
          pare::v1::WatchJobRequest req;
          req.set_id(job);
          auto reader = watch_stub->WatchJob(&ctx, req);
          pare::v1::Job first;
          if (!reader->Read(&first)) st = pare::Unavailable(reader->Finish().error_message());
          ctx.TryCancel();
          if (st.ok()) reader->Finish();
        }
        const double ms = Ms(Clock::now() - start);
        if (st.ok()) {
          s.ms[name].push_back(ms);
        } else {
          if (!s.errors[name]++) s.first_error[name] = st.ToString();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  Samples all;
  for (auto& s : per) {
    for (auto& [k, v] : s.ms) all.ms[k].insert(all.ms[k].end(), v.begin(), v.end());
    for (auto& [k, n] : s.errors) {
      if (!all.errors[k]) all.first_error[k] = s.first_error[k];
      all.errors[k] += n;
    }
  }
  std::printf("| call | calls | per second | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|\n");
  int errors = 0;
  for (auto& [name, v] : all.ms) {
    std::printf("| %s | %zu | %.0f | %.2f | %.2f | %d |\n", name.c_str(), v.size(),
                static_cast<double>(v.size()) / seconds, Percentile(v, 0.5), Percentile(v, 0.99),
                all.errors[name]);
    errors += all.errors[name];
  }
  for (auto& [name, e] : all.first_error)
    std::fprintf(stderr, "first %s error: %s\n", name.c_str(), e.c_str());
  return errors ? 1 : 0;
}

int HandOff(const std::vector<std::string>& servers, const std::string& model_id, int jobs, int workers,
            const std::string& token, const std::string& worker_token) {
  auto c = ClientFor(servers[0], token);
  std::vector<std::string> ids;
  for (int i = 0; i < jobs; ++i) {
    auto j = c.Submit(JobRequest(model_id, "handoff-" + std::to_string(i)));
    if (!j.ok()) {
      std::fprintf(stderr, "submit: %s\n", j.status().ToString().c_str());
      return 1;
    }
    ids.push_back(j->id());
  }
  const std::set<std::string> wanted(ids.begin(), ids.end());
  std::mutex mu;
  std::map<std::string, int> grants;
  std::atomic<int> ended{0}, errors{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      auto stub = pare::v1::Workers::NewStub(grpc::CreateChannel(
          servers[static_cast<size_t>(w) % servers.size()], grpc::InsecureChannelCredentials()));
      int idle = 0;
      while (ended.load() < jobs && idle < 200) {
        grpc::ClientContext ctx;
        ctx.AddMetadata("authorization", "Bearer " + worker_token);
        pare::v1::LeaseRequest req;
        req.set_worker_id("bench-" + std::to_string(w));
        req.mutable_capabilities()->set_cuda(false);
        pare::v1::LeaseResponse resp;
        grpc::Status st = stub->Lease(&ctx, req, &resp);
        if (!st.ok()) {
          ++errors;
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
          continue;
        }
        if (!resp.has_job()) {
          ++idle;
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
          continue;
        }
        idle = 0;
        {
          std::lock_guard<std::mutex> lock(mu);
          ++grants[resp.job().job_id()];
        }
        st = CompleteUnrun(*stub, resp.job(), worker_token);
        if (!st.ok()) {
          ++errors;
          continue;
        }
        if (wanted.count(resp.job().job_id())) ++ended;
      }
    });
  }
  for (auto& th : threads) th.join();
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  int duplicates = 0;
  for (const auto& [id, n] : grants) duplicates += n > 1 ? n - 1 : 0;
  int unfinished = 0;
  for (const auto& id : ids) {
    auto j = c.GetJob(id);
    if (!j.ok() || j->state() != pare::v1::FAILED || j->attempts() != 1) ++unfinished;
  }
  std::printf(
      "| jobs | workers | servers | seconds | jobs per second | lease grants | duplicate grants | errors | "
      "not ended once |\n|---|---|---|---|---|---|---|---|---|\n");
  std::printf("| %d | %d | %zu | %.2f | %.0f | %zu | %d | %d | %d |\n", jobs, workers, servers.size(), secs,
              jobs / secs, grants.size(), duplicates, errors.load(), unfinished);
  return (duplicates || errors || unfinished) ? 1 : 0;
}

// Blob mode: each file uploaded (a client's UploadModel, timed to the acknowledgement), then read
// back as a worker reads a job's input (Lease, then Fetch of the model blob, timed to the last
// chunk, its digest checked); the job is then completed as FAILED (nothing is run).
int Blobs(const std::vector<std::string>& servers, const std::vector<std::string>& files,
          const std::string& token, const std::string& worker_token) {
  auto c = ClientFor(servers[0], token);
  auto stub = pare::v1::Workers::NewStub(grpc::CreateChannel(servers[0], grpc::InsecureChannelCredentials()));
  std::printf("| file | MB | upload s | upload MB/s | fetch s | fetch MB/s |\n|---|---|---|---|---|---|\n");
  int failures = 0;
  for (size_t i = 0; i < files.size(); ++i) {
    auto t0 = Clock::now();
    auto m = c.UploadModel(files[i], "blob-" + std::to_string(i), {1, 3, 64, 64});
    const double up = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!m.ok()) {
      std::fprintf(stderr, "upload %s: %s\n", files[i].c_str(), m.status().ToString().c_str());
      ++failures;
      continue;
    }
    auto j = c.Submit(JobRequest(m->id(), "blob-" + std::to_string(i)));
    if (!j.ok()) {
      std::fprintf(stderr, "submit: %s\n", j.status().ToString().c_str());
      ++failures;
      continue;
    }
    grpc::ClientContext lctx;
    lctx.AddMetadata("authorization", "Bearer " + worker_token);
    pare::v1::LeaseRequest lreq;
    lreq.set_worker_id("bench-blobs");
    pare::v1::LeaseResponse lease;
    grpc::Status st = stub->Lease(&lctx, lreq, &lease);
    if (!st.ok() || !lease.has_job()) {
      std::fprintf(stderr, "lease: %s\n", st.error_message().c_str());
      ++failures;
      continue;
    }
    grpc::ClientContext fctx;
    fctx.AddMetadata("authorization", "Bearer " + worker_token);
    pare::v1::FetchRequest freq;
    freq.set_job_id(lease.job().job_id());
    freq.set_lease_id(lease.job().lease_id());
    freq.set_sha256(m->sha256());
    t0 = Clock::now();
    auto reader = stub->Fetch(&fctx, freq);
    pare::v1::Chunk chunk;
    pare::Sha256 hash;
    uint64_t got = 0;
    while (reader->Read(&chunk)) {
      hash.Update(chunk.data().data(), chunk.data().size());
      got += chunk.data().size();
    }
    st = reader->Finish();
    const double down = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!st.ok() || got != m->size_bytes() || hash.HexDigest() != m->sha256()) {
      std::fprintf(stderr, "fetch: %s (%llu of %llu bytes)\n", st.error_message().c_str(),
                   static_cast<unsigned long long>(got), static_cast<unsigned long long>(m->size_bytes()));
      ++failures;
    }
    CompleteUnrun(*stub, lease.job(), worker_token);
    const double mb = static_cast<double>(m->size_bytes()) / 1e6;
    std::printf("| %zu | %.1f | %.2f | %.0f | %.2f | %.0f |\n", i + 1, mb, up, mb / up, down, mb / down);
  }
  return failures ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Pare control-plane load driver"};
  std::string servers_flag, model, token, worker_token;
  int clients = 16, jobs = 0, workers = 8, seed_jobs = 20;
  double seconds = 10;
  app.add_option("--servers", servers_flag, "host:port of each replica, comma-separated")->required();
  app.add_option("--model", model,
                 "a TorchScript file to upload (jobs reference it; load and hand-off modes)");
  app.add_option("--clients", clients, "concurrent clients (load mode)")->capture_default_str();
  app.add_option("--seconds", seconds, "how long the load runs")->capture_default_str();
  app.add_option("--jobs", jobs, "hand-off mode: jobs to hand to --workers (0: load mode)");
  app.add_option("--workers", workers, "hand-off mode: worker threads")->capture_default_str();
  app.add_option("--token", token, "client bearer token");
  app.add_option("--worker-token", worker_token, "the token workers present (hand-off and blob modes)");
  std::string blob_files;
  app.add_option(
      "--blobs", blob_files,
      "blob mode: TorchScript files (comma-separated, distinct contents) to upload and fetch back");
  CLI11_PARSE(app, argc, argv);
  const auto servers = Split(servers_flag);
  if (!blob_files.empty()) return Blobs(servers, Split(blob_files), token, worker_token);
  if (model.empty()) {
    std::fprintf(stderr, "--model is required in load and hand-off modes\n");
    return 2;
  }
  auto c = ClientFor(servers[0], token);
  auto m = c.UploadModel(model, "bench", {1, 1, 28, 28});
  if (!m.ok()) {
    std::fprintf(stderr, "upload: %s\n", m.status().ToString().c_str());
    return 1;
  }
  if (jobs > 0) return HandOff(servers, m->id(), jobs, workers, token, worker_token);
  std::vector<std::string> ids;
  for (int i = 0; i < seed_jobs; ++i) {
    auto j = c.Submit(JobRequest(m->id(), "seed-" + std::to_string(i)));
    if (!j.ok()) {
      std::fprintf(stderr, "submit: %s\n", j.status().ToString().c_str());
      return 1;
    }
    ids.push_back(j->id());
  }
  return Load(servers, m->id(), ids, clients, seconds, token);
}
