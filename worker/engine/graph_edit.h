// Editing a TorchScript model through its forward graph, shared by the passes that change a
// model's structure (channel pruning, factorization, batch-norm folding).
//
// A scripted model's layers share class types (and so the constants in their methods), so
// per-layer structure changes are made in the top module's forward graph, inlined, where every
// call site has its own nodes; parameters stay attributes, so the model still trains.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/script.h>

namespace pare::engine {

using AttrPath = std::vector<std::string>;

std::string Join(const AttrPath& p);

// Calls `f` on every node of `block` and of the blocks nested in it, each node before its own
// blocks. `f` may collect nodes, not destroy them.
void ForEachNode(torch::jit::Block* block, const std::function<void(torch::jit::Node*)>& f);

// What a node computes, for the passes that treat convolutions and linear layers: a
// convolution (conv1d/2d/3d, or _convolution not transposed), a transposed convolution, a
// linear layer, or none of those.
enum class LayerOp { kNone, kConv, kTransposedConv, kLinear };
LayerOp LayerOpOf(const torch::jit::Node* n);

// Inlines `module`'s forward (in place: call it on a clone), lowers tuples and list appends,
// folds bool/int/float/str attributes the graph never assigns (other than `training`), int lists
// only `permute` reads, and dead branches.
std::shared_ptr<torch::jit::Graph> InlineForward(torch::jit::Module& module);

// What a graph value holds: None, a tensor attribute reached from `self` (through Optional
// refinements and `x if cond else None` branches), or something else.
struct Source {
  enum Kind { kNone, kAttr, kOther } kind = kOther;
  AttrPath path;
};
Source Resolve(const torch::jit::Module& root, torch::jit::Value* v, torch::jit::Value* self);

// The tensor attribute at `path` (undefined when it is not a tensor), and replacing it.
at::Tensor TensorAt(const torch::jit::Module& root, const AttrPath& path);
void SetTensorAt(const torch::jit::Module& root, const AttrPath& path, const at::Tensor& t);

}  // namespace pare::engine
