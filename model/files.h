// File: model/files.h
//
// Reading small checkpoint files (configs, tokenizers) safely. No torch headers, so torch-free
// sources of the library (the HF tokenizer) use it too. Implemented in safetensors.cc.
//
// Threading: free functions, no shared state.
#ifndef RETNET_MODEL_FILES_H_
#define RETNET_MODEL_FILES_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace retnet::model {

// Reads a whole small file: refuses anything that is not a regular file (a FIFO, a device such as
// /dev/zero, a directory; symlinks are followed) without blocking, and files over `max_bytes`.
// Errors: NotFound (missing), InvalidArgument (not regular, too large, unreadable).
absl::StatusOr<std::string> ReadRegularFile(const std::string& path, uint64_t max_bytes);

}  // namespace retnet::model

#endif  // RETNET_MODEL_FILES_H_
