// The few LibTorch facts the worker process reports, kept behind a torch-free header.
#pragma once

#include <string>

namespace pare::worker {

bool CudaAvailable();
std::string LibTorchVersion();
// "NVIDIA H100 80GB HBM3" (from the NVIDIA driver's /proc entry) when CUDA is available,
// else the CPU's model name; "cuda" or "cpu" when neither can be read.
std::string DeviceName(bool cuda);

}  // namespace pare::worker
