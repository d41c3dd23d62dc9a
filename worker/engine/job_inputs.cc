#include "worker/engine/job_inputs.h"

#include <algorithm>
#include <utility>

#include "worker/engine/error.h"
#include "worker/engine/model_util.h"

namespace pare::engine {
namespace {

// A job feeds forward one tensor per input shape it gives: the job's input shape, then
// more_input_shapes.
void CheckForwardInputs(torch::jit::Module& model, const CompressOptions& options) {
  if (!model.find_method("forward")) {
    throw EngineError(Code::kInvalidArgument, "MODEL_FORMAT", "the model has no forward method");
  }
  const auto& schema = model.get_method("forward").function().getSchema();
  std::vector<std::string> required;
  for (size_t i = 1; i < schema.arguments().size(); ++i) {
    if (!schema.arguments()[i].default_value()) required.push_back(schema.arguments()[i].name());
  }
  if (required.size() != 1 + options.more_input_shapes.size()) {
    std::string names;
    for (const auto& n : required) names += (names.empty() ? "" : ", ") + n;
    throw EngineError(
        Code::kInvalidArgument, "MODEL_INPUTS",
        "the model's forward takes " + std::to_string(required.size()) + " input(s) (" + names +
            ") but the job gives " + std::to_string(1 + options.more_input_shapes.size()) +
            " input shape(s): give one per input (pare compress --input-shape A --input-shape B)");
  }
  for (const auto& s : options.more_input_shapes) {
    bool ok = s.size() >= 2;
    for (int64_t d : s) ok &= d > 0;
    if (!ok) {
      throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                        "input shape " + c10::str(s) + " needs 2 or more positive dimensions, batch first");
    }
  }
}

// A rank-3 tensors dataset is either grayscale images (N x H x W, fed as N x 1 x H x W) or signals
// (N x C x L, fed as they are). The job's input shape decides when it names one; otherwise the
// model does: the grayscale reading when forward accepts one such sample (the long-standing
// reading, and a 2-d conv's), else the signal reading when forward accepts that.
void ResolveRank3Datasets(const std::vector<Dataset*>& datasets, const std::vector<int64_t>& input_shape,
                          torch::jit::Module& model) {
  const Dataset* first = nullptr;
  for (const Dataset* ds : datasets) {
    if (ds->size() && ds->rank3_ambiguous) {
      first = ds;
      break;
    }
  }
  if (!first) return;
  bool grayscale = true;
  if (!input_shape.empty()) {
    grayscale = input_shape.size() == 4 && input_shape[1] == 1;
  } else {
    auto accepts = [&](const at::Tensor& x) {
      std::vector<at::Tensor> more;
      for (const at::Tensor& t : first->more_images) more.push_back(t.slice(0, 0, 1));
      try {
        torch::NoGradGuard no_grad;
        model.eval();
        model.forward(ForwardArgs(x, more));
        return true;
      } catch (const std::exception&) {
        return false;
      }
    };
    const at::Tensor one = first->images.slice(0, 0, 1);
    grayscale = accepts(one.unsqueeze(1)) || !accepts(one);
  }
  for (Dataset* ds : datasets) {
    if (!ds->size() || !ds->rank3_ambiguous) continue;
    if (grayscale) ds->images = ds->images.unsqueeze(1).contiguous();
    ds->rank3_ambiguous = false;
  }
}

// The job's input shape, else one sample of `source`'s images, else [1, 3, 224, 224]; `note`
// says which when the job gave none.
std::vector<int64_t> ResolveInputShape(const CompressOptions& options, const Dataset* source,
                                       std::string& note) {
  std::vector<int64_t> shape = options.input_shape;
  if (shape.empty()) {
    shape =
        source ? std::vector<int64_t>(source->images.sizes().vec()) : std::vector<int64_t>{1, 3, 224, 224};
    shape[0] = 1;
    note = source ? "input shape " + c10::str(shape) + " taken from the dataset's images"
                  : "input shape " + c10::str(shape) + " (the default: no input shape and no dataset given)";
  }
  for (int64_t d : shape) {
    if (d <= 0)
      throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                        "input shape " + c10::str(shape) + " has a non-positive dimension");
  }
  return shape;
}

// A dataset fits the model's inputs: `images` the first, `images_1`, `images_2`... the further ones.
void CheckDatasetFits(const Dataset& ds, const std::string& role, const std::vector<int64_t>& shape,
                      const InputShapes& more_shapes) {
  if (ds.more_images.size() != more_shapes.size()) {
    throw EngineError(Code::kInvalidArgument, "MODEL_INPUTS",
                      "the " + role + " dataset holds " + std::to_string(1 + ds.more_images.size()) +
                          " input(s) per sample but the job gives the model " +
                          std::to_string(1 + more_shapes.size()) +
                          " (a tensors file holds the further inputs as images_1, images_2, ...)");
  }
  for (size_t i = 0; i < ds.more_images.size(); ++i) {
    auto got = ds.more_images[i].sizes().vec();
    const auto& want = more_shapes[i];
    if (!std::equal(got.begin() + 1, got.end(), want.begin() + 1, want.end())) {
      throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                        "the " + role + " dataset's images_" + std::to_string(i + 1) + " are " +
                            c10::str(at::IntArrayRef(got).slice(1)) + " but the model's input " +
                            std::to_string(i + 2) + " is " + c10::str(at::IntArrayRef(want).slice(1)));
    }
  }
  auto ds_shape = ds.images.sizes().vec();
  if (!std::equal(ds_shape.begin() + 1, ds_shape.end(), shape.begin() + 1, shape.end())) {
    throw EngineError(Code::kInvalidArgument, "BAD_INPUT_SHAPE",
                      "the " + role + " dataset's images are " + c10::str(ds_shape) +
                          " (one sample: " + c10::str(at::IntArrayRef(ds_shape).slice(1)) +
                          ") but the model's input shape is " + c10::str(shape) +
                          " (one sample: " + c10::str(at::IntArrayRef(shape).slice(1)) + ")");
  }
}

}  // namespace

JobInputs PrepareJobInputs(torch::jit::Module& model, const std::vector<StepSpec>& steps,
                           const CompressOptions& options) {
  CheckForwardInputs(model, options);
  JobInputs in;
  if (options.eval) in.eval = LoadDataset(options.eval->format, options.eval->path);
  if (options.calibration)
    in.calibration = LoadDataset(options.calibration->format, options.calibration->path);
  if (options.train) in.train = LoadDataset(options.train->format, options.train->path);
  for (const auto& step : steps) {
    if (NeedsTrainData(step) && !in.train.labels.defined()) {
      throw EngineError(Code::kInvalidArgument, "NO_TRAIN_DATA",
                        StepName(step) + " needs a train dataset with labels (--train)");
    }
    if (NeedsEvalData(step) && !options.eval) {
      throw EngineError(
          Code::kInvalidArgument, "NO_EVAL_DATA",
          StepName(step) +
              " needs an eval dataset (--eval): every candidate's accuracy is measured on it (top-1 "
              "with labels, else top-1 agreement with the original)");
    }
  }
  ResolveRank3Datasets({&in.eval, &in.calibration, &in.train}, options.input_shape, model);
  in.shape = ResolveInputShape(options, in.SampleSource(), in.shape_note);
  for (const auto& [ds, role] :
       {std::make_pair(&in.eval, "eval"), std::make_pair(&in.calibration, "calibration"),
        std::make_pair(&in.train, "train")}) {
    if (ds->size()) CheckDatasetFits(*ds, role, in.shape, options.more_input_shapes);
  }
  return in;
}

}  // namespace pare::engine
