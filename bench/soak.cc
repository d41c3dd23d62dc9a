// Soak driver: many concurrent clients upload, submit, poll and download against one
// pare-server with local workers, for a bounded time. Reports throughput, errors (which must
// be 0 apart from the deliberate rejections it provokes), the server's RSS growth after
// warm-up and its peak (sampled every 0.5 s, the final sample included), and the RSS of the
// local workers and their job processes (sum and largest, sampled the same way).
//
//   pare-soak --bin-dir build --model tests/fixtures/small_cnn.pt --seconds 120 --clients 8
//
// Exit code 1 when an unexpected error happened or RSS grew by more than --max-growth-mb.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "client/client.h"
#include "common/sha256.h"
#include "worker/recipe_convert.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double RssMb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      double kb = 0;
      in >> kb;
      return kb / 1024.0;
    }
    std::string rest;
    std::getline(in, rest);
  }
  return 0;
}

// Every process below `root` (the server's local workers and their job processes).
std::vector<pid_t> Descendants(pid_t root) {
  std::map<pid_t, std::vector<pid_t>> children;
  for (const auto& e : fs::directory_iterator("/proc", fs::directory_options::skip_permission_denied)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    const auto close = line.rfind(')');  // "pid (comm) state ppid ..."; comm may hold spaces
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 1));
    std::string state;
    pid_t ppid = 0;
    if (rest >> state >> ppid) children[ppid].push_back(static_cast<pid_t>(std::stol(name)));
  }
  std::vector<pid_t> out, pending = {root};
  while (!pending.empty()) {
    pid_t p = pending.back();
    pending.pop_back();
    for (pid_t c : children[p]) {
      out.push_back(c);
      pending.push_back(c);
    }
  }
  return out;
}

// The memory of the server and of what it runs, sampled.
struct MemorySample {
  double server = 0, others = 0, largest_other = 0;  // MB
};
MemorySample SampleMemory(pid_t server) {
  MemorySample m;
  m.server = RssMb(server);
  for (pid_t p : Descendants(server)) {
    const double mb = RssMb(p);
    m.others += mb;
    m.largest_other = std::max(m.largest_other, mb);
  }
  return m;
}

struct Counters {
  std::atomic<int64_t> uploads{0}, jobs{0}, downloads{0}, polls{0}, rejections{0}, errors{0};
  std::mutex mu;
  std::vector<std::string> first_errors;
  void Error(const std::string& what) {
    ++errors;
    std::lock_guard<std::mutex> lock(mu);
    if (first_errors.size() < 10) first_errors.push_back(what);
  }
};

