// Recipe handling for the worker and the CLI (and the server, which validates a recipe by
// translating it): the JSON form, validation, and the translation into the engine's plain C++
// step specs.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"
#include "pare/v1/compression.pb.h"
#include "worker/engine/recipe.h"

namespace pare {

// Parses the proto3 JSON form of a Recipe; unknown fields are errors (typos are caught).
Result<v1::Recipe> ParseRecipeJson(const std::string& json);

// Validates every step and translates it; errors name the step, e.g. "steps[1].prune.magnitude.amount".
Result<std::vector<engine::StepSpec>> ToEngineSteps(const v1::Recipe& recipe);

// A model a recipe names beside the job's input (distill's teacherModel and studentModel), with
// where: "recipe.steps[2].distill.teacherModel".
struct ModelReference {
  std::string field;
  std::string id;
};

// Every model the recipe references, in step order (ids as given, not checked).
std::vector<ModelReference> ReferencedModels(const v1::Recipe& recipe);

// The kind of the recipe's first step ("prune", "quantize", ...), "none" for an empty recipe.
std::string FirstStepKind(const v1::Recipe& recipe);

}  // namespace pare
