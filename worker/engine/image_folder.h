// image-folder datasets: a folder with one sub-folder per class (labels are the class folders
// in sorted order, as torchvision's ImageFolder numbers them) holding PNG or JPEG files, and
// optionally preprocess.json at its root:
//   {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
//    "grayscale": false}
// resize: the shorter side, bilinear; crop: a centred square; pixels are scaled to [0, 1],
// then (x - mean) / std per channel. Without resize and crop every image must have one size.
#pragma once

#include <string>
#include <vector>

#include "worker/engine/dataset.h"

namespace pare::engine {

struct ImagePreprocess {
  int64_t resize = 0;  // 0: none
  int64_t crop = 0;    // 0: none
  std::vector<double> mean, std;
  bool grayscale = false;
};

// Reads `folder`/preprocess.json (defaults when absent); EngineError BAD_DATASET naming the key.
ImagePreprocess ReadPreprocess(const std::string& folder);

// One PNG or JPEG file's bytes to an H x W x channels uint8 tensor (channels 1 or 3);
// EngineError BAD_DATASET naming `name` when it is neither or does not decode.
at::Tensor DecodeImage(const std::string& name, const std::vector<uint8_t>& bytes, int channels);

// Decodes and preprocesses every image; EngineError BAD_DATASET naming the file that fails.
Dataset LoadImageFolder(const std::string& folder);

}  // namespace pare::engine
