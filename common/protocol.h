// Limits of the wire protocol, shared by server, worker and client.
#pragma once

#include <cstddef>

namespace pare {

// Uploads and downloads stream their bytes in chunks of at most this size (the server refuses
// larger ones; senders fill them).
constexpr size_t kChunkBytes = 1 << 20;

// The largest gRPC message either side accepts: a chunk with room for the framing (and a job's
// reports, a worker's checkpoint).
constexpr int kMaxMessageBytes = 4 << 20;

// The longest model or dataset name an upload may give.
constexpr size_t kMaxNameLength = 256;

}  // namespace pare
