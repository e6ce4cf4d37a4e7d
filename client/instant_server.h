// File: client/instant_server.h
//
// A retnet.v1.RetNet server that streams instantly: Generate writes its tokens (one per message,
// id = i % vocab) as fast as gRPC takes them, with no model behind it. `retnet-client bench
// --self-test` measures against it to show how much of a measured latency is the client's own.
// Implements GetModelInfo, Generate and DeleteSession; everything else is UNIMPLEMENTED.
//
// Threading: Start() binds 127.0.0.1 on a free port; the server runs on gRPC's threads until the
// object is destroyed.
#ifndef RETNET_CLIENT_INSTANT_SERVER_H_
#define RETNET_CLIENT_INSTANT_SERVER_H_

#include <memory>

#include "absl/status/statusor.h"

namespace retnet::client {

class InstantServer {
 public:
  static absl::StatusOr<std::unique_ptr<InstantServer>> Start();
  ~InstantServer();
  int port() const;

  struct Impl;

 private:
  explicit InstantServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace retnet::client

#endif  // RETNET_CLIENT_INSTANT_SERVER_H_
