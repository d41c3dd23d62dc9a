// What the gRPC service implementations share: state, blobs, the work pool, job events,
// the clock and the limits. Owned by Server; the services hold a pointer.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "server/archive_check.h"
#include "server/auth.h"
#include "server/blob_store.h"
#include "server/clock.h"
#include "server/executor.h"
#include "server/job_events.h"
#include "server/metrics.h"
#include "server/store.h"

namespace pare::server {

struct Limits {
  uint64_t max_upload_bytes = uint64_t(2) << 30;  // one model or dataset upload
  ArchiveLimits archive;                          // entries and uncompressed bytes of an upload
  int64_t lease_ttl_ms = 15000;                   // a worker that misses heartbeats this long loses its job
  int max_attempts = 3;                           // leases a job may take before it fails
  int max_page_size = 500;                        // ListJobs
  uint64_t tenant_max_bytes = 0;                  // models + datasets a tenant may store (0: no limit)
  int64_t tenant_max_active_jobs = 1000;          // queued + running jobs of one tenant
  int64_t max_queued_jobs = 100000;               // queued jobs of all tenants together
  int64_t max_job_seconds = 3600;                 // the longest wall-clock limit a job may ask for
};

// Workers as the server sees them through their calls: last contact, device kind, lease held.
class WorkerRegistry {
 public:
  void Seen(const std::string& id, const std::string& device_kind, bool busy, int64_t now_ms) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& w = workers_[id];
    if (!device_kind.empty()) w.device = device_kind;
    w.last_ms = now_ms;
    w.busy = busy;
  }
  void Touch(const std::string& id, bool busy, int64_t now_ms) { Seen(id, "", busy, now_ms); }
  std::string DeviceOf(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = workers_.find(id);
    return it == workers_.end() ? "" : it->second.device;
  }
  // device kind -> (connected, busy): seen within `window_ms`; older entries are forgotten.
  std::map<std::string, std::pair<int, int>> Snapshot(int64_t now_ms, int64_t window_ms) {
    std::lock_guard<std::mutex> lock(mu_);
    std::map<std::string, std::pair<int, int>> out;
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (now_ms - it->second.last_ms > window_ms) {
        it = workers_.erase(it);
        continue;
      }
      auto& c = out[it->second.device.empty() ? "cpu" : it->second.device];
      ++c.first;
      if (it->second.busy) ++c.second;
      ++it;
    }
    return out;
  }

 private:
  struct Seen_ {
    std::string device;
    int64_t last_ms = 0;
    bool busy = false;
  };
  std::mutex mu_;
  std::map<std::string, Seen_> workers_;
};

struct ServiceContext {
  Store* store = nullptr;
  BlobStore* blobs = nullptr;
  Executor* executor = nullptr;
  JobEvents* events = nullptr;
  const Clock* clock = nullptr;
  const Authenticator* auth = nullptr;  // who the caller is (client tenant or worker)
  Metrics* metrics = nullptr;
  WorkerRegistry* workers = nullptr;
  Limits limits;
  std::atomic<bool> draining{false};  // set on SIGTERM: new uploads and jobs get UNAVAILABLE
};

}  // namespace pare::server
