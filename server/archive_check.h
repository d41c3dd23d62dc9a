// Cheap structural checks of uploads without LibTorch: a model must be a zip archive with
// the TorchScript layout, bounded in entries and uncompressed size; datasets must look
// like their declared format. Deeper parsing happens only in worker processes.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace pare::server {

struct ArchiveLimits {
  uint64_t max_entries = 100000;                         // entries in one archive
  uint64_t max_uncompressed_bytes = uint64_t(16) << 30;  // all entries together, decompressed
};

// INVALID_ARGUMENT with what is wrong, e.g. "not a zip archive (truncated or corrupt)".
Status CheckTorchScriptArchive(const std::string& path, const ArchiveLimits& limits);

// `format` is "tensors" (a torch.save zip), "idx" (an IDX file, gzip allowed, or a tar of
// IDX files) or "image-folder" (a tar, gzip allowed, of class folders of images).
Status CheckDataset(const std::string& path, const std::string& format, const ArchiveLimits& limits);

bool IsKnownDatasetFormat(const std::string& format);

}  // namespace pare::server
