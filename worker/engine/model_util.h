// Helpers over TorchScript modules shared by the passes: finding prunable weights,
// reading packed quantized weights, extracting the output tensor.
#pragma once

#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

// A conv or linear weight that the unstructured passes may change in place.
struct WeightRef {
  std::string name;   // qualified name of the owning module, e.g. "layer1.0.conv1"
  at::Tensor weight;  // the parameter itself (shares storage with the module)
  bool is_conv = false;
};

// Conv (1d/2d/3d, transposed too) and Linear weights, in module order.
std::vector<WeightRef> PrunableWeights(const torch::jit::Module& module);

// Whether `name` passes include/exclude substring filters (empty include = all).
bool NameSelected(const std::string& name, const std::vector<std::string>& include,
                  const std::vector<std::string>& exclude);

// Weights behind packed quantized parameters (linear and conv), by owner name.
struct PackedWeight {
  std::string name;
  at::Tensor weight;  // a quantized tensor
};
std::vector<PackedWeight> PackedWeights(const torch::jit::Module& module);

// Floating-point tensor constants baked into the methods' graphs of a frozen module,
// named "constant:<value name>", each storage once.
std::vector<PackedWeight> FrozenWeights(const torch::jit::Module& module);

// The shapes of a model's further inputs (batch first), after the job's input shape, for a
// forward that takes several tensors.
using InputShapes = std::vector<std::vector<int64_t>>;

// Standard-normal tensors of `shapes` with batch `batch` (0: as given), on `device`.
std::vector<at::Tensor> RandomInputs(const InputShapes& shapes, int64_t batch, c10::Device device,
                                     c10::optional<at::Generator> gen = c10::nullopt);

// The arguments of forward: `x` then `more`.
std::vector<c10::IValue> ForwardArgs(const at::Tensor& x, const std::vector<at::Tensor>& more);

// The device of the module's first parameter (CPU for a module without parameters).
c10::Device ModuleDevice(const torch::jit::Module& module);

// The tensor a model returned: itself, the first tensor of a tuple/list, or dict["out"].
at::Tensor OutputTensor(const c10::IValue& out);

// Every tensor a forward returned, named by where it sits: "" for a lone tensor, "[1]" in a
// tuple or list, "cls" in a dict, "[0].box" nested. The first is the one OutputTensor picks when
// a dict has no "out". Throws EngineError(MODEL_OUTPUT) when there is none.
std::vector<std::pair<std::string, at::Tensor>> OutputTensors(const c10::IValue& out);

// The part of an exception's message a person needs: LibTorch's without its C++ backtrace,
// a TorchScript error's own line rather than the traceback, at most 600 characters.
std::string ErrorText(const std::exception& e);

}  // namespace pare::engine
