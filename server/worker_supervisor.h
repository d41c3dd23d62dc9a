// Starts local pare-worker processes for the embedded default and restarts them with
// exponential backoff when they exit; on drain asks them to stop, then kills stragglers.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pare::server {

struct SupervisorOptions {
  std::string worker_binary;      // path to pare-worker
  std::vector<std::string> args;  // arguments for every worker (server address etc.)
  // Environment added for the workers (secrets go here, not into argv where ps shows them).
  std::vector<std::pair<std::string, std::string>> env;
  int count = 1;  // processes to keep running
  double initial_backoff_seconds = 0.5;
  double max_backoff_seconds = 30;
};

class WorkerSupervisor {
 public:
  explicit WorkerSupervisor(SupervisorOptions options);
  ~WorkerSupervisor();

  void Start();
  // SIGTERM to every worker, wait up to `grace_seconds`, then SIGKILL; no more restarts.
  void Stop(double grace_seconds);
  // Pids of the running workers (for tests that kill one).
  std::vector<pid_t> Pids();
  int restarts() const { return restarts_.load(); }

 private:
  struct Slot {
    pid_t pid = -1;
    double backoff = 0;
    double restart_at = 0;  // monotonic seconds
    double started_at = 0;
  };
  void Loop();
  pid_t Spawn(int index);

  const SupervisorOptions options_;
  std::mutex mu_;  // guards slots_ and stopping_
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  bool stopping_ = false;
  std::atomic<int> restarts_{0};
  std::thread thread_;
};

}  // namespace pare::server
