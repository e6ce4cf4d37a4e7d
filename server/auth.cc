#include "server/auth.h"

#include <cstdio>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/strings.h"

namespace retnet::server {

absl::StatusOr<ApiKeys> ApiKeys::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("api keys file ", path, ": cannot open"));
  ApiKeys keys;
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view key = absl::StripAsciiWhitespace(line);
    if (key.empty() || key[0] == '#') continue;
    keys.keys_.insert(std::string(key));
  }
  if (keys.keys_.empty())
    return absl::InvalidArgumentError(absl::StrCat("api keys file ", path, ": no keys"));
  return keys;
}

absl::StatusOr<std::string> ApiKeys::Authenticate(const grpc::ServerContextBase& context) const {
  if (keys_.empty()) return std::string();
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end())
    return absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata");
  absl::string_view value(it->second.data(), it->second.size());
  if (!absl::ConsumePrefix(&value, "Bearer ")) {
    return absl::UnauthenticatedError("authorization metadata must be 'Bearer <key>'");
  }
  const std::string key(value);
  if (keys_.count(key) == 0) return absl::UnauthenticatedError("unknown API key");
  // A stable, non-reversible tag: FNV-1a of the key.
  const uint64_t h = common::Fnv1a(key);
  char tag[20];
  std::snprintf(tag, sizeof(tag), "%016llx", static_cast<unsigned long long>(h));
  return absl::StrCat("k", tag, "/");
}

}  // namespace retnet::server
