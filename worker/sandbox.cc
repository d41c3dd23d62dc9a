#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/logging.h"
#include "worker/engine/error.h"
#include "worker/worker.h"
#include "worker/worker_internal.h"

namespace pare::worker {
namespace {

namespace fs = std::filesystem;

std::string SignalName(int sig) {
  const char* d = ::sigdescr_np(sig);
  std::string name =
      ::sigabbrev_np(sig) ? std::string("SIG") + ::sigabbrev_np(sig) : "signal " + std::to_string(sig);
  return d ? name + " (" + d + ")" : name;
}

// Resource limits the job process runs under (RLIM_INFINITY: none).
struct ChildLimits {
  rlim_t memory_bytes, cpu_seconds, open_files;
};

// Forks and execs `argv` in `dir` with the limits, its stdout on `out_fd`, killed when the worker
// dies. Everything the child needs is prepared by the caller: only async-signal-safe calls may
// follow fork in a threaded process.
pid_t StartChild(const std::vector<char*>& argv, const std::string& dir, const ChildLimits& limits,
                 int out_fd) {
  pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::dup2(out_fd, STDOUT_FILENO);
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  struct rlimit r;
  r.rlim_cur = r.rlim_max = limits.memory_bytes;
  ::setrlimit(RLIMIT_AS, &r);
  r.rlim_cur = limits.cpu_seconds;
  r.rlim_max = limits.cpu_seconds == RLIM_INFINITY ? RLIM_INFINITY : limits.cpu_seconds + 5;
  ::setrlimit(RLIMIT_CPU, &r);
  r.rlim_cur = r.rlim_max = limits.open_files;
  ::setrlimit(RLIMIT_NOFILE, &r);
  r.rlim_cur = r.rlim_max = 0;
  ::setrlimit(RLIMIT_CORE, &r);
  if (::chdir(dir.c_str()) != 0) ::_exit(126);
  ::execv(argv[0], argv.data());
  ::_exit(127);
}

// How the job process ended, and what the worker did to it.
struct ChildEnd {
  int status = 0;  // waitpid's
  bool timed_out = false;
  bool killed_by_us = false;  // SIGKILL after the timeout or after SIGTERM's grace
  bool term_sent = false;     // SIGTERM on should_stop
};

// Reads the child's progress lines from `fd` until it closes its stdout; asks it to stop
// (SIGTERM, then SIGKILL after 15 s) when `should_stop`, kills it past the timeout; reaps it.
ChildEnd WatchChild(pid_t pid, int fd, double timeout_seconds,
                    const std::function<void(const nlohmann::json&)>& on_progress,
                    const std::function<bool()>& should_stop) {
  ChildEnd end;
  const auto start = SteadyClock::now();
  auto term_at = SteadyClock::time_point::max();
  std::string pending;
  char buf[4096];
  while (true) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 200) > 0) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n <= 0) break;  // the child closed stdout: it ended
      pending.append(buf, static_cast<size_t>(n));
      for (auto nl = pending.find('\n'); nl != std::string::npos; nl = pending.find('\n')) {
        std::string line = pending.substr(0, nl);
        pending.erase(0, nl + 1);
        try {
          on_progress(nlohmann::json::parse(line));
        } catch (const std::exception&) {
          // Not a progress line (a model printing to stdout): ignore it.
        }
      }
    }
    const auto now = SteadyClock::now();
    if (!end.term_sent && should_stop()) {
      ::kill(pid, SIGTERM);
      end.term_sent = true;
      term_at = now;
    }
    if (end.term_sent && now - term_at > std::chrono::seconds(15) && !end.killed_by_us) {
      ::kill(pid, SIGKILL);  // it did not stop at the next progress point
      end.killed_by_us = true;
    }
    if (timeout_seconds > 0 && !end.timed_out &&
        now - start > std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000))) {
      ::kill(pid, SIGKILL);
      end.timed_out = end.killed_by_us = true;
    }
  }
  ::close(fd);
  while (::waitpid(pid, &end.status, 0) < 0 && errno == EINTR) {
  }
  return end;
}

