// The few LibTorch facts the worker process reports, kept behind a torch-free header.
#pragma once

#include <string>

namespace pare::worker {

bool CudaAvailable();
std::string LibTorchVersion();

}  // namespace pare::worker
