#include "worker/torch_info.h"

#include <torch/cuda.h>
#include <torch/version.h>

namespace pare::worker {

bool CudaAvailable() { return torch::cuda::is_available(); }
std::string LibTorchVersion() { return TORCH_VERSION; }

}  // namespace pare::worker
