// File: server/status.h
//
// absl::Status -> grpc::Status at the RPC boundary (the numeric codes are the same). Messages
// are bounded (a status travels in a header, and a message must never grow with the input that
// caused it) and valid UTF-8.
#ifndef RETNET_SERVER_STATUS_H_
#define RETNET_SERVER_STATUS_H_

#include <grpcpp/support/status.h>

#include <algorithm>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "common/utf8.h"

namespace retnet::server {

inline constexpr size_t kMaxStatusMessageBytes = 1024;

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  const size_t n = std::min(s.message().size(), kMaxStatusMessageBytes);
  std::string message = common::SanitizeUtf8(std::string_view(s.message().data(), n));
  if (s.message().size() > kMaxStatusMessageBytes) message += "...";
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::move(message));
}

}  // namespace retnet::server

#endif  // RETNET_SERVER_STATUS_H_
