// One sequence for a job that changed state outside a worker's heartbeat: a worker's completion,
// a lease that could not be described, a cancelled queued job, the lease reaper's requeue or
// failure. The end is counted (metrics ignore a job handed back to the queue), logged when it is
// one, and the job's watchers are woken.
#pragma once

#include <string>

#include "server/service_context.h"

namespace pare::server {

// `device`: the kind of worker that ran it ("cpu", "cuda"; "" when none did).
void JobChanged(const ServiceContext& ctx, const JobRecord& job, const std::string& device);

}  // namespace pare::server
