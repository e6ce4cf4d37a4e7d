// File: model/tokenizer.h
//
// Tokenizers: the built-in byte-level one (ids 0..255 are bytes; specials above), SentencePiece
// models (tokenizer.model in a checkpoint directory, via libsentencepiece), HF tokenizer.json and
// GPT-2 vocab.json + merges.txt (model/hf_tokenizer.h), and an ids-only placeholder for models
// without any tokenizer.
//
// Decoding is byte-exact: TokenBytes() gives the raw bytes of one token (possibly an incomplete
// UTF-8 sequence), so a streaming consumer can concatenate and emit only complete characters.
//
// Threading: tokenizers are immutable after creation; all methods are safe to call concurrently.
#ifndef RETNET_MODEL_TOKENIZER_H_
#define RETNET_MODEL_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace retnet::model {

struct ModelConfig;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // "byte", "sentencepiece", "hf" (tokenizer.json), "gpt2" (vocab.json + merges.txt) or "none".
  virtual std::string kind() const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t bos_id() const = 0;  // -1 when none
  virtual int64_t eos_id() const = 0;  // -1 when none
  // Text to ids (no BOS added). InvalidArgument on failure.
  virtual absl::StatusOr<std::vector<int64_t>> Encode(std::string_view text) const = 0;
  // Raw bytes of one id; empty for special or out-of-range ids.
  virtual std::string TokenBytes(int64_t id) const = 0;
  // Concatenated text of ids (special ids dropped).
  virtual std::string Decode(const std::vector<int64_t>& ids) const;
};

// Byte-level: ids 0..255 = bytes; `bos`/`eos` are ids >= 256 (or -1); vocab = max(256, ids+1).
std::unique_ptr<Tokenizer> MakeByteTokenizer(int64_t bos_id, int64_t eos_id);

// No tokenizer: Encode fails with FailedPrecondition ("send token ids"), TokenBytes and Decode
// return "". kind() is "none".
std::unique_ptr<Tokenizer> MakeIdsOnlyTokenizer(int64_t vocab_size, int64_t bos_id, int64_t eos_id);

// Loads a SentencePiece model file.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(const std::string& path);

// The tokenizer that belongs to a checkpoint, the first of: DIR/tokenizer.json (HF),
// DIR/vocab.json + DIR/merges.txt (GPT-2), DIR/tokenizer.model (SentencePiece); else byte-level
// when the vocabulary has at least 256 entries, else ids-only (MakeIdsOnlyTokenizer, bos/eos from
// the config). InvalidArgument naming the file when a file is bad or holds ids outside the
// model's vocabulary.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& dir,
                                                         const ModelConfig& config);

// Length of the longest prefix of `bytes` that ends on a UTF-8 character boundary (an
// incomplete multi-byte sequence at the end is held back).
size_t CompleteUtf8Prefix(std::string_view bytes);

}  // namespace retnet::model

#endif  // RETNET_MODEL_TOKENIZER_H_
