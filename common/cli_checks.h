// Command-line checks shared by the binaries (CLI11 validators).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace pare {

// A number in [lo, hi]: text that is not a number says so, and NaN is refused (CLI::Range lets
// it through, since every comparison with NaN is false).
inline CLI::Validator NumberIn(double lo, double hi) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g to %g", lo, hi);
  const std::string range = buf;
  return CLI::Validator(
      [lo, hi, range](std::string& text) -> std::string {
        double v = 0;
        size_t used = 0;
        try {
          v = std::stod(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != text.size()) return "'" + text + "' is not a number";
        if (!(v >= lo && v <= hi)) return "'" + text + "' is not in " + range;
        return std::string();
      },
      "NUMBER in " + range);
}

}  // namespace pare
