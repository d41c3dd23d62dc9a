// Datasets the engine reads: a torch.save dict of tensors, or IDX files (MNIST layout).
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

struct Dataset {
  at::Tensor images;  // N x C x H x W, float32
  at::Tensor labels;  // N, int64; undefined when the dataset has none
  // A model whose forward takes several tensors: its second, third... inputs ("images_1",
  // "images_2", ... in a tensors file), N first, float32.
  std::vector<at::Tensor> more_images;
  std::vector<std::string> class_names;  // image-folder: the class of each label
  size_t size() const { return images.defined() ? static_cast<size_t>(images.size(0)) : 0; }
};

// `format` is "tensors" (path: a torch.save file), "idx" (path: an IDX images file, gzip
// allowed, or a folder holding an images file and optionally a labels file) or "image-folder"
// (path: a folder of class folders, see image_folder.h).
// Throws EngineError(INVALID_ARGUMENT, "BAD_DATASET") naming the file and the problem.
Dataset LoadDataset(const std::string& format, const std::string& path);

}  // namespace pare::engine
