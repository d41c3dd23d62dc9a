// Store records to and from the public proto messages: the only place that knows both.
#pragma once

#include "pare/v1/compression.pb.h"
#include "server/store.h"

namespace pare::server {

v1::Model ToProto(const ModelRecord& m);
v1::Dataset ToProto(const DatasetRecord& d);
v1::Job ToProto(const JobRecord& j);
v1::JobState ToProto(JobState s);
JobState FromProto(v1::JobState s);

}  // namespace pare::server
