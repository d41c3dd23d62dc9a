#include "server/worker_supervisor.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>

#include "common/logging.h"

namespace pare::server {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

WorkerSupervisor::WorkerSupervisor(SupervisorOptions options) : options_(std::move(options)) {}

WorkerSupervisor::~WorkerSupervisor() { Stop(0); }

void WorkerSupervisor::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  slots_.resize(static_cast<size_t>(options_.count));
  for (int i = 0; i < options_.count; ++i) {
    slots_[i].pid = Spawn(i);
    slots_[i].started_at = Now();
    slots_[i].backoff = options_.initial_backoff_seconds;
  }
  thread_ = std::thread([this] { Loop(); });
}

pid_t WorkerSupervisor::Spawn(int index) {
  std::vector<std::string> args = options_.args;
  args.insert(args.begin(), options_.worker_binary);
  args.push_back("--id");
  args.push_back("local-" + std::to_string(::getpid()) + "-" + std::to_string(index));
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    // A worker must not outlive its server (kill -9 of the server included).
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(0);
    // The server blocks SIGTERM/SIGINT for its sigwait thread; the worker must receive them.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    for (const auto& [k, v] : options_.env) ::setenv(k.c_str(), v.c_str(), 1);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (pid < 0) {
    spdlog::error(Kv({{"msg", "cannot start a local worker"}, {"error", std::strerror(errno)}}));
  } else {
    spdlog::info(Kv({{"msg", "local worker started"}, {"pid", std::to_string(pid)}}));
  }
  return pid;
}

void WorkerSupervisor::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (s.pid > 0) {
        int status = 0;
        pid_t r = ::waitpid(s.pid, &status, WNOHANG);
        if (r == s.pid) {
          std::string how = WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                                : "exit code " + std::to_string(WEXITSTATUS(status));
          // A worker that ran a while before dying starts again quickly; a crash loop backs off.
          if (Now() - s.started_at > 60) s.backoff = options_.initial_backoff_seconds;
          s.restart_at = Now() + s.backoff;
          spdlog::warn(Kv({{"msg", "local worker exited"},
                           {"pid", std::to_string(s.pid)},
                           {"how", how},
                           {"restart_in_seconds", std::to_string(s.backoff)}}));
          s.backoff = std::min(s.backoff * 2, options_.max_backoff_seconds);
          s.pid = -1;
        }
      } else if (Now() >= s.restart_at) {
        s.pid = Spawn(static_cast<int>(i));
        s.started_at = Now();
        if (s.pid < 0) s.restart_at = Now() + s.backoff;
        ++restarts_;
      }
    }
    cv_.wait_for(lock, std::chrono::milliseconds(100));
  }
}

std::vector<pid_t> WorkerSupervisor::Pids() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<pid_t> out;
  for (const auto& s : slots_) {
    if (s.pid > 0) out.push_back(s.pid);
  }
  return out;
}

void WorkerSupervisor::Stop(double grace_seconds) {
  std::vector<pid_t> pids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
    for (auto& s : slots_) {
      if (s.pid > 0) pids.push_back(s.pid);
    }
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (pid_t p : pids) ::kill(p, SIGTERM);
  double deadline = Now() + grace_seconds;
  for (pid_t p : pids) {
    while (true) {
      pid_t r = ::waitpid(p, nullptr, WNOHANG);
      if (r == p || r < 0) break;
      if (Now() >= deadline) {
        ::kill(p, SIGKILL);
        ::waitpid(p, nullptr, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& s : slots_) s.pid = -1;
}

}  // namespace pare::server
