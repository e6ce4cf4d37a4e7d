#include "client/instant_server.h"

#include <grpcpp/grpcpp.h>

#include "retnet/v1/retnet.grpc.pb.h"

namespace retnet::client {
namespace {

namespace v1 = ::retnet::v1;
constexpr int64_t kVocab = 258;

class InstantService final : public v1::RetNet::CallbackService {
 public:
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest*,
                                         v1::ModelInfo* info) override {
    info->set_family("instant");
    info->set_vocab_size(kVocab);
    info->set_bos_token_id(256);
    info->set_eos_token_id(257);
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const v1::DeleteSessionRequest*,
                                          v1::DeleteSessionResponse*) override {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override {
    class Writer : public grpc::ServerWriteReactor<v1::GenerateResponse> {
     public:
      explicit Writer(const v1::GenerateRequest& req)
          : total_(req.stopping().max_new_tokens() > 0 ? req.stopping().max_new_tokens() : 16),
            prompt_(req.tokens().ids_size()),
            session_(req.session_id()) {
        Next();
      }
      void OnWriteDone(bool ok) override {
        if (!ok) {
          Finish(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
          return;
        }
        Next();
      }
      void OnDone() override { delete this; }

     private:
      void Next() {
        msg_.Clear();
        if (sent_ < total_) {
          v1::Token* t = msg_.mutable_chunk()->add_tokens();
          t->set_id(sent_ % kVocab);
          ++sent_;
          StartWrite(&msg_);
        } else if (!final_sent_) {
          final_sent_ = true;
          v1::Final* f = msg_.mutable_final();
          f->set_finish_reason(v1::FINISH_REASON_LENGTH);
          f->set_session_id(session_);
          f->mutable_usage()->set_prompt_tokens(prompt_);
          f->mutable_usage()->set_completion_tokens(total_);
          StartWrite(&msg_);
        } else {
          Finish(grpc::Status::OK);
        }
      }
      const int64_t total_;
      const int64_t prompt_;
      const std::string session_;
      int64_t sent_ = 0;
      bool final_sent_ = false;
      v1::GenerateResponse msg_;
    };
    (void)context;
    return new Writer(*request);
  }
};

}  // namespace

struct InstantServer::Impl {
  InstantService service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

InstantServer::InstantServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
InstantServer::~InstantServer() { impl_->server->Shutdown(); }
int InstantServer::port() const { return impl_->port; }

absl::StatusOr<std::unique_ptr<InstantServer>> InstantServer::Start() {
  auto impl = std::make_unique<Impl>();
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(&impl->service);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError("instant server: cannot listen on 127.0.0.1:0");
  }
  return std::unique_ptr<InstantServer>(new InstantServer(std::move(impl)));
}

}  // namespace retnet::client
