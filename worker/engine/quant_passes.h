// Static INT8's parts (internal to the engine): the observers LibTorch's graph-mode passes
// insert, and the graph edits Pare makes around those passes. quantize.cc drives them.
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

// The graph-mode passes read an observer's `dtype` and `qscheme` attributes and call its
// `calculate_qparams()`; the observers are TorchScript classes (quant_observers.cc).
// Activation observer for static quantization (affine uint8). All four kinds track the
// running range; HISTOGRAM and PERCENTILE also keep a bounded, evenly thinned sample of
// the values, from which calculate_qparams picks the range.
torch::jit::Module MakeActivationObserver(const std::string& kind, bool reduce_range);

// Weight observer: per-channel (output channel) or per-tensor symmetric int8.
torch::jit::Module MakeWeightObserver(bool per_channel);

// InsertQuantDeQuant can put one `dequantize` on a returned (named) tuple, which does not
// type-check when the model is loaded again: dequantize each tensor of the tuple instead.
void DequantizeTupleElements(const std::shared_ptr<torch::jit::Graph>& graph);

// Whether the forward graph still calls submodule methods (else it is one inlined graph).
bool CallsSubmodules(const torch::jit::Module& module);

// A quantized model only runs in eval mode: `self.training` branches in the forward graph
// (GoogLeNet's auxiliary heads) are folded away, since observers cannot follow values that
// only one branch produces.
// Folds reads of `training` (false: the model is quantized for inference) in every module's
// methods, and, in the top module's own, of bool attributes no method assigns (Inception's
// `transform_input`), so that branches on them disappear before observers are inserted:
// graph-mode quantization refuses an `if` whose branches it would observe differently. The top
// module's class type is its own, so its methods may be specialized to its values.
void SpecializeForEval(torch::jit::Module& module);

// LibTorch has no per-channel transposed convolutions ("Per Channel Quantization is currently
// disabled for transposed conv"): after InsertObservers, the weight observers of transposed
// convolutions (in every module's methods) observe per tensor. Returns how many.
int PerTensorTransposedWeights(torch::jit::Module& observed);

// LibTorch 1.13's oneDNN (ideep) caches its inner-product kernels by shapes and attributes but
// not by the output zero point (intel/ideep#152, fixed after 1.13): a quantized linear of the
// same configuration as one run before, with another output zero point, runs with the first
// one's, in the same model or in another model loaded in the same process. Measured: two INT8
// variants of one VGG-style net (8- and 7-bit activations) run one after the other in one
// Python process: the second drops from 0.995 to 0.17 centred cosine. Convolutions are not
// affected (their kernels are cached per packed weight, with the zero points: giving them the
// middle zero point too cost MobileNetV1 0.02 cosine for nothing). Every quantized::linear whose
// output is not fused with a relu (those always have zero point 0) gets the middle zero point
// (128; 64 for 7-bit activations) and the scale that keeps its whole range, so no two differ.
// Costs up to one bit on a layer whose range is one-sided. Returns how many changed.
int MiddleOutputZeroPoints(const std::shared_ptr<torch::jit::Graph>& graph, int64_t quant_max);

// Quantized convolutions hand back channels-last tensors, on which a `view` (`x.view(-1, 320)`
// after the last pool) fails: "view size is not compatible with input tensor's size and
// stride". PyTorch's quantize_jit leaves such models broken. Every view reads a contiguous
// copy instead (`contiguous()` returns the tensor itself when it already is). Returns how many.
int ContiguousBeforeView(const std::shared_ptr<torch::jit::Graph>& graph);

// Whether module path `path` is one of `roots` or lies under one ("layer4.1.conv2" under "layer4").
bool UnderAny(const std::string& path, const std::set<std::string>& roots);

// After InsertObservers, for a forward that runs its layers inline (a channel-pruned model, or
// one inlined for quantization): the conv and linear nodes of the top graph whose weight belongs
// to a layer under one of `keep_float` lose their weight observer, so they stay float between a
// dequantize and a quantize. (Layers called as submodules stay float through the qconfig dict.)
// Returns the layer paths so kept.
std::set<std::string> UnobserveWeights(const torch::jit::Module& observed,
                                       const std::set<std::string>& keep_float);

// The convolutions and linear layers a quantized graph still runs in float.
std::vector<std::string> FloatLayers(const std::shared_ptr<torch::jit::Graph>& graph);

// The other ops a quantized graph runs in float between quantized ones (dequantized inputs, an
// output quantized again: PReLU, a loop LibTorch cannot quantize), counted by kind, conv/linear
// left out (FloatLayers has them).
std::vector<std::string> FloatBetweenQuantized(const std::shared_ptr<torch::jit::Graph>& graph);

}  // namespace pare::engine
