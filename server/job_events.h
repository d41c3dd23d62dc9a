// Publish/subscribe of "job X changed", so WatchJob streams push changes instead of polling.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>

namespace pare::server {

class JobEvents {
 public:
  using Callback = std::function<void()>;

  // Returns a token for Unsubscribe. `cb` runs on the publisher's thread, outside the lock.
  uint64_t Subscribe(const std::string& job_id, Callback cb);
  void Unsubscribe(uint64_t token);
  void Publish(const std::string& job_id);
  // Every subscriber: any job may have changed (another server's changes could not be followed).
  void PublishAll();

 private:
  struct Sub {
    std::string job_id;
    Callback cb;
  };
  std::mutex mu_;  // guards subs_ and next_
  std::map<uint64_t, Sub> subs_;
  uint64_t next_ = 1;
};

}  // namespace pare::server