// The job's outcome from how its process ended: the one it wrote, or a failure that says why.
v1::CompleteHeader Outcome(const std::string& dir, const ChildEnd& end, double timeout_seconds,
                           const std::string& step, int64_t cpu_limit_seconds) {
  const int status = end.status;
  v1::CompleteHeader header;
  auto fail = [&](const std::string& code, const std::string& reason, const std::string& message) {
    SetJobError(header, v1::FAILED, code, reason, message);
    return header;
  };
  if (end.timed_out) {
    return fail("DEADLINE_EXCEEDED", "JOB_TIMEOUT",
                "the job ran longer than its limit of " + std::to_string(int(timeout_seconds)) +
                    " s (during " + step + ") and was stopped");
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 3) {
    header.set_state(v1::QUEUED);
    return header;
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    std::ifstream in(dir + "/outcome.pb", std::ios::binary);
    if (header.ParseFromIstream(&in)) return header;
    return fail("INTERNAL", "JOB_CRASHED", "the job process ended without an outcome");
  }
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    // Stopped on our request: killed after the grace, or a SIGTERM that came before the job
    // process had set its handler (a cancel right after the lease).
    if (end.killed_by_us || (sig == SIGTERM && end.term_sent)) {
      header.set_state(v1::QUEUED);
      return header;
    }
    if (sig == SIGXCPU) {
      return fail("RESOURCE_EXHAUSTED", "JOB_CPU_LIMIT",
                  "the job used more than this worker's CPU-time limit of " +
                      std::to_string(cpu_limit_seconds) + " s (during " + step + ")");
    }
    if (sig == SIGKILL) {
      return fail(
          "RESOURCE_EXHAUSTED", "JOB_KILLED",
          "the job process was killed (SIGKILL) during " + step +
              "; most often the kernel's out-of-memory killer: the model or its data needs more memory");
    }
    return fail("INTERNAL", "JOB_CRASHED",
                "the job process crashed with " + SignalName(sig) + " during " + step +
                    "; the model or its data made LibTorch fail. The worker is unaffected");
  }
  return fail("INTERNAL", "JOB_CRASHED",
              "the job process exited with code " + std::to_string(WEXITSTATUS(status)) + " during " + step);
}

}  // namespace

v1::CompleteHeader Worker::RunSandboxed(const std::string& dir, bool cuda_job, double timeout_seconds,
                                        const std::function<void(const nlohmann::json&)>& on_progress,
                                        const std::function<bool()>& should_stop,
                                        const std::function<std::string()>& current_step) {
  std::error_code ec;
  const std::string self = fs::read_symlink("/proc/self/exe", ec).string();
  if (ec) throw engine::EngineError(Code::kInternal, "WORKER", "cannot find the pare-worker executable");
  std::vector<std::string> args = {self, "--run-job", dir};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw engine::EngineError(Code::kInternal, "WORKER", "pipe failed");
  const ChildLimits limits{
      options_.job_memory_mb > 0 && !cuda_job ? rlim_t(options_.job_memory_mb) << 20 : RLIM_INFINITY,
      options_.job_cpu_seconds > 0 ? rlim_t(options_.job_cpu_seconds) : RLIM_INFINITY,
      options_.job_max_open_files > 0 ? rlim_t(options_.job_max_open_files) : RLIM_INFINITY};
  const pid_t pid = StartChild(argv, dir, limits, fds[1]);
  ::close(fds[1]);
  if (pid < 0) {
    ::close(fds[0]);
    throw engine::EngineError(Code::kInternal, "WORKER", "fork failed");
  }
  const ChildEnd end = WatchChild(pid, fds[0], timeout_seconds, on_progress, should_stop);
  return Outcome(dir, end, timeout_seconds, current_step().empty() ? "loading" : current_step(),
                 options_.job_cpu_seconds);
}

}  // namespace pare::worker
