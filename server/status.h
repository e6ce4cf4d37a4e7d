// File: server/status.h
//
// absl::Status -> grpc::Status at the RPC boundary (the numeric codes are the same).
#ifndef RETNET_SERVER_STATUS_H_
#define RETNET_SERVER_STATUS_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace retnet::server {

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

}  // namespace retnet::server

#endif  // RETNET_SERVER_STATUS_H_
