#include "worker/engine/quantize.h"

#include <torch/csrc/jit/passes/constant_propagation.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/quantization/finalize.h>
#include <torch/csrc/jit/passes/quantization/insert_observers.h>
#include <torch/csrc/jit/passes/quantization/insert_quant_dequant.h>

#include "worker/engine/error.h"

namespace pare::engine {
namespace {

// The graph-mode passes read an observer's `dtype` and `qscheme` attributes and call
// its `calculate_qparams()`; these observers are TorchScript classes defined here.
torch::jit::Module MakeWeightMinMaxObserver() {
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.WeightMinMaxObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("min_val", c10::TensorType::get(), at::full({}, INFINITY), false, true);
  obs.register_attribute("max_val", c10::TensorType::get(), at::full({}, -INFINITY), false, true);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQInt8));
  obs.register_attribute("qscheme", c10::IntType::get(),
                         static_cast<int64_t>(at::kPerTensorSymmetric));
  obs.register_attribute("quant_min", c10::IntType::get(), int64_t{-128});
  obs.register_attribute("quant_max", c10::IntType::get(), int64_t{127});
  obs.register_attribute("eps", c10::FloatType::get(), 1.1920928955078125e-07);
  obs.register_attribute("is_dynamic", c10::BoolType::get(), false);
  obs.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    if x.numel() > 0:
        v = x.detach().float()
        self.min_val = torch.minimum(torch.min(v), self.min_val.to(v.device))
        self.max_val = torch.maximum(torch.max(v), self.max_val.to(v.device))
    return x

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    lo = torch.clamp(self.min_val, max=0.0)
    hi = torch.clamp(self.max_val, min=0.0)
    amax = torch.maximum(-lo, hi)
    half_range = float(self.quant_max - self.quant_min) / 2.0
    scale = torch.clamp(amax / half_range, min=self.eps).reshape([1])
    zero_point = torch.zeros_like(scale).long()
    return scale, zero_point
)JIT");
  return obs;
}

// Dynamic activations are quantized at run time: the pass reads the observer's dtype and
// whether it is dynamic, and recognises it by "PlaceholderObserver" in the class name.
torch::jit::Module MakeDynamicActivationObserver() {
  torch::jit::Module obs(c10::QualifiedName("__torch__.pare.observers.DynamicPlaceholderObserver"));
  obs.register_attribute("training", c10::BoolType::get(), false);
  obs.register_attribute("dtype", c10::IntType::get(), static_cast<int64_t>(at::kQUInt8));
  // The pass dereferences these without checking: LibTorch 1.13 reads compute_dtype,
  // 2.x reads is_dynamic. Both are set so one engine works with either.
  obs.register_attribute("compute_dtype", c10::IntType::get(), static_cast<int64_t>(at::kQUInt8));
  obs.register_attribute("is_dynamic", c10::BoolType::get(), true);
  obs.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    return x

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    assert False, "dynamic activations have no fixed quantization parameters"
    return torch.ones([1]), torch.zeros([1]).long()
)JIT");
  return obs;
}

}  // namespace

torch::jit::Module QuantizeDynamic(const torch::jit::Module& input) {
  if (!input.find_method("forward")) {
    throw EngineError(Code::kInvalidArgument, "MODEL_FORMAT", "the model has no forward method");
  }
  torch::jit::Module module = input.clone();
  module.eval();
  torch::jit::QConfigDict qconfig;
  qconfig[""] = std::make_tuple(MakeDynamicActivationObserver(), MakeWeightMinMaxObserver());
  torch::jit::Module observed =
      torch::jit::InsertObservers(module, "forward", qconfig, /*inplace=*/false, torch::jit::QuantType::DYNAMIC);
  torch::jit::Module quantized = torch::jit::InsertQuantDeQuant(observed, "forward", /*inplace=*/false,
                                                                /*debug=*/false, torch::jit::QuantType::DYNAMIC);
  quantized = torch::jit::Finalize(quantized, torch::jit::QuantType::DYNAMIC, {});
  auto graph = quantized.get_method("forward").graph();
  torch::jit::ConstantPropagation(graph);
  torch::jit::EliminateDeadCode(graph);
  return quantized;
}

}  // namespace pare::engine
