#include "server/job_end.h"

#include "common/logging.h"

namespace pare::server {

void JobChanged(const ServiceContext& ctx, const JobRecord& job, const std::string& device) {
  if (IsTerminal(job.state)) {
    spdlog::info(Kv({{"msg", "job ended"},
                     {"job", job.id},
                     {"model", job.model_id},
                     {"state", JobStateName(job.state)},
                     {"attempts", std::to_string(job.attempts)},
                     {"reason", job.error_reason}}));
  }
  if (ctx.metrics) ctx.metrics->JobEnded(job, device);
  if (ctx.events) ctx.events->Publish(job.id);
}

}  // namespace pare::server
