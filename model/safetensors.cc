#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace retnet::model {
namespace {

struct DtypeEntry {
  const char* name;
  at::ScalarType type;
};

constexpr DtypeEntry kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

struct RegularFile {
  int fd = -1;  // the caller closes it
  uint64_t size = 0;
};

// Opens `path` read-only if it is a regular file. O_NONBLOCK: opening a FIFO must not wait for a
// writer (it is then refused as not regular).
absl::StatusOr<RegularFile> OpenRegularFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  return RegularFile{fd, static_cast<uint64_t>(st.st_size)};
}

bool DtypeFromName(const std::string& name, at::ScalarType* type) {
  for (const auto& entry : kDtypes) {
    if (name == entry.name) {
      *type = entry.type;
      return true;
    }
  }
  return false;
}

}  // namespace

absl::Status CheckRegularFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadRegularFile(const std::string& path, uint64_t max_bytes) {
  ASSIGN_OR_RETURN(RegularFile opened, OpenRegularFile(path));
  const int fd = opened.fd;
  if (opened.size > max_bytes) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", opened.size, " bytes, more than the limit of ", max_bytes));
  }
  std::string data;
  char buf[1 << 16];
  while (true) {  // bounded: stops at max_bytes even if the file grows while being read
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(path, ": read failed: ", std::strerror(err)));
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > max_bytes) {
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": more than the limit of ", max_bytes, " bytes"));
    }
  }
  ::close(fd);
  return data;
}

std::string SafetensorsDtypeName(at::ScalarType type) {
  for (const auto& entry : kDtypes) {
    if (entry.type == type) return entry.name;
  }
  return "";
}

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  ASSIGN_OR_RETURN(RegularFile opened, OpenRegularFile(path));
  const int fd = opened.fd;
  file->map_size_ = opened.size;
  if (file->map_size_ > 0) {
    void* map = ::mmap(nullptr, file->map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": mmap failed: ", std::strerror(errno)));
    }
    file->map_ = static_cast<const uint8_t*>(map);
  }
  ::close(fd);
  absl::Status status = file->Parse();
  if (!status.ok()) return status;
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

