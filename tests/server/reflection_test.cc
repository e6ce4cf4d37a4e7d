// A reflection-only client: it knows no .proto of the service, discovers it through server
// reflection, builds the request from the fetched descriptor and calls GetModelInfo. The
// reflection protocol's own messages are taken from the descriptors that libgrpc++_reflection
// registers (Debian installs no reflection stubs), so every message here is dynamic.
#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>
#include <google/protobuf/dynamic_message.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/sync_stream.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "server/server.h"

namespace retnet::server {
namespace {

using google::protobuf::Message;

class Dynamic {
 public:
  Dynamic() : factory_(google::protobuf::DescriptorPool::generated_pool()) {}
  std::unique_ptr<Message> New(const std::string& type) {
    const auto* d = google::protobuf::DescriptorPool::generated_pool()->FindMessageTypeByName(type);
    EXPECT_NE(d, nullptr) << type;
    return std::unique_ptr<Message>(factory_.GetPrototype(d)->New());
  }

 private:
  google::protobuf::DynamicMessageFactory factory_;
};

grpc::ByteBuffer ToBuffer(const Message& m) {
  std::string wire;
  m.SerializeToString(&wire);
  grpc::Slice slice(wire);
  return grpc::ByteBuffer(&slice, 1);
}

std::string FromBuffer(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  (void)b.Dump(&slices);
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes;
}

// Sets a string field of a oneof on a dynamic message.
void SetString(Message* m, const std::string& field, const std::string& value) {
  m->GetReflection()->SetString(m, m->GetDescriptor()->FindFieldByName(field), value);
}

TEST(ReflectionTest, AReflectionOnlyClientListsAndCallsTheService) {
  ServerOptions o;
  o.listen = "127.0.0.1:0";
  o.max_sessions = 4;
  auto server = Server::Start(o);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                                     grpc::InsecureChannelCredentials());
  Dynamic dyn;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::internal::RpcMethod info_method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING, channel);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), info_method, &ctx));
  const std::string kRequest = "grpc.reflection.v1alpha.ServerReflectionRequest";
  const std::string kResponse = "grpc.reflection.v1alpha.ServerReflectionResponse";

  auto list = dyn.New(kRequest);
  SetString(list.get(), "list_services", "*");
  ASSERT_TRUE(stream->Write(ToBuffer(*list)));
  grpc::ByteBuffer buffer;
  ASSERT_TRUE(stream->Read(&buffer));
  auto response = dyn.New(kResponse);
  ASSERT_TRUE(response->ParseFromString(FromBuffer(buffer)));
  const auto* r = response->GetReflection();
  const Message& services_msg = r->GetMessage(
      *response, response->GetDescriptor()->FindFieldByName("list_services_response"));
  const auto* service_field = services_msg.GetDescriptor()->FindFieldByName("service");
  std::vector<std::string> services;
  for (int i = 0; i < services_msg.GetReflection()->FieldSize(services_msg, service_field); ++i) {
    const Message& s =
        services_msg.GetReflection()->GetRepeatedMessage(services_msg, service_field, i);
    services.push_back(s.GetReflection()->GetString(s, s.GetDescriptor()->FindFieldByName("name")));
  }
  EXPECT_NE(std::find(services.begin(), services.end(), "retnet.v1.RetNet"), services.end());
  EXPECT_NE(std::find(services.begin(), services.end(), "grpc.health.v1.Health"), services.end());

  auto symbol = dyn.New(kRequest);
  SetString(symbol.get(), "file_containing_symbol", "retnet.v1.RetNet");
  ASSERT_TRUE(stream->Write(ToBuffer(*symbol)));
  ASSERT_TRUE(stream->Read(&buffer));
  response = dyn.New(kResponse);
  ASSERT_TRUE(response->ParseFromString(FromBuffer(buffer)));
  const Message& files = response->GetReflection()->GetMessage(
      *response, response->GetDescriptor()->FindFieldByName("file_descriptor_response"));
  const auto* file_field = files.GetDescriptor()->FindFieldByName("file_descriptor_proto");
  const int n_files = files.GetReflection()->FieldSize(files, file_field);
  ASSERT_GT(n_files, 0);
  std::vector<std::string> file_bytes;
  for (int i = 0; i < n_files; ++i)
    file_bytes.push_back(files.GetReflection()->GetRepeatedString(files, file_field, i));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());

  google::protobuf::DescriptorPool pool;
  for (const std::string& bytes : file_bytes) {
    google::protobuf::FileDescriptorProto file;
    ASSERT_TRUE(file.ParseFromString(bytes));
    ASSERT_NE(pool.BuildFile(file), nullptr);
  }
  const auto* service = pool.FindServiceByName("retnet.v1.RetNet");
  ASSERT_NE(service, nullptr);
  const auto* method = service->FindMethodByName("GetModelInfo");
  ASSERT_NE(method, nullptr);
  google::protobuf::DynamicMessageFactory factory(&pool);
  std::unique_ptr<google::protobuf::Message> request(
      factory.GetPrototype(method->input_type())->New());
  std::string wire;
  ASSERT_TRUE(request->SerializeToString(&wire));

  grpc::GenericStub generic(channel);
  grpc::ClientContext call;
  call.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice slice(wire);
  grpc::ByteBuffer in(&slice, 1), out;
  grpc::Status status;
  absl::Notification done;
  generic.UnaryCall(&call, absl::StrCat("/", service->full_name(), "/", method->name()),
                    grpc::StubOptions(), &in, &out, [&](grpc::Status s) {
                      status = s;
                      done.Notify();
                    });
  done.WaitForNotification();
  ASSERT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(out.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  std::unique_ptr<google::protobuf::Message> info(
      factory.GetPrototype(method->output_type())->New());
  ASSERT_TRUE(info->ParseFromString(bytes));
  const auto* vocab = method->output_type()->FindFieldByName("vocab_size");
  ASSERT_NE(vocab, nullptr);
  EXPECT_EQ(info->GetReflection()->GetInt64(*info, vocab), 258);
}

}  // namespace
}  // namespace retnet::server
