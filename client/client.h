// C++ client of pare.v1.Compression: chunked uploads with digests, job calls, a watch
// stream, and downloads that resume from a partial file.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/tls.h"
#include "pare/v1/compression.grpc.pb.h"

namespace pare::client {

struct ClientOptions {
  std::string server = "127.0.0.1:50051";
  double deadline_seconds = 30;             // unary calls
  double transfer_deadline_seconds = 3600;  // uploads and downloads
  std::string token;                        // bearer token; empty: none sent
  TlsClientFiles tls;                       // TLS (and mutual TLS) to the server
};

class Client {
 public:
  explicit Client(ClientOptions options);
  explicit Client(std::shared_ptr<grpc::Channel> channel, ClientOptions options = {});

  // `progress` gets bytes sent so far and the total.
  using ByteProgress = std::function<void(uint64_t done, uint64_t total)>;
  Result<v1::Model> UploadModel(const std::string& path, const std::string& name,
                                const std::vector<int64_t>& input_shape,
                                const ByteProgress& progress = nullptr,
                                const std::vector<std::vector<int64_t>>& more_input_shapes = {});
  Result<v1::Dataset> UploadDataset(const std::string& path, const std::string& format,
                                    const std::string& name, const ByteProgress& progress = nullptr);
  Result<v1::Model> GetModel(const std::string& id);
  Result<v1::Dataset> GetDataset(const std::string& id);
  Result<v1::Job> Submit(const v1::SubmitJobRequest& req);
  Result<v1::Job> GetJob(const std::string& id);
  Result<v1::ListJobsResponse> ListJobs(int page_size, const std::string& page_token);
  Result<v1::Job> Cancel(const std::string& id);
  // Calls `on_update` for every state the server streams; returns the final job.
  // Reconnects (from the current state) if the stream breaks before the job ends.
  Result<v1::Job> Watch(const std::string& id, const std::function<void(const v1::Job&)>& on_update);
  // Writes to `out_path` via `out_path`.part, resuming from the part already there;
  // checks the whole file's digest before the rename.
  Status Download(const std::string& job_id, v1::ResultKind kind, const std::string& out_path,
                  const ByteProgress& progress = nullptr);

 private:
  std::unique_ptr<grpc::ClientContext> Ctx(double seconds) const;
  void Authorize(grpc::ClientContext* ctx) const;
  // One unary call with this client's deadline and token.
  template <typename Req, typename Resp>
  Result<Resp> Unary(grpc::Status (v1::Compression::Stub::*method)(grpc::ClientContext*, const Req&, Resp*),
                     const Req& req);
  template <typename Resp>
  Result<Resp> Upload(const std::string& path, v1::UploadHeader header, const ByteProgress& progress);

  ClientOptions options_;
  std::unique_ptr<v1::Compression::Stub> stub_;
};

}  // namespace pare::client
