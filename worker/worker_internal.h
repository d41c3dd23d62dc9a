// What the worker's files share. worker.cc: the lease loop and a job's life; transfer.cc:
// input fetches and result uploads; job_process.cc: the job's own process (RunJobChild);
// sandbox.cc: starting that process under limits and reading its outcome.
#pragma once

#include <chrono>
#include <string>

#include "pare/v1/workers.pb.h"
#include "worker/engine/report.h"

namespace pare::worker {

using SteadyClock = std::chrono::steady_clock;

// Input fetches and result uploads: this many tries, waiting 0.5, 1, 2, 4 and 8 s between them
// (a server restarting, a network blip), then the job is handed back or the result given up.
constexpr int kTransferAttempts = 6;
std::chrono::milliseconds TransferBackoff(int retry);

// A file the worker could not write (a full disk, a file size limit): the job fails with
// WORKER_DISK and the reason, rather than run on a short file.
[[noreturn]] void DiskError(const std::string& what, const std::string& path, int err);

// Writes `text` to `path`, checked to the end (close included).
void WriteFileChecked(const std::string& what, const std::string& path, const std::string& text);

// Error reasons the worker itself decides on (and compares).
inline constexpr char kReasonWorkerDisk[] = "WORKER_DISK";
inline constexpr char kReasonFetchFailed[] = "FETCH_FAILED";
inline constexpr char kReasonServerUnreachable[] = "SERVER_UNREACHABLE";
inline constexpr char kReasonMemoryLimit[] = "JOB_MEMORY_LIMIT";

// Sets a job's end state and its error in one place.
void SetJobError(v1::CompleteHeader& header, v1::JobState state, const std::string& code,
                 const std::string& reason, const std::string& message);

// A step's report as the protocol carries it.
v1::StepReport ToProto(const engine::StepReport& s);

// Whether an engine error's message says memory ran out.
bool OutOfMemory(const std::string& message);

}  // namespace pare::worker
