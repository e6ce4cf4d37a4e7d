// File: server/auth.h
//
// Optional API keys. With a keys file (one key per line, '#' comments), every RPC must carry
// `authorization: Bearer <key>` metadata, else UNAUTHENTICATED. Each key owns the sessions it
// creates: the engine sees session ids prefixed with a tag derived from the key, so sessions of
// other keys are invisible (NOT_FOUND, absent from ListSessions). Without keys the tag is empty.
//
// Immutable after Load(); thread-safe.
#ifndef RETNET_SERVER_AUTH_H_
#define RETNET_SERVER_AUTH_H_

#include <grpcpp/server_context.h>

#include <set>
#include <string>

#include "absl/status/statusor.h"

namespace retnet::server {

class ApiKeys {
 public:
  ApiKeys() = default;  // authentication off
  // NotFound / InvalidArgument (empty file) naming the path.
  static absl::StatusOr<ApiKeys> Load(const std::string& path);

  bool enabled() const { return !keys_.empty(); }
  // The caller's session-id prefix ("" when keys are off), or UNAUTHENTICATED.
  absl::StatusOr<std::string> Authenticate(const grpc::ServerContextBase& context) const;

 private:
  std::set<std::string> keys_;
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_AUTH_H_
