// Packs an IDX images file and its labels file into one tar, the form an idx dataset
// with labels is uploaded in.
#pragma once

#include <string>

#include "common/status.h"

namespace pare::client {

Status PackIdxPair(const std::string& images, const std::string& labels, const std::string& out_tar);

// Packs an image-folder dataset (CLASS/IMAGE files and preprocess.json) into a tar.
Status PackImageFolder(const std::string& folder, const std::string& out_tar);

}  // namespace pare::client
