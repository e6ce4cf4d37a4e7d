#include "model/tokenizer.h"

#include <sys/stat.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "model/config.h"
#include "model/hf_tokenizer.h"
#include "model/safetensors.h"
#include "model/sentencepiece_wrapper.h"

namespace retnet::model {
namespace {

bool Exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

class ByteTokenizer final : public Tokenizer {
 public:
  ByteTokenizer(int64_t bos, int64_t eos) : bos_(bos), eos_(eos) {}
  std::string kind() const override { return "byte"; }
  int64_t vocab_size() const override { return std::max<int64_t>({256, bos_ + 1, eos_ + 1}); }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }
  absl::StatusOr<std::vector<int64_t>> Encode(std::string_view text) const override {
    std::vector<int64_t> ids;
    ids.reserve(text.size());
    for (unsigned char ch : text) ids.push_back(ch);
    return ids;
  }
  std::string TokenBytes(int64_t id) const override {
    if (id < 0 || id > 255) return "";
    return std::string(1, static_cast<char>(id));
  }

 private:
  int64_t bos_, eos_;
};

class IdsOnlyTokenizer final : public Tokenizer {
 public:
  IdsOnlyTokenizer(int64_t vocab, int64_t bos, int64_t eos) : vocab_(vocab), bos_(bos), eos_(eos) {}
  std::string kind() const override { return "none"; }
  int64_t vocab_size() const override { return vocab_; }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }
  absl::StatusOr<std::vector<int64_t>> Encode(std::string_view) const override {
    return absl::FailedPreconditionError("the model has no tokenizer: send token ids");
  }
  std::string TokenBytes(int64_t) const override { return ""; }
  std::string Decode(const std::vector<int64_t>&) const override { return ""; }

 private:
  int64_t vocab_, bos_, eos_;
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(std::unique_ptr<internal::SentencePieceModel> sp)
      : sp_(std::move(sp)) {}
  std::string kind() const override { return "sentencepiece"; }
  int64_t vocab_size() const override { return sp_->PieceSize(); }
  int64_t bos_id() const override { return sp_->BosId(); }
  int64_t eos_id() const override { return sp_->EosId(); }
  absl::StatusOr<std::vector<int64_t>> Encode(std::string_view text) const override {
    std::vector<int> ids;
    std::string error;
    if (!sp_->Encode(text, &ids, &error))
      return absl::InvalidArgumentError(absl::StrCat("tokenizer: ", error));
    return std::vector<int64_t>(ids.begin(), ids.end());
  }
  std::string TokenBytes(int64_t id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    const int i = static_cast<int>(id);
    if (sp_->IsControl(i) || sp_->IsUnknown(i)) return "";
    if (sp_->IsByte(i)) {
      // Byte fallback pieces look like "<0x41>".
      const std::string& piece = sp_->IdToPiece(i);
      return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
    }
    std::string piece = sp_->IdToPiece(i);
    // U+2581 (lower one eighth block) marks a space.
    const std::string marker = "\xe2\x96\x81";
    std::string out;
    for (size_t p = 0; p < piece.size();) {
      if (piece.compare(p, marker.size(), marker) == 0) {
        out.push_back(' ');
        p += marker.size();
      } else {
        out.push_back(piece[p++]);
      }
    }
    return out;
  }
  std::string Decode(const std::vector<int64_t>& ids) const override {
    std::vector<int> v(ids.begin(), ids.end());
    std::string text;
    if (!sp_->Decode(v, &text)) return Tokenizer::Decode(ids);
    return text;
  }

 private:
  std::unique_ptr<internal::SentencePieceModel> sp_;
};

}  // namespace

std::string Tokenizer::Decode(const std::vector<int64_t>& ids) const {
  std::string text;
  for (int64_t id : ids) text += TokenBytes(id);
  return text;
}

std::unique_ptr<Tokenizer> MakeByteTokenizer(int64_t bos_id, int64_t eos_id) {
  return std::make_unique<ByteTokenizer>(bos_id, eos_id);
}

std::unique_ptr<Tokenizer> MakeIdsOnlyTokenizer(int64_t vocab_size, int64_t bos_id,
                                                int64_t eos_id) {
  return std::make_unique<IdsOnlyTokenizer>(vocab_size, bos_id, eos_id);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(const std::string& path) {
  // A FIFO or a device would block or never end: only regular files are read.
  if (absl::Status s = CheckRegularFile(path); !s.ok()) return s;
  std::string error;
  auto sp = internal::SentencePieceModel::Load(path, &error);
  if (sp == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot load SentencePiece model: ", error));
  }
  return std::make_unique<SentencePieceTokenizer>(std::move(sp));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir,
                                                         const ModelConfig& config) {
  if (!config.is_language_model()) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, ": a backbone checkpoint has no tokenizer"));
  }
  // Every id the tokenizer can produce must be a row of the embedding.
  const auto fits = [&](absl::StatusOr<std::unique_ptr<Tokenizer>> tok,
                        const std::string& path) -> absl::StatusOr<std::unique_ptr<Tokenizer>> {
    if (!tok.ok()) return tok.status();
    if ((*tok)->vocab_size() > config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tokenizer has ids up to ", (*tok)->vocab_size() - 1,
          " but the model's vocabulary is ", config.vocab_size, " (ids >= vocab_size)"));
    }
    return tok;
  };
  const std::string json_path = dir + "/tokenizer.json";
  const std::string vocab_path = dir + "/vocab.json";
  const std::string merges_path = dir + "/merges.txt";
  if (Exists(json_path)) return fits(LoadHfTokenizerJson(json_path), json_path);
  if (Exists(vocab_path) || Exists(merges_path)) {
    return fits(LoadHfTokenizerDir(dir), Exists(vocab_path) ? vocab_path : merges_path);
  }
  const std::string sp_path = dir + "/tokenizer.model";
  if (Exists(sp_path)) return fits(LoadSentencePieceTokenizer(sp_path), sp_path);
  if (config.vocab_size >= 256) return MakeByteTokenizer(config.bos_token_id, config.eos_token_id);
  return MakeIdsOnlyTokenizer(config.vocab_size, config.bos_token_id, config.eos_token_id);
}

size_t CompleteUtf8Prefix(std::string_view bytes) {
  // Walk back over at most 3 continuation bytes to the last lead byte.
  size_t n = bytes.size();
  size_t i = n;
  int back = 0;
  while (i > 0 && back < 4) {
    unsigned char c = static_cast<unsigned char>(bytes[i - 1]);
    if ((c & 0xC0) != 0x80) {
      size_t need = c < 0x80           ? 1
                    : (c >> 5) == 0x6  ? 2
                    : (c >> 4) == 0xE  ? 3
                    : (c >> 3) == 0x1E ? 4
                                       : 1;
      return (n - (i - 1) >= need) ? n : i - 1;
    }
    --i;
    ++back;
  }
  return n;  // not UTF-8 at all: pass through
}

}  // namespace retnet::model
