#include "server/turn_stream.h"

namespace retnet::server {

retnet::v1::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kLength:
      return retnet::v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kEos:
      return retnet::v1::FINISH_REASON_EOS_TOKEN;
    case engine::FinishReason::kStop:
      return retnet::v1::FINISH_REASON_STOP_SEQUENCE;
    case engine::FinishReason::kCancelled:
      return retnet::v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kDeadline:
      return retnet::v1::FINISH_REASON_DEADLINE;
    case engine::FinishReason::kError:
      return retnet::v1::FINISH_REASON_ERROR;
  }
  return retnet::v1::FINISH_REASON_UNSPECIFIED;
}

}  // namespace retnet::server
