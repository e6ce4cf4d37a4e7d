// Internal: a thin wrapper over libsentencepiece, isolated in a plugin.
//
// Debian's libsentencepiece carries (and exports) its own copy of protobuf 3.14, while LibTorch
// links the system protobuf 3.21: in one process the two copies hijack each other's symbols and
// crash at start-up. So SentencePiece lives in a plugin, libretnet_sentencepiece.so
// (sentencepiece_plugin.cc), that is dlopen()ed with RTLD_LOCAL | RTLD_DEEPBIND the first time a
// SentencePiece tokenizer is needed; nothing links libsentencepiece directly. The header also
// uses no Abseil types, because sentencepiece_processor.h declares its own `absl::string_view`.
//
// The plugin is found at $RETNET_SENTENCEPIECE_PLUGIN, else <dir of the executable>/../lib/.
#ifndef RETNET_MODEL_SENTENCEPIECE_WRAPPER_H_
#define RETNET_MODEL_SENTENCEPIECE_WRAPPER_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace retnet::model::internal {

class SentencePieceModel {
 public:
  // nullptr and `error` set on failure.
  static std::unique_ptr<SentencePieceModel> Load(const std::string& path, std::string* error);
  virtual ~SentencePieceModel() = default;
  virtual int PieceSize() const = 0;
  virtual int BosId() const = 0;
  virtual int EosId() const = 0;
  virtual bool IsControl(int id) const = 0;
  virtual bool IsUnknown(int id) const = 0;
  virtual bool IsByte(int id) const = 0;
  virtual std::string IdToPiece(int id) const = 0;
  virtual bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const = 0;
  virtual bool Decode(const std::vector<int>& ids, std::string* text) const = 0;
};

// Trains a model with SentencePieceTrainer (used by the tests to make a real tokenizer.model).
bool TrainSentencePiece(const std::string& args, std::string* error);

}  // namespace retnet::model::internal

#endif  // RETNET_MODEL_SENTENCEPIECE_WRAPPER_H_
