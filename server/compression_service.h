// The public pare.v1.Compression service (callback API): translates proto <-> records at
// the edge and hands all store and disk work to the executor.
#pragma once

#include "pare/v1/compression.grpc.pb.h"
#include "server/service_context.h"

namespace pare::server {

class CompressionService final : public v1::Compression::CallbackService {
 public:
  explicit CompressionService(ServiceContext* ctx) : ctx_(ctx) {}

  grpc::ServerReadReactor<v1::UploadRequest>* UploadModel(grpc::CallbackServerContext* call,
                                                          v1::Model* resp) override;
  grpc::ServerReadReactor<v1::UploadRequest>* UploadDataset(grpc::CallbackServerContext* call,
                                                            v1::Dataset* resp) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* call, const v1::GetModelRequest* req,
                                     v1::Model* resp) override;
  grpc::ServerUnaryReactor* GetDataset(grpc::CallbackServerContext* call, const v1::GetDatasetRequest* req,
                                       v1::Dataset* resp) override;
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* call, const v1::SubmitJobRequest* req,
                                      v1::Job* resp) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* call, const v1::GetJobRequest* req,
                                   v1::Job* resp) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* call, const v1::ListJobsRequest* req,
                                     v1::ListJobsResponse* resp) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* call, const v1::CancelJobRequest* req,
                                      v1::Job* resp) override;
  grpc::ServerWriteReactor<v1::Job>* WatchJob(grpc::CallbackServerContext* call,
                                              const v1::WatchJobRequest* req) override;
  grpc::ServerWriteReactor<v1::Chunk>* DownloadResult(grpc::CallbackServerContext* call,
                                                      const v1::DownloadRequest* req) override;

 private:
  Result<std::string> Admit(grpc::CallbackServerContext* call, bool new_work);
  // A tenant's unary call: admitted (authenticated; refused while draining when it brings
  // `new_work`), then `body(tenant)` run on the executor, its Status the call's.
  template <typename F>
  grpc::ServerUnaryReactor* ForTenant(grpc::CallbackServerContext* call, bool new_work, F&& body);

  ServiceContext* ctx_;
};

}  // namespace pare::server
