// What the gRPC service implementations share: state, blobs, the work pool, job events,
// the clock and the limits. Owned by Server; the services hold a pointer.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "server/archive_check.h"
#include "server/auth.h"
#include "server/blob_store.h"
#include "server/clock.h"
#include "server/executor.h"
#include "server/job_events.h"
#include "server/store.h"

namespace pare::server {

struct Limits {
  uint64_t max_upload_bytes = uint64_t(2) << 30;  // one model or dataset upload
  ArchiveLimits archive;                           // entries and uncompressed bytes of an upload
  int64_t lease_ttl_ms = 15000;                    // a worker that misses heartbeats this long loses its job
  int max_attempts = 3;                            // leases a job may take before it fails
  int max_page_size = 500;                         // ListJobs
};

struct ServiceContext {
  Store* store = nullptr;
  BlobStore* blobs = nullptr;
  Executor* executor = nullptr;
  JobEvents* events = nullptr;
  const Clock* clock = nullptr;
  const Authenticator* auth = nullptr;  // who the caller is (client tenant or worker)
  Limits limits;
  std::atomic<bool> draining{false};  // set on SIGTERM: new uploads and jobs get UNAVAILABLE
};


}  // namespace pare::server
