// Datasets the engine reads: a torch.save dict of tensors, or IDX files (MNIST layout).
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

struct Dataset {
  // N first, float32: N x C x H x W for images; a tensors file may hold any rank >= 2 (N x C x L
  // for 1-D signals, N x F for features). A rank-3 tensors file is ambiguous (grayscale N x H x W
  // or N x C x L): `rank3_ambiguous` is set and the engine decides against the model's input.
  at::Tensor images;
  bool rank3_ambiguous = false;
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
