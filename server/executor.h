// A fixed pool of threads with a bounded queue: reactors hand their disk and database
// work here instead of blocking gRPC's threads. A full queue refuses, never grows.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pare::server {

class Executor {
 public:
  Executor(int threads, size_t max_queue);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // False (and `task` is dropped) when the queue is full or the executor is stopping.
  bool TryPost(std::function<void()> task);
  // Runs what is queued, then joins the threads.
  void Stop();

 private:
  void Loop();

  std::mutex mu_;  // guards queue_ and stopping_
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  const size_t max_queue_;
  std::vector<std::thread> threads_;
};

}  // namespace pare::server
