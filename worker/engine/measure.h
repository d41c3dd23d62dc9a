// Measurements behind the report: file size (raw and deflated), parameter counts and
// per-layer sparsity, latency percentiles, agreement with the original, accuracy.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/script.h>

#include "worker/engine/dataset.h"
#include "worker/engine/report.h"

namespace pare::engine {

using NamedOutputs = std::vector<std::pair<std::string, at::Tensor>>;

struct MeasureContext {
  c10::Device device = c10::kCPU;
  std::vector<int64_t> input_shape;               // batch dimension first
  std::vector<std::vector<int64_t>> more_shapes;  // forward's further inputs (synthetic), batch first
  at::Tensor samples;                             // inputs for agreement (CPU)
  std::vector<at::Tensor> more_samples;           // the further inputs that go with them
  // The original model's outputs on `samples` (CPU, float), every tensor forward returns, the
  // primary one first (see OutputTensors).
  NamedOutputs reference;
  const Dataset* eval = nullptr;  // with labels, for accuracy
  std::vector<int> latency_batches;
  // Seconds spent timing one batch size, its warm-up included (at least 2 warm-up and 3 timed
  // runs whatever it is).
  double latency_budget_seconds = 0.5;
  std::function<void()> check_cancel;  // throws Cancelled when the job was cancelled
};

// The p-quantile (0..1) of `v`, interpolated between neighbours; 0 when empty.
double Percentile(std::vector<double> v, double p);

// Size in bytes of `path` after deflate (level 6, in independent 4 MiB blocks compressed in
// parallel): about the storage a zip of it would take.
uint64_t DeflatedSize(const std::string& path);

// Runs `module` on `inputs` in batches and returns its float outputs on the CPU.
// `more`: forward's further inputs, batched alike.
at::Tensor RunBatched(torch::jit::Module& module, const at::Tensor& inputs, c10::Device device, int64_t batch,
                      const std::function<void()>& check_cancel, const std::vector<at::Tensor>& more = {});

// Like RunBatched, with every tensor forward returns (OutputTensors' names and order).
NamedOutputs RunBatchedOutputs(torch::jit::Module& module, const at::Tensor& inputs, c10::Device device,
                               int64_t batch, const std::function<void()>& check_cancel,
                               const std::vector<at::Tensor>& more = {});

// How closely `out` follows `reference` (rows are samples): the mean cosine of the rows, and the
// mean cosine after subtracting the reference's mean row from both (what the outputs vary by
// input; a model that returns the same output for every input scores about 0, where the plain
// cosine can stay near 1). The centred figure needs 2 or more rows; with one it is the plain one.
std::pair<double, double> OutputCosines(const at::Tensor& out, const at::Tensor& reference);

// Whether the module holds packed quantized weights (and therefore runs on the CPU only).
bool IsQuantized(const torch::jit::Module& module);

// Everything in ModelStats. Agreement compares the outputs on ctx.samples with ctx.reference; with
// no reference (the original model) the outputs are their own reference, and `outputs` (when
// given) receives them. Batch-1 latency is timed on the samples themselves where they have the
// input shape, so the agreement runs are the timed runs.
ModelStats Measure(torch::jit::Module& module, const std::string& path, const MeasureContext& ctx,
                   NamedOutputs* outputs = nullptr);

// Only the latency at `batch`, as Measure times it (on ctx.device; the CPU for a quantized model).
Latency TimeLatency(torch::jit::Module& module, const MeasureContext& ctx, int batch);

}  // namespace pare::engine
