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

// The TorchScript IR names the graph passes use: `using namespace pare::engine::ir;`.
namespace ir {
using torch::jit::Block;
using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;
namespace aten = c10::aten;
namespace prim = c10::prim;
}  // namespace ir

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

// `[v for _ in range(n)]` as TorchScript compiles it (an empty list, then a loop of n trips
// whose body only appends `v`, defined outside it: F.interpolate's scale factors) becomes
// `[v] * n`, without the loop. LibTorch's graph-mode quantization passes drop such loops and
// leave the list empty. Returns how many were rewritten; `dry_run` only counts them.
int RepeatListLoops(const std::shared_ptr<torch::jit::Graph>& graph, bool dry_run = false);

// Replaces `x.dim()` with a constant, the rank `x` has when the forward runs on `example` (its
// arguments, without self), so that branches on rank (F.interpolate's choice of
// upsample_nearest1d/2d/3d) fold away: LibTorch's quantization passes hoist the ops of such
// branches and run all of them. The graph stays valid for any batch and spatial size, for
// inputs of those ranks. `graph` is the forward graph of `module`. Returns how many.
int FoldRanks(const torch::jit::Module& module, const std::shared_ptr<torch::jit::Graph>& graph,
              const std::vector<c10::IValue>& example);

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

// Folds eval-mode batch norms into the convolutions that feed them, in an inlined forward
// graph (the module-level pass of LibTorch only sees conv/bn submodule calls). Returns how many
// were folded.
int FoldInlinedConvBatchNorm(torch::jit::Module& module);

}  // namespace pare::engine
