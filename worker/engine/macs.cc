#include "worker/engine/macs.h"

#include "worker/engine/model_util.h"

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/constants.h>

#include <functional>

namespace pare::engine {
namespace {

enum class OpKind { kConv, kConvTranspose, kLinear, kMatmul, kAddmm, kRnn, kOther };

OpKind KindOf(const torch::jit::Node* n) {
  const auto k = n->kind();
  if (k == c10::aten::conv1d || k == c10::aten::conv2d || k == c10::aten::conv3d) return OpKind::kConv;
  if (k == c10::aten::conv_transpose1d || k == c10::aten::conv_transpose2d ||
      k == c10::aten::conv_transpose3d) {
    return OpKind::kConvTranspose;
  }
  if (k == c10::aten::_convolution || k == c10::aten::convolution) {
    auto transposed = torch::jit::toIValue(n->input(6));
    return transposed && transposed->isBool() && transposed->toBool() ? OpKind::kConvTranspose
                                                                      : OpKind::kConv;
  }
  if (k == c10::aten::linear) return OpKind::kLinear;
  if (k == c10::aten::matmul || k == c10::aten::mm || k == c10::aten::bmm) return OpKind::kMatmul;
  if (k == c10::aten::addmm) return OpKind::kAddmm;
  if (k == c10::aten::lstm || k == c10::aten::gru || k == c10::aten::rnn_tanh || k == c10::aten::rnn_relu) {
    return OpKind::kRnn;
  }
  return OpKind::kOther;
}

int64_t Product(at::IntArrayRef v, size_t from) {
  int64_t p = 1;
  for (size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

// A counted node: which of the graph's extra outputs hold its values, and what turns their shapes
// into MACs.
struct Probe {
  OpKind kind;
  std::vector<int64_t> weight;  // constant weight's shape, when the op has one
  size_t first_output = 0;      // index among the extra outputs
  int64_t rnn_weights = 0;      // RNNs: elements of all their weight matrices
};

// Brings each countable node's output (and the input whose shape it needs) out of the frozen
// `graph` as extra outputs. Nodes inside control flow are counted in `hidden_ops` only; sets
// `quantized` when a quantized op shows up (those hide their shapes in packed weights).
std::vector<Probe> AddProbes(const std::shared_ptr<torch::jit::Graph>& graph, MacsCount& count,
                             bool& quantized) {
  std::vector<Probe> probes;
  const size_t base_outputs = graph->outputs().size();
  std::function<void(torch::jit::Block*, bool)> visit = [&](torch::jit::Block* block, bool nested) {
    for (torch::jit::Node* n : block->nodes()) {
      for (auto* b : n->blocks()) visit(b, true);
      if (std::string(n->kind().ns().toUnqualString()) == "quantized") quantized = true;
      OpKind kind = KindOf(n);
      if (kind == OpKind::kOther) continue;
      if (nested) {
        ++count.hidden_ops;
        continue;
      }
      Probe p{kind, {}, graph->outputs().size() - base_outputs};
      if (kind == OpKind::kConv || kind == OpKind::kConvTranspose || kind == OpKind::kLinear) {
        auto w = torch::jit::toIValue(n->input(1));
        if (!w || !w->isTensor()) continue;
        p.weight = w->toTensor().sizes().vec();
      }
      if (kind == OpKind::kRnn) {
        // The weight list is input 2 (sequences) or 3 (packed sequences, after batch_sizes).
        const torch::jit::FunctionSchema* schema = n->maybeSchema();
        if (!schema) continue;
        auto params = torch::jit::toIValue(n->input(schema->overload_name() == "data" ? 3 : 2));
        if (!params || !params->isTensorList()) continue;
        for (const at::Tensor& w : params->toTensorVector()) {
          if (w.dim() == 2) p.rnn_weights += w.numel();
        }
      }
      graph->registerOutput(n->outputs()[0]);
      if (kind == OpKind::kConvTranspose) graph->registerOutput(n->input(0));
      if (kind == OpKind::kMatmul) graph->registerOutput(n->input(0));
      if (kind == OpKind::kAddmm) graph->registerOutput(n->input(1));
      probes.push_back(std::move(p));
    }
  };
  visit(graph->block(), false);
  return probes;
}

// One probed node's MACs; `out(i)` is the i-th extra output of the run.
double MacsOf(const Probe& p, const std::function<at::Tensor(size_t)>& out) {
  const at::Tensor y = out(p.first_output);
  switch (p.kind) {
    case OpKind::kConv:  // output elements x (input channels per group x kernel)
      return double(y.numel()) * double(Product(p.weight, 1));
    case OpKind::kConvTranspose:  // every input element feeds (output channels per group x kernel)
      return double(out(p.first_output + 1).numel()) * double(Product(p.weight, 1));
    case OpKind::kLinear: return double(y.numel()) * double(p.weight.back());
    case OpKind::kMatmul:
    case OpKind::kAddmm: {
      const at::Tensor a = out(p.first_output + 1);
      return double(y.numel()) * double(a.dim() ? a.size(-1) : 1);
    }
    case OpKind::kRnn:  // every step of every sequence multiplies by each weight matrix once
      return double(y.numel() / std::max<int64_t>(1, y.size(-1))) * double(p.rnn_weights);
    case OpKind::kOther: break;
  }
  return 0;
}

}  // namespace

std::optional<MacsCount> CountMacs(const torch::jit::Module& module, const std::vector<int64_t>& input_shape,
                                   const std::vector<std::vector<int64_t>>& more_inputs) {
  // freeze() works on its own copy, but only of a module in eval mode.
  torch::jit::Module source = module;
  if (module.is_training()) {
    source = module.clone();
    source.eval();
  }
  torch::jit::Module frozen;
  try {
    frozen = torch::jit::freeze(source, c10::nullopt, /*optimize_numerics=*/false);
  } catch (const std::exception&) {
    return std::nullopt;  // already frozen (quantized models are)
  }
  auto graph = frozen.get_method("forward").graph()->copy();
  MacsCount count;
  const size_t base_outputs = graph->outputs().size();
  bool quantized = false;
  const std::vector<Probe> probes = AddProbes(graph, count, quantized);
  if (quantized) return std::nullopt;
  // A function returns one value: pack the original and the probed outputs into a tuple.
  std::vector<torch::jit::Value*> outputs(graph->outputs().begin(), graph->outputs().end());
  graph->setInsertPoint(graph->block());
  torch::jit::Node* tuple = graph->insertNode(graph->createTuple(outputs));
  while (!graph->outputs().empty()) graph->eraseOutput(0);
  graph->registerOutput(tuple->output());

  torch::jit::GraphFunction fn("pare_count_macs", graph, nullptr);
  std::vector<int64_t> shape = input_shape;
  shape[0] = 1;
  // Frozen weights are graph constants on the model's device: the input goes there too.
  const c10::Device device = ModuleDevice(module);
  torch::jit::Stack stack{frozen._ivalue(), at::randn(shape, at::TensorOptions().device(device))};
  for (const at::Tensor& t : RandomInputs(more_inputs, 1, device)) stack.push_back(t);
  {
    c10::InferenceMode guard;
    fn.run(stack);
  }
  const auto& values = stack.at(0).toTupleRef().elements();
  auto out = [&](size_t i) { return values.at(base_outputs + i).toTensor(); };
  for (const auto& p : probes) {
    count.macs += MacsOf(p, out);
    ++count.counted_ops;
  }
  return count;
}

}  // namespace pare::engine
