// File: model/safetensors.h
//
// The project's own reader and writer of the safetensors format: an 8-byte little-endian header
// length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// "__metadata__": {str: str}}, then the raw little-endian tensor data.
//
// The reader opens only regular files (a FIFO or a device is refused without blocking),
// memory-maps them read-only and validates the whole header up front: size limits, one JSON
// object padded only with spaces, known dtypes, non-negative shapes whose byte count does not
// overflow and equals the data_offsets span, and tensors that tile the data region exactly (no
// overlap, no hole, no trailing bytes), so that every later access is in bounds and a header length
// off by a byte is refused. Every error names the file (and the tensor).
//
// Ownership and threading: a SafetensorsFile is immutable after Open() and safe to share between
// threads. Tensors returned by Get() alias the mapping and keep it alive (they hold a shared_ptr).
#ifndef RETNET_MODEL_SAFETENSORS_H_
#define RETNET_MODEL_SAFETENSORS_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/files.h"

namespace retnet::model {

// Largest JSON header accepted (the format's own limit is 100 MB).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  struct TensorInfo {
    std::string name;
    at::ScalarType dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0;  // byte offsets into the data region
    uint64_t end = 0;
  };

  // Maps and validates `path`. Errors: NotFound (missing file), InvalidArgument (malformed).
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensors in header order.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // A CPU tensor over the mapped bytes (zero-copy when suitably aligned, else a private copy).
  // NotFound if the file has no such tensor.
  absl::StatusOr<at::Tensor> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  absl::Status Parse();

  std::string path_;
  const uint8_t* map_ = nullptr;
  uint64_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data region
  uint64_t data_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// ReadRegularFile(path, max_bytes): model/files.h.

// OK when `path` is a regular file (symlinks followed); else NotFound / InvalidArgument.
absl::Status CheckRegularFile(const std::string& path);

// The safetensors dtype name ("F32", "BF16", ...) of a scalar type; empty if unsupported.
std::string SafetensorsDtypeName(at::ScalarType type);

// Writes `tensors` (any device; copied to contiguous CPU) to `path`, atomically (temp + rename).
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace retnet::model

#endif  // RETNET_MODEL_SAFETENSORS_H_