absl::Status SafetensorsFile::Parse() {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": invalid safetensors file: ", why));
  };
  if (map_size_ < 8) {
    return bad(
        absl::StrCat("truncated: ", map_size_, " bytes, need at least 8 for the header size"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | map_[i];
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return bad(absl::StrCat("header of ", header_len, " bytes exceeds the limit of ",
                            kMaxSafetensorsHeaderBytes));
  }
  if (header_len > map_size_ - 8) {
    return bad(absl::StrCat("truncated: header claims ", header_len, " bytes but the file has ",
                            map_size_ - 8, " after the size field"));
  }
  data_ = map_ + 8 + header_len;
  data_size_ = map_size_ - 8 - header_len;

  // The header is one JSON object, optionally padded with spaces (0x20) and nothing else: a
  // header length that cuts into the object or reaches into the data region is refused here.
  const char* text = reinterpret_cast<const char*>(map_ + 8);
  uint64_t text_len = header_len;
  while (text_len > 0 && text[text_len - 1] == ' ') --text_len;
  if (text_len == 0 || text[0] != '{' || text[text_len - 1] != '}') {
    return bad(absl::StrCat("header is not valid JSON: its ", header_len,
                            " bytes are not one object padded with spaces (wrong header length?)"));
  }
  nlohmann::json header = nlohmann::json::parse(text, text + text_len, nullptr,
                                                /*allow_exceptions=*/false);
  if (header.is_discarded()) return bad("header is not valid JSON");
  if (!header.is_object()) return bad("header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return bad("__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string())
          return bad(absl::StrCat("__metadata__ value for '", m.key(), "' is not a string"));
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto tensor_bad = [&](const std::string& why) {
      return bad(absl::StrCat("tensor '", name, "': ", why));
    };
    if (!entry.is_object()) return tensor_bad("entry is not an object");
    TensorInfo info;
    info.name = name;
    auto dtype = entry.find("dtype");
    if (dtype == entry.end() || !dtype->is_string()) return tensor_bad("missing dtype");
    if (!DtypeFromName(dtype->get<std::string>(), &info.dtype)) {
      return tensor_bad(absl::StrCat("unsupported dtype ", dtype->get<std::string>()));
    }
    auto shape = entry.find("shape");
    if (shape == entry.end() || !shape->is_array()) return tensor_bad("missing shape");
    uint64_t numel = 1;
    for (const auto& dim : *shape) {
      if (!dim.is_number_unsigned() && !(dim.is_number_integer() && dim.get<int64_t>() >= 0)) {
        return tensor_bad("shape has a negative or non-integer dimension");
      }
      uint64_t d = dim.get<uint64_t>();
      if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (d != 0 && numel > std::numeric_limits<uint64_t>::max() / d)) {
        return tensor_bad("shape overflows");
      }
      numel *= d;
      info.shape.push_back(static_cast<int64_t>(d));
    }
    auto offsets = entry.find("data_offsets");
    if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      return tensor_bad("data_offsets must be two non-negative integers");
    }
    info.begin = (*offsets)[0].get<uint64_t>();
    info.end = (*offsets)[1].get<uint64_t>();
    if (info.begin > info.end || info.end > data_size_) {
      return tensor_bad(absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                                     ") lie outside the data region of ", data_size_,
                                     " bytes (truncated file?)"));
    }
    uint64_t item = at::elementSize(info.dtype);
    if (numel > std::numeric_limits<uint64_t>::max() / item ||
        numel * item != info.end - info.begin) {
      return tensor_bad(absl::StrCat("shape [", absl::StrJoin(info.shape, ", "), "] of ",
                                     dtype->get<std::string>(), " needs ", numel * item,
                                     " bytes but data_offsets span ", info.end - info.begin));
    }
    index_[name] = tensors_.size();
    tensors_.push_back(std::move(info));
  }
  // The tensors cover the data region exactly, as the format requires: no two share bytes and
  // no byte belongs to none (a header length off by a few bytes shifts every tensor and leaves
  // a hole at one end). Empty tensors take no bytes.
  std::vector<const TensorInfo*> sorted;
  for (const auto& t : tensors_) {
    if (t.end > t.begin) sorted.push_back(&t);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  uint64_t covered = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (sorted[i]->begin < covered) {
      return bad(
          absl::StrCat("tensors '", sorted[i - 1]->name, "' and '", sorted[i]->name, "' overlap"));
    }
    if (sorted[i]->begin > covered) {
      return bad(absl::StrCat("bytes [", covered, ", ", sorted[i]->begin,
                              ") of the data region belong to no tensor (before '", sorted[i]->name,
                              "'): wrong header length or offsets"));
    }
    covered = sorted[i]->end;
  }
  if (covered != data_size_) {
    return bad(absl::StrCat("the data region has ", data_size_, " bytes but the tensors cover ",
                            covered, ": wrong header length, or trailing bytes"));
  }
  return absl::OkStatus();
}

const SafetensorsFile::TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<at::Tensor> SafetensorsFile::Get(const std::string& name) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  }
  auto options = at::TensorOptions().dtype(info->dtype).device(at::kCPU);
  const uint8_t* ptr = data_ + info->begin;
  size_t item = at::elementSize(info->dtype);
  if (info->end == info->begin) return at::empty(info->shape, options);
  if (reinterpret_cast<uintptr_t>(ptr) % item != 0) {
    // Unaligned data: copy into an aligned private buffer.
    at::Tensor out = at::empty(info->shape, options);
    std::memcpy(out.data_ptr(), ptr, info->end - info->begin);
    return out;
  }
  auto keep_alive = shared_from_this();
  return at::from_blob(
      const_cast<uint8_t*>(ptr), info->shape, [keep_alive](void*) {}, options);
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> cpu;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    std::string dtype = SafetensorsDtypeName(tensor.scalar_type());
    if (dtype.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name,
                                                     "' has unsupported dtype ",
                                                     c10::toString(tensor.scalar_type())));
    }
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    uint64_t bytes = t.numel() * t.element_size();
    header[name] = {
        {"dtype", dtype}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(std::move(t));
  }
  std::string text = header.dump();
  // Pad the header with spaces so the data region starts 8-byte aligned.
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::InvalidArgumentError(absl::StrCat(path, ": cannot open for writing"));
    uint64_t n = text.size();
    char size_bytes[8];
    for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    out.write(size_bytes, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& t : cpu) {
      out.write(static_cast<const char*>(t.data_ptr()),
                static_cast<std::streamsize>(t.numel() * t.element_size()));
    }
    if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat(path, ": rename failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace retnet::model
