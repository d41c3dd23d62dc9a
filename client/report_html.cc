#include "client/report_html.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <sstream>
#include <vector>

namespace pare::client {
namespace {

using Json = nlohmann::json;

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// 12.3 MB, 456 kB, 789 B.
std::string Bytes(double b) {
  if (b >= 1e6) return Fixed(b / 1e6, 2) + " MB";
  if (b >= 1e3) return Fixed(b / 1e3, 1) + " kB";
  return Fixed(b, 0) + " B";
}

std::string Number(const Json& j, int digits) {
  return j.is_number() ? Fixed(j.get<double>(), digits) : std::string("&ndash;");
}

// Batch-1 median latency of a stats object, if it was timed.
std::optional<double> P50(const Json& stats) {
  if (!stats.contains("latency") || !stats["latency"].is_array()) return std::nullopt;
  for (const auto& l : stats["latency"]) {
    if (l.value("batch", 0) == 1 && l.contains("p50_ms")) return l["p50_ms"].get<double>();
  }
  return std::nullopt;
}

// A model the plot shows: a step's result or a search's trial.
struct Point {
  std::string name;
  double latency_ms;
  double quality;
  bool front = false;  // on the Pareto front: nothing else is both faster and better
};

const char* kStyle = R"(
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td.name, th.name { text-align: left; }
ul.notes { margin: 0.2em 0 0.8em 1.2em; padding: 0; font-size: 0.9em; }
li.warning, p.warn { color: #a40000; }
p.meta { color: #555; }
svg text { font-size: 11px; }
.bar { fill: #4a7ebb; }
)";

std::string MetaLine(const Json& report) {
  std::string out;
  if (report.contains("host")) {
    const Json& h = report["host"];
    out += "measured on " + Escape(h.value("cpu", "an unknown CPU"));
    if (h.contains("extensions")) out += " (" + Escape(h["extensions"].dump()) + ")";
    if (h.contains("threads")) out += ", " + std::to_string(h["threads"].get<int>()) + " thread(s)";
    if (h.contains("blas")) out += ", " + Escape(h.value("blas", ""));
  }
  if (report.contains("device")) out += "; device " + Escape(report.value("device", ""));
  if (report.contains("input_shape")) out += "; input shape " + Escape(report["input_shape"].dump());
  return out;
}

std::string StepsTable(const Json& steps) {
  std::ostringstream o;
  o << "<table id=\"steps\"><thead><tr><th class=\"name\">step</th><th>size</th><th>deflated</th>"
       "<th>parameters</th><th>nonzero</th><th>MACs</th><th>p50 batch 1 (ms)</th><th>top-1 agreement</th>"
       "<th>centred cosine</th><th>top-1 accuracy</th><th>wall (s)</th></tr></thead><tbody>\n";
  for (const auto& s : steps) {
    const Json& st = s.contains("stats") ? s["stats"] : Json::object();
    auto p50 = P50(st);
    o << "<tr class=\"step\"><td class=\"name\">" << Escape(s.value("step", "?")) << "</td><td>"
      << (st.contains("size_bytes") ? Bytes(st["size_bytes"].get<double>()) : "&ndash;") << "</td><td>"
      << (st.contains("deflated_bytes") ? Bytes(st["deflated_bytes"].get<double>()) : "&ndash;")
      << "</td><td>" << Number(st.value("parameters", Json()), 0) << "</td><td>"
      << Number(st.value("nonzero_parameters", Json()), 0) << "</td><td>"
      << (st.value("macs", Json()).is_number() ? Fixed(st["macs"].get<double>() / 1e6, 1) + " M" : "&ndash;")
      << "</td><td>" << (p50 ? Fixed(*p50, 2) : "&ndash;") << "</td><td>"
      << Number(st.value("top1_agreement", Json()), 3) << "</td><td>"
      << Number(st.value("output_centred_cosine", Json()), 4) << "</td><td>"
      << Number(st.value("top1_accuracy", Json()), 4) << "</td><td>"
      << Number(s.value("wall_seconds", Json()), 1) << "</td></tr>\n";
  }
  o << "</tbody></table>\n";
  for (const auto& s : steps) {
    if (!s.contains("notes") || s["notes"].empty()) continue;
    o << "<p><b>" << Escape(s.value("step", "?")) << "</b></p><ul class=\"notes\">";
    for (const auto& n : s["notes"]) {
      const std::string text = n.is_string() ? n.get<std::string>() : n.dump();
      o << (text.rfind("WARNING", 0) == 0 ? "<li class=\"warning\">" : "<li>") << Escape(text) << "</li>";
    }
    o << "</ul>\n";
  }
  return o.str();
}

// The points to plot: the trials of a search when there are any, else each step's model. The
// vertical axis is top-1 accuracy when every point has it, else the centred cosine with the
// original's outputs.
std::vector<Point> Points(const Json& report, bool& accuracy) {
  const bool trials = report.contains("trials") && report["trials"].is_array() && !report["trials"].empty();
  const Json& items = trials ? report["trials"] : report.value("steps", Json::array());
  accuracy = !items.empty();
  for (const auto& it : items) {
    if (trials && it.contains("error")) continue;  // a failed trial has no figures
    accuracy = accuracy && it.contains("stats") && it["stats"].is_object() &&
               it["stats"].value("top1_accuracy", Json()).is_number();
  }
  // A search scores its trials itself (top-1, or top-1 agreement without labels).
  const bool scored = trials && std::all_of(items.begin(), items.end(), [](const Json& t) {
                        return t.contains("error") || t.value("score", Json()).is_number();
                      });
  if (scored) {
    accuracy =
        report.contains("search") && report["search"].value("metric", "").rfind("top-1 accuracy", 0) == 0;
  }
  std::vector<Point> out;
  for (const auto& it : items) {
    if (!it.contains("stats") || !it["stats"].is_object() || it.contains("error")) continue;
    auto p50 = P50(it["stats"]);
    const Json& q = scored ? it["score"]
                           : it["stats"].value(accuracy ? "top1_accuracy" : "output_centred_cosine", Json());
    if (!p50 || !q.is_number()) continue;
    std::string name =
        trials ? it.value("name", "trial " + std::to_string(out.size() + 1)) : it.value("step", "?");
    out.push_back({name, *p50, q.get<double>()});
  }
  for (auto& p : out) {
    p.front = std::none_of(out.begin(), out.end(), [&](const Point& o) {
      return o.latency_ms <= p.latency_ms && o.quality >= p.quality &&
             (o.latency_ms < p.latency_ms || o.quality > p.quality);
    });
  }
  return out;
}

std::string Plot(const std::vector<Point>& points, bool accuracy) {
  constexpr double kW = 640, kH = 360, kLeft = 60, kBottom = 40, kTop = 20, kRight = 20;
  double x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (!points.empty()) {
    x0 = x1 = points[0].latency_ms;
    y0 = y1 = points[0].quality;
    for (const auto& p : points) {
      x0 = std::min(x0, p.latency_ms), x1 = std::max(x1, p.latency_ms);
      y0 = std::min(y0, p.quality), y1 = std::max(y1, p.quality);
    }
    const double dx = std::max(x1 - x0, 1e-6 + 0.1 * x1), dy = std::max(y1 - y0, 0.01);
    x0 = std::max(0.0, x0 - 0.1 * dx), x1 += 0.1 * dx, y0 -= 0.1 * dy, y1 += 0.1 * dy;
  }
  auto sx = [&](double x) { return kLeft + (x - x0) / (x1 - x0) * (kW - kLeft - kRight); };
  auto sy = [&](double y) { return kH - kBottom - (y - y0) / (y1 - y0) * (kH - kBottom - kTop); };
  std::ostringstream o;
  o << "<svg id=\"front\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kW << "\" height=\"" << kH
    << "\" role=\"img\">\n";
  o << "<line x1=\"" << kLeft << "\" y1=\"" << kH - kBottom << "\" x2=\"" << kW - kRight << "\" y2=\""
    << kH - kBottom << "\" stroke=\"#444\"/><line x1=\"" << kLeft << "\" y1=\"" << kTop << "\" x2=\"" << kLeft
    << "\" y2=\"" << kH - kBottom << "\" stroke=\"#444\"/>\n";
  for (int t = 0; t <= 4; ++t) {
    const double xv = x0 + (x1 - x0) * t / 4, yv = y0 + (y1 - y0) * t / 4;
    o << "<text x=\"" << sx(xv) << "\" y=\"" << kH - kBottom + 14 << "\" text-anchor=\"middle\">"
      << Fixed(xv, 1) << "</text><text x=\"" << kLeft - 6 << "\" y=\"" << sy(yv) + 4
      << "\" text-anchor=\"end\">" << Fixed(yv, 3) << "</text>\n";
  }
  o << "<text x=\"" << (kLeft + kW - kRight) / 2 << "\" y=\"" << kH - 6
    << "\" text-anchor=\"middle\">p50 latency, batch 1 (ms)</text>\n";
  o << "<text x=\"12\" y=\"" << (kTop + kH - kBottom) / 2 << "\" transform=\"rotate(-90 12 "
    << (kTop + kH - kBottom) / 2 << ")\" text-anchor=\"middle\">"
    << (accuracy ? "top-1 accuracy" : "agreement with the original") << "</text>\n";
  std::vector<Point> front;
  for (const auto& p : points) {
    if (p.front) front.push_back(p);
  }
  std::sort(front.begin(), front.end(),
            [](const Point& a, const Point& b) { return a.latency_ms < b.latency_ms; });
  if (front.size() > 1) {
    o << "<polyline class=\"pareto\" fill=\"none\" stroke=\"#d08000\" points=\"";
    for (const auto& p : front) o << sx(p.latency_ms) << "," << sy(p.quality) << " ";
    o << "\"/>\n";
  }
  for (const auto& p : points) {
    o << "<circle class=\"point" << (p.front ? " front" : "") << "\" cx=\"" << sx(p.latency_ms) << "\" cy=\""
      << sy(p.quality) << "\" r=\"5\" fill=\"" << (p.front ? "#d08000" : "#4a7ebb") << "\"><title>"
      << Escape(p.name) << ": " << Fixed(p.latency_ms, 2) << " ms, " << Fixed(p.quality, 4)
      << "</title></circle>"
      << "<text x=\"" << sx(p.latency_ms) + 7 << "\" y=\"" << sy(p.quality) - 7 << "\">" << Escape(p.name)
      << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

// report["sensitivity"]: one object per layer, with `layer` and numeric fields (a latency share,
// an accuracy or error when only that layer is changed). Each numeric field is a column of bars
// scaled to its largest value.
std::string SensitivityTable(const Json& rows) {
  std::vector<std::string> fields;
  for (const auto& r : rows) {
    for (const auto& [k, v] : r.items()) {
      if (v.is_number() && std::find(fields.begin(), fields.end(), k) == fields.end()) fields.push_back(k);
    }
  }
  std::vector<double> largest(fields.size(), 0.0);
  for (const auto& r : rows) {
    for (size_t f = 0; f < fields.size(); ++f) {
      if (r.value(fields[f], Json()).is_number() && std::isfinite(r[fields[f]].get<double>()))
        largest[f] = std::max(largest[f], std::abs(r[fields[f]].get<double>()));
    }
  }
  std::ostringstream o;
  o << "<table id=\"sensitivity\"><thead><tr><th class=\"name\">layer</th>";
  for (const auto& f : fields) o << "<th>" << Escape(f) << "</th>";
  o << "</tr></thead><tbody>\n";
  for (const auto& r : rows) {
    o << "<tr class=\"layer\"><td class=\"name\">" << Escape(r.value("layer", "?")) << "</td>";
    for (size_t f = 0; f < fields.size(); ++f) {
      const Json& v = r.value(fields[f], Json());
      if (!v.is_number()) {
        o << "<td>&ndash;</td>";
        continue;
      }
      const double x = v.get<double>();
      const double w = largest[f] > 0 && std::isfinite(largest[f]) ? 80.0 * std::abs(x) / largest[f] : 0;
      o << "<td><svg width=\"84\" height=\"12\"><rect class=\"bar\" width=\"" << Fixed(w, 1)
        << "\" height=\"10\"/></svg> " << Fixed(x, 4) << "</td>";
    }
    o << "</tr>\n";
  }
  o << "</tbody></table>\n";
  return o.str();
}

// An auto search: its goal, what it chose and why (or why nothing met the goal), the recipe
// that rebuilds the result, and every trial.
std::string SearchSection(const Json& report) {
  const Json& s = report["search"];
  std::ostringstream o;
  const Json goal = s.value("goal", Json::object());
  o << "<h2>Search</h2>\n<p>Goal: at most " << Fixed(goal.value("points", 0.0), 3) << " points of "
    << Escape(s.value("metric", "")) << " lost; objective " << Escape(goal.value("objective", "")) << "; "
    << Fixed(s.value("elapsed_seconds", 0.0), 0) << " s of a "
    << Fixed(goal.value("time_budget_seconds", 0.0), 0) << " s budget.</p>\n";
  if (report.contains("failure")) {
    o << "<p class=\"warn\"><b>" << Escape(report["failure"].value("reason", ""))
      << "</b>: " << Escape(report["failure"].value("message", "")) << "</p>\n";
  }
  if (s.contains("why")) o << "<p>" << Escape(s.value("why", "")) << "</p>\n";
  if (s.contains("recipe"))
    o << "<p>The recipe that rebuilds the result:</p>\n<pre>" << Escape(s["recipe"].dump(2)) << "</pre>\n";
  o << "<table><thead><tr><th>#</th><th class=\"name\">trial</th><th>drop (points)</th><th>ratio</th>"
       "<th>p50 ms (b1)</th><th>size</th><th>MACs</th><th>wall (s)</th><th class=\"name\">within the "
       "goal</th>"
       "</tr></thead><tbody>\n";
  const int chosen = s.value("chosen", -1);
  for (const auto& t : s.value("trials", Json::array())) {
    const int i = t.value("index", 0);
    o << "<tr><td>" << i << (i == chosen ? " *" : "") << "</td><td class=\"name\">"
      << Escape(t.value("name", "")) << (t.value("resumed", false) ? " (from the checkpoint)" : "")
      << "</td>";
    if (t.contains("error")) {
      o << "<td colspan=\"7\" class=\"name\">failed: " << Escape(t.value("error", "")) << "</td></tr>\n";
      continue;
    }
    const Json stats = t.contains("stats") && t["stats"].is_object() ? t["stats"] : Json::object();
    const auto p50 = P50(stats);
    o << "<td>" << Fixed(t.value("drop", 0.0), 2) << "</td><td>" << Fixed(t.value("ratio", 0.0), 2)
      << "x</td><td>" << (p50 ? Fixed(*p50, 3) : std::string("-")) << "</td><td>"
      << Number(stats.value("size_bytes", Json()), 0) << "</td><td>" << Number(stats.value("macs", Json()), 0)
      << "</td><td>" << Fixed(t.value("wall_seconds", 0.0), 1) << "</td><td class=\"name\">"
      << (i == 0                         ? "original"
          : t.value("meets_goal", false) ? "yes"
                                         : "no")
      << "</td></tr>\n";
  }
  o << "</tbody></table>\n";
  return o.str();
}

}  // namespace

std::string ReportHtml(const Json& report, const std::string& title) {
  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Pare report: "
    << Escape(title) << "</title><style>" << kStyle << "</style></head><body>\n";
  o << "<h1>Pare report: " << Escape(title) << "</h1>\n<p class=\"meta\">" << MetaLine(report) << "</p>\n";
  const Json steps = report.value("steps", Json::array());
  o << "<h2>Steps</h2>\n" << StepsTable(steps);
  bool accuracy = false;
  const std::vector<Point> points = Points(report, accuracy);
  const bool trials = report.contains("trials") && report["trials"].is_array() && !report["trials"].empty();
  o << "<h2>" << (accuracy ? "Accuracy" : "Agreement") << " against latency</h2>\n<p>One point per "
    << (trials ? "trial" : "step's model") << "; the Pareto front (nothing else both faster and "
    << (accuracy ? "more accurate" : "closer to the original") << ") in orange.</p>\n"
    << Plot(points, accuracy);
  if (report.contains("search") && report["search"].is_object()) o << SearchSection(report);
  if (report.contains("sensitivity") && report["sensitivity"].is_array() && !report["sensitivity"].empty()) {
    o << "<h2>Sensitivity per layer</h2>\n" << SensitivityTable(report["sensitivity"]);
  }
  o << "</body></html>\n";
  return o.str();
}

}  // namespace pare::client
