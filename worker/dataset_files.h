// Turns a fetched dataset blob into what the engine reads: a file, or a folder unpacked
// from a tar. Unpacking never leaves the job's folder (no absolute paths, no "..", no links).
#pragma once

#include <string>

#include "common/status.h"
#include "worker/engine/engine.h"

namespace pare::worker {

Result<engine::DatasetInput> PrepareDataset(const std::string& blob_path, const std::string& format,
                                            const std::string& unpack_dir);

}  // namespace pare::worker
