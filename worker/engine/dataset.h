// Datasets the engine reads: a torch.save dict of tensors, or IDX files (MNIST layout).
#pragma once

#include <string>

#include <torch/script.h>

namespace pare::engine {

struct Dataset {
  at::Tensor images;  // N x C x H x W, float32
  at::Tensor labels;  // N, int64; undefined when the dataset has none
  size_t size() const { return images.defined() ? static_cast<size_t>(images.size(0)) : 0; }
};

// `format` is "tensors" (path: a torch.save file) or "idx" (path: an IDX images file,
// gzip allowed, or a folder holding an images file and optionally a labels file).
// Throws EngineError(INVALID_ARGUMENT, "BAD_DATASET") naming the file and the problem.
Dataset LoadDataset(const std::string& format, const std::string& path);

}  // namespace pare::engine
