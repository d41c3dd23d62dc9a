#include "server/convert.h"

#include <google/protobuf/util/time_util.h>

namespace pare::server {
namespace {

void SetTime(int64_t ms, google::protobuf::Timestamp* t) {
  if (ms > 0) *t = google::protobuf::util::TimeUtil::MillisecondsToTimestamp(ms);
}

}  // namespace

v1::Model ToProto(const ModelRecord& m) {
  v1::Model p;
  p.set_id(m.id);
  p.set_name(m.name);
  p.set_sha256(m.sha256);
  p.set_size_bytes(m.size_bytes);
  for (int64_t d : m.input_shape) p.add_input_shape(d);
  for (const auto& more : m.more_input_shapes) {
    auto* shape = p.add_more_input_shapes();
    for (int64_t d : more) shape->add_dims(d);
  }
  SetTime(m.created_ms, p.mutable_created_at());
  return p;
}

v1::Dataset ToProto(const DatasetRecord& d) {
  v1::Dataset p;
  p.set_id(d.id);
  p.set_name(d.name);
  p.set_sha256(d.sha256);
  p.set_size_bytes(d.size_bytes);
  p.set_format(d.format);
  SetTime(d.created_ms, p.mutable_created_at());
  return p;
}

v1::JobState ToProto(JobState s) { return static_cast<v1::JobState>(static_cast<int>(s)); }
JobState FromProto(v1::JobState s) { return static_cast<JobState>(static_cast<int>(s)); }

v1::Job ToProto(const JobRecord& j) {
  v1::Job p;
  p.set_id(j.id);
  p.set_model_id(j.model_id);
  p.mutable_recipe()->ParseFromString(j.recipe_pb);
  p.set_calibration_dataset_id(j.calibration_dataset_id);
  p.set_train_dataset_id(j.train_dataset_id);
  p.set_eval_dataset_id(j.eval_dataset_id);
  p.set_device(j.device);
  p.set_request_id(j.request_id);
  p.set_state(ToProto(j.state));
  p.set_attempts(j.attempts);
  if (!j.progress_pb.empty()) p.mutable_progress()->ParseFromString(j.progress_pb);
  if (!j.reports_pb.empty()) {
    v1::Job reports;  // reports are stored as a Job message holding only `reports`
    if (reports.ParseFromString(j.reports_pb)) *p.mutable_reports() = reports.reports();
  }
  if (!j.error_code.empty()) {
    p.mutable_error()->set_code(j.error_code);
    p.mutable_error()->set_reason(j.error_reason);
    p.mutable_error()->set_message(j.error_message);
  }
  p.set_result_sha256(j.result_sha256);
  p.set_result_size_bytes(j.result_size_bytes);
  p.set_worker(j.worker);
  SetTime(j.created_ms, p.mutable_created_at());
  SetTime(j.started_ms, p.mutable_started_at());
  SetTime(j.finished_ms, p.mutable_finished_at());
  return p;
}

}  // namespace pare::server
