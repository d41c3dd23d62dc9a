// A job's report as one self-contained HTML page (no scripts, styles or images from elsewhere):
// where it was measured, the steps table with their notes, a plot of accuracy against latency
// with one point per model (per trial when the report holds a search's trials) and its Pareto
// front, and a per-layer sensitivity table as bars when the report holds one.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace pare::client {

// `report` is the engine's JSON report (pare download --report, pare compress --report);
// `title` names the job or the model. Fields a report lacks are left out, never invented.
std::string ReportHtml(const nlohmann::json& report, const std::string& title);

}  // namespace pare::client