// Starts pare-server with `workers` local workers on a data folder under `work`; returns its
// address ("" when it did not start) and sets `*pid`.
std::string StartServer(const std::string& bin_dir, const std::string& work, int workers, pid_t* pid) {
  int out[2];
  if (::pipe(out) != 0) return "";
  *pid = ::fork();
  if (*pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::close(out[0]);
    std::string bin = bin_dir + "/server/pare-server", wbin = bin_dir + "/worker/pare-worker",
                data = work + "/data", nworkers = std::to_string(workers);
    ::execl(bin.c_str(), bin.c_str(), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--data-dir", data.c_str(), "--local-workers", nworkers.c_str(), "--worker-threads", "1",
            "--worker-binary", wbin.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  std::string line;
  char c;
  while (::read(out[0], &c, 1) == 1 && c != '\n') line.push_back(c);
  auto at = line.find("listening on ");
  if (at == std::string::npos) {
    std::cerr << "pare-soak: pare-server did not start: " << line << "\n";
    return "";
  }
  return line.substr(at + 13, line.find(' ', at + 13) - at - 13);
}

// One client until `stop`: upload, a deliberately bad submit, a good one polled to its end, the
// result downloaded and checked; every outcome counted in `n`.
void ClientLoop(const std::string& address, const std::string& model_path, const std::string& work, int index,
                const std::atomic<bool>& stop, Counters& n) {
  static const auto good = pare::ParseRecipeJson(R"({"steps":[{"prune":{"nm":{"n":2,"m":4}}}]})").value();
  static const auto bad =
      pare::ParseRecipeJson(R"({"steps":[{"prune":{"magnitude":{"amount":3}}}]})").value();
  pare::client::ClientOptions o;
  o.server = address;
  pare::client::Client client(o);
  int round = 0;
  while (!stop) {
    auto m = client.UploadModel(model_path, "soak", {1, 1, 28, 28});
    if (!m.ok()) {
      n.Error("upload: " + m.status().ToString());
      continue;
    }
    ++n.uploads;
    pare::v1::SubmitJobRequest req;
    req.set_model_id(m->id());
    *req.mutable_recipe() = bad;  // a deliberate rejection
    auto rejected = client.Submit(req);
    if (rejected.ok() || rejected.status().code() != pare::Code::kInvalidArgument) {
      n.Error("a bad recipe was not refused");
    } else {
      ++n.rejections;
    }
    *req.mutable_recipe() = good;
    req.set_request_id("soak-" + std::to_string(index) + "-" + std::to_string(round++));
    auto job = client.Submit(req);
    if (!job.ok()) {
      n.Error("submit: " + job.status().ToString());
      continue;
    }
    pare::v1::Job j = job.value();
    while (!stop && (j.state() == pare::v1::QUEUED || j.state() == pare::v1::RUNNING)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      auto polled = client.GetJob(j.id());
      if (!polled.ok()) {
        n.Error("poll: " + polled.status().ToString());
        break;
      }
      ++n.polls;
      j = polled.value();
    }
    if (j.state() == pare::v1::QUEUED || j.state() == pare::v1::RUNNING) break;  // stopping
    if (j.state() != pare::v1::SUCCEEDED) {
      n.Error("job " + j.id() + " ended " + pare::v1::JobState_Name(j.state()) + ": " + j.error().message());
      continue;
    }
    ++n.jobs;
    const std::string file = work + "/result-" + std::to_string(index) + ".pt";
    auto st = client.Download(j.id(), pare::v1::MODEL, file);
    if (!st.ok() || pare::Sha256OfFile(file) != j.result_sha256()) {
      n.Error("download: " + st.ToString());
      continue;
    }
    fs::remove(file);
    ++n.downloads;
  }
}

struct Memory {
  double warm = 0, end = 0, peak = 0, others_peak = 0, largest_peak = 0;
};

void PrintTable(int clients, double elapsed, double warmup, const Counters& n, const Memory& mem) {
  std::printf(
      "| clients | seconds | uploads | jobs done | downloads | polls | deliberate rejections | errors | "
      "jobs/s "
      "| server RSS after %.0f s warm-up | at the end | peak | growth | workers + jobs RSS, peak sum "
      "| largest worker or job process |\n",
      warmup);
  std::printf(
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
      "---: |\n");
  std::printf(
      "| %d | %.0f | %lld | %lld | %lld | %lld | %lld | %lld | %.2f | %.1f MB | %.1f MB | %.1f MB | %+.1f MB "
      "| %.1f MB | %.1f MB |\n",
      clients, elapsed, (long long)n.uploads.load(), (long long)n.jobs.load(), (long long)n.downloads.load(),
      (long long)n.polls.load(), (long long)n.rejections.load(), (long long)n.errors.load(),
      double(n.jobs.load()) / elapsed, mem.warm, mem.end, mem.peak, mem.end - mem.warm, mem.others_peak,
      mem.largest_peak);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"pare-soak: concurrent clients against one pare-server"};
  std::string bin_dir = "build", model_path;
  double seconds = 60, warmup = 10, max_growth_mb = 50;
  int clients = 8, workers = 2;
  app.add_option("--bin-dir", bin_dir, "build folder holding server/pare-server and worker/pare-worker");
  app.add_option("--model", model_path, "a small TorchScript model to upload")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("--seconds", seconds, "how long the clients run")->capture_default_str();
  app.add_option("--warmup", warmup, "seconds before the RSS baseline is taken")->capture_default_str();
  app.add_option("--clients", clients, "concurrent clients")->capture_default_str();
  app.add_option("--workers", workers, "local workers of the server")->capture_default_str();
  app.add_option("--max-growth-mb", max_growth_mb, "fail above this RSS growth after warm-up")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const std::string work = (fs::temp_directory_path() / ("pare-soak-" + std::to_string(::getpid()))).string();
  fs::create_directories(work);
  pid_t server = -1;
  const std::string address = StartServer(bin_dir, work, workers, &server);
  if (address.empty()) return 2;
  Counters n;
  std::atomic<bool> stop{false};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i)
    threads.emplace_back([&, i] { ClientLoop(address, model_path, work, i, stop, n); });
  std::this_thread::sleep_for(std::chrono::milliseconds(static_cast<int64_t>(warmup * 1000)));
  Memory mem;
  mem.warm = mem.peak = RssMb(server);
  auto sample = [&] {
    MemorySample m = SampleMemory(server);
    mem.peak = std::max(mem.peak, m.server);
    mem.others_peak = std::max(mem.others_peak, m.others);
    mem.largest_peak = std::max(mem.largest_peak, m.largest_other);
    return m;
  };
  while (Clock::now() - start < std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000))) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    sample();
  }
  stop = true;
  for (auto& t : threads) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  mem.end = sample().server;  // the peak includes the final sample
  ::kill(server, SIGTERM);
  int status = 0;
  ::waitpid(server, &status, 0);
  fs::remove_all(work);

  PrintTable(clients, elapsed, warmup, n, mem);
  for (const auto& e : n.first_errors) std::fprintf(stderr, "error: %s\n", e.c_str());
  const double growth = mem.end - mem.warm;
  const bool ok = n.errors == 0 && growth < max_growth_mb && n.jobs > 0;
  if (!ok)
    std::fprintf(stderr, "pare-soak: FAILED (errors %lld, RSS growth %.1f MB, limit %.0f MB)\n",
                 (long long)n.errors.load(), growth, max_growth_mb);
  return ok ? 0 : 1;
}
