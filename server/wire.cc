#include "server/wire.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_writer.h>
#include <spdlog/pattern_formatter.h>
#include <spdlog/spdlog.h>

#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/utf8.h"
#include "server/metrics.h"

namespace retnet::server {
namespace {

namespace pb = ::google::protobuf;

// Requests nest three levels deep at most; anything deeper is not ours.
constexpr int kMaxDepth = 8;

std::string Flatten(const grpc::ByteBuffer& in) {
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (!in.Dump(&slices).ok()) return bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes;
}

// The path of the first string field in `bytes` (a message of type `type`) that is not valid
// UTF-8; empty when there is none or the bytes are not even well-formed wire data.
std::string FindInvalidUtf8(const pb::Descriptor* type, const std::string& bytes,
                            const std::string& prefix, int depth) {
  if (depth > kMaxDepth) return "";
  pb::UnknownFieldSet fields;
  if (!fields.ParseFromString(bytes)) return "";
  for (int i = 0; i < fields.field_count(); ++i) {
    const pb::UnknownField& f = fields.field(i);
    if (f.type() != pb::UnknownField::TYPE_LENGTH_DELIMITED) continue;
    const pb::FieldDescriptor* fd = type->FindFieldByNumber(f.number());
    if (fd == nullptr) continue;
    if (fd->type() == pb::FieldDescriptor::TYPE_STRING) {
      if (!common::IsValidUtf8(f.length_delimited())) return prefix + fd->name();
    } else if (fd->type() == pb::FieldDescriptor::TYPE_MESSAGE) {
      std::string inner = FindInvalidUtf8(fd->message_type(), f.length_delimited(),
                                          prefix + fd->name() + ".", depth + 1);
      if (!inner.empty()) return inner;
    }
  }
  return "";
}

void ProtobufLog(pb::LogLevel level, const char* filename, int line, const std::string& message) {
  if (level == pb::LOGLEVEL_FATAL) {
    spdlog::critical("protobuf {}:{}: {}", filename, line, message);
  } else {
    spdlog::debug("protobuf {}:{}: {}", filename, line, message);
  }
}

}  // namespace

absl::Status ParseRequest(const grpc::ByteBuffer& in, pb::Message* out) {
  {
    grpc::ByteBuffer copy(in);  // shares the slices; the reader needs a mutable buffer
    grpc::ProtoBufferReader reader(&copy);
    if (reader.status().ok() && out->ParseFromZeroCopyStream(&reader)) return absl::OkStatus();
  }
  out->Clear();
  const std::string bytes = Flatten(in);
  const std::string field = FindInvalidUtf8(out->GetDescriptor(), bytes, "", 0);
  if (!field.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": not valid UTF-8"));
  return absl::InvalidArgumentError(absl::StrCat("request: not a valid ",
                                                 out->GetDescriptor()->full_name(), " message (",
                                                 bytes.size(), " bytes)"));
}

void SerializeTo(const pb::Message& msg, grpc::ByteBuffer* out) {
  bool own = false;
  out->Clear();  // the writer requires an empty buffer
  // Serialize into gRPC slices directly; the status is only non-OK for messages over 2 GiB,
  // which the service never builds (snapshot chunks are bounded).
  (void)grpc::SerializationTraits<pb::Message>::Serialize(msg, out, &own);
}

namespace {

void Append(spdlog::memory_buf_t& dest, std::string_view s) {
  dest.append(s.data(), s.data() + s.size());
}

// %* in the pattern: the message as the inside of a JSON string.
class JsonEscapedMessage final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const std::string text =
        common::SanitizeUtf8(std::string_view(msg.payload.data(), msg.payload.size()));
    static constexpr char kHex[] = "0123456789abcdef";
    for (unsigned char c : text) {
      switch (c) {
        case '"': Append(dest, "\\\""); break;
        case '\\': Append(dest, "\\\\"); break;
        case '\n': Append(dest, "\\n"); break;
        case '\r': Append(dest, "\\r"); break;
        case '\t': Append(dest, "\\t"); break;
        default:
          if (c < 0x20 || c == 0x7f) {
            const char esc[6] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 15]};
            dest.append(esc, esc + 6);
          } else {
            dest.push_back(static_cast<char>(c));
          }
      }
    }
  }
  std::unique_ptr<spdlog::custom_flag_formatter> clone() const override {
    return std::make_unique<JsonEscapedMessage>();
  }
};

}  // namespace

void UseJsonLogs() {
  auto formatter = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
  formatter->add_flag<JsonEscapedMessage>('*').set_pattern(
      R"({"time":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l","thread":%t,"msg":"%*"})");
  spdlog::set_formatter(std::move(formatter));
}

void RouteProtobufLogsToSpdlog() {
  static std::once_flag once;
  std::call_once(once, [] { pb::SetLogHandler(&ProtobufLog); });
}

void LogCall(std::string_view method, std::string_view session, grpc::StatusCode code,
             int64_t prompt_tokens, int64_t completion_tokens, absl::Time start) {
  if (!spdlog::should_log(spdlog::level::info)) return;
  const double ms = absl::ToDoubleMilliseconds(absl::Now() - start);
  if (prompt_tokens >= 0) {
    spdlog::info("rpc={} session={} code={} prompt_tokens={} completion_tokens={} ms={:.1f}",
                 method, session.empty() ? "-" : session, StatusCodeName(code), prompt_tokens,
                 completion_tokens, ms);
  } else {
    spdlog::info("rpc={} session={} code={} ms={:.1f}", method, session.empty() ? "-" : session,
                 StatusCodeName(code), ms);
  }
}

}  // namespace retnet::server
