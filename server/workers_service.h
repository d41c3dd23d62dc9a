// The internal pare.v1.Workers service: workers lease jobs, heartbeat progress, fetch
// their inputs by digest and stream their results back.
#pragma once

#include "pare/v1/workers.grpc.pb.h"
#include "server/service_context.h"

namespace pare::server {

class WorkersService final : public v1::Workers::CallbackService {
 public:
  explicit WorkersService(ServiceContext* ctx) : ctx_(ctx) {}

  grpc::ServerUnaryReactor* Lease(grpc::CallbackServerContext* call, const v1::LeaseRequest* req,
                                  v1::LeaseResponse* resp) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* call, const v1::HeartbeatRequest* req,
                                      v1::HeartbeatResponse* resp) override;
  grpc::ServerWriteReactor<v1::Chunk>* Fetch(grpc::CallbackServerContext* call,
                                             const v1::FetchRequest* req) override;
  grpc::ServerReadReactor<v1::CompleteRequest>* Complete(grpc::CallbackServerContext* call,
                                                         v1::CompleteResponse* resp) override;

 private:
  ServiceContext* ctx_;
};

}  // namespace pare::server
