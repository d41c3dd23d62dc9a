// Random resource ids: a kind prefix and 16 random hex characters, e.g. "job_3fa2…".
#pragma once

#include <string>

namespace pare {

std::string NewId(const std::string& prefix);

}  // namespace pare
