// Finding the few items of a change that break a model, when the whole change does: channel
// pruning's groups whose cut the analysis did not foresee, static INT8's layer kinds whose
// quantized kernel fails. One search for both.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

namespace pare::engine {

struct Isolated {
  std::vector<size_t> allowed;             // items applied together without breaking the model
  std::map<size_t, std::string> culprits;  // items that broke it, with the error each gave
  int trials = 0;                          // calls of `attempt`
  bool exhausted = false;                  // out of trials: items neither allowed nor culprits
};

// Items 0..count-1, in order, all of which applied together fail with `error`. `attempt(with)`
// applies the items in `with` and returns "" when the model works, else the error. Finds the
// smallest failing prefix by bisection, records its last item as a culprit, keeps the rest of the
// prefix, and goes on from there (first trying everything that is left at once), within
// `max_trials` attempts. Deterministic attempts are assumed.
inline Isolated IsolateFailures(size_t count, const std::string& error, int max_trials,
                                const std::function<std::string(const std::vector<size_t>&)>& attempt) {
  Isolated out;
  auto with_range = [&](size_t a, size_t b) {
    std::vector<size_t> with = out.allowed;
    for (size_t i = a; i < b; ++i) with.push_back(i);
    return with;
  };
  auto run = [&](const std::vector<size_t>& with) {
    ++out.trials;
    return attempt(with);
  };
  size_t start = 0;
  std::string last = error;  // the error of allowed + [start, count)
  while (start < count) {
    // allowed + [start, hi) breaks, allowed + [start, lo) does not.
    size_t lo = start, hi = count;
    while (hi - lo > 1 && out.trials < max_trials) {
      const size_t mid = (lo + hi) / 2;
      std::string e = run(with_range(start, mid));
      if (e.empty()) {
        lo = mid;
      } else {
        hi = mid;
        last = e;
      }
    }
    if (hi - lo > 1) {
      out.exhausted = true;
      break;
    }
    out.culprits[hi - 1] = last;
    out.allowed = with_range(start, hi - 1);
    start = hi;
    if (start >= count) break;
    if (out.trials >= max_trials) {
      out.exhausted = true;
      break;
    }
    std::vector<size_t> rest = with_range(start, count);
    last = run(rest);
    if (last.empty()) {
      out.allowed = rest;
      break;
    }
  }
  return out;
}

}  // namespace pare::engine
