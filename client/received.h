// File: client/received.h
//
// Responses as received: Received<M> holds a message and whether its bytes parsed.
//
// gRPC's synchronous streams make a response that cannot be parsed (say, a proto3 `string` that
// is not valid UTF-8, from a server that does not sanitize its text) look like the end of the
// stream: Read() returns false, and Finish() then waits for a server that is still sending, until
// the deadline. Reading Received<M> instead keeps the two apart: Read() returns true with
// `parsed` false, and the caller cancels the call and reports the bad message at once
// (UnparsableResponse()).
//
// Threading: plain values.
#ifndef RETNET_CLIENT_RECEIVED_H_
#define RETNET_CLIENT_RECEIVED_H_

#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/impl/serialization_traits.h>


#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace retnet::client {

template <typename M>
struct Received {
  M message;
  bool parsed = true;  // false: the bytes were not a valid M (message is cleared)
};

// INTERNAL naming the method and the message type the server's bytes did not parse as.
template <typename M>
absl::Status UnparsableResponse(const char* method) {
  return absl::InternalError(absl::StrCat(method, ": the server sent a message that is not a valid ",
                                          M::descriptor()->full_name(),
                                          " (e.g. a text field that is not UTF-8); call cancelled"));
}

}  // namespace retnet::client

namespace grpc {

// Parsing never fails the read: the outcome is in Received::parsed.
template <typename M>
class SerializationTraits<retnet::client::Received<M>, void> {
 public:
  static Status Serialize(const retnet::client::Received<M>& msg, ByteBuffer* bb,
                          bool* own_buffer) {
    return SerializationTraits<M>::Serialize(msg.message, bb, own_buffer);
  }
  static Status Deserialize(ByteBuffer* buffer, retnet::client::Received<M>* msg) {
    msg->parsed = SerializationTraits<M>::Deserialize(buffer, &msg->message).ok();
    if (!msg->parsed) msg->message.Clear();
    return Status::OK;
  }
};

}  // namespace grpc

#endif  // RETNET_CLIENT_RECEIVED_H_
