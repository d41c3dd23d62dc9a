#include "server/job_events.h"

#include <vector>

namespace pare::server {

uint64_t JobEvents::Subscribe(const std::string& job_id, Callback cb) {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t token = next_++;
  subs_[token] = Sub{job_id, std::move(cb)};
  return token;
}

void JobEvents::Unsubscribe(uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  subs_.erase(token);
}

void JobEvents::Publish(const std::string& job_id) {
  std::vector<Callback> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [token, sub] : subs_) {
      if (sub.job_id == job_id) callbacks.push_back(sub.cb);
    }
  }
  for (auto& cb : callbacks) cb();
}

void JobEvents::PublishAll() {
  std::vector<Callback> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [token, sub] : subs_) callbacks.push_back(sub.cb);
  }
  for (auto& cb : callbacks) cb();
}

}  // namespace pare::server
