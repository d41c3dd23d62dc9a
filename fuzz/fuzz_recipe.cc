// libFuzzer: recipe JSON parsing and validation. Any text gets a recipe or a field-named error.
#include <cstdint>
#include <string>

#include "worker/recipe_convert.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto recipe = pare::ParseRecipeJson(std::string(reinterpret_cast<const char*>(data), size));
  if (recipe.ok()) (void)pare::ToEngineSteps(recipe.value());
  return 0;
}
