// File: model/hf_tokenizer.h
//
// Hugging Face tokenizers: the `tokenizer.json` format (a BPE model with its normalizer,
// pre-tokenizer, decoder and added tokens) and the older GPT-2 pair `vocab.json` +
// `merges.txt` (read as a byte-level BPE with the GPT-2 split regex).
//
// Supported parts:
//  - model: BPE, byte-level (GPT-2 / Llama-3: bytes mapped to printable characters) or
//    SentencePiece-like (`byte_fallback` with <0xNN> tokens, `unk_token`, `fuse_unk`),
//    `ignore_merges`, `continuing_subword_prefix`, `end_of_word_suffix`; merges as "a b"
//    strings or [a, b] arrays. Merges by rank through a priority queue; results cached per word.
//  - normalizers: NFC, NFD, NFKC, NFKD (ICU), Lowercase, Strip, StripAccents, Replace,
//    Prepend, Sequence.
//  - pre-tokenizers: ByteLevel, Split, Metaspace, Digits, Whitespace, WhitespaceSplit,
//    Punctuation, CharDelimiterSplit, Sequence. Regexes run on PCRE2 (UTF + Unicode properties).
//  - decoders: ByteLevel, ByteFallback, Metaspace, Replace, Strip, Fuse, BPEDecoder, Sequence.
//  - added_tokens: the input is split on them first (leftmost longest match), with `lstrip`,
//    `rstrip`, `single_word` and `normalized`; special ones decode to nothing.
// The post-processor is ignored: Encode never adds BOS/EOS (callers add BOS themselves).
//
// Where HF's Rust crate and its JS port (@huggingface/tokenizers, the oracle of
// tests/model/test_hf_tokenizer.py) disagree, this follows the Rust crate: Metaspace `split`
// (default true) splits before each replacement character; Punctuation isolates each mark;
// Digits and Whitespace use Unicode classes (\p{N}, \w); Split honours every behaviour and
// `invert`; an invalid byte run in ByteFallback decodes to one U+FFFD per byte; "first" means "at
// offset 0 of the input". The Metaspace decoder drops one leading space of the first token, as
// the JS port does (older Rust releases drop every "▁" of the first token). Regexes run on PCRE2,
// not Oniguruma: \s may differ on U+0085 (NEL). Unicode normalization is ICU's (Debian 12: ICU 72).
// Not supported (InvalidArgument naming the type): WordPiece/Unigram models, BPE dropout, the
// Precompiled/BertNormalizer normalizers, Bert/Replace/FixedLength pre-tokenizers and the
// WordPiece/CTC decoders.
//
// bos/eos come from `tokenizer_config.json` next to the file (`bos_token` / `eos_token`, a string
// or {"content": ...}) when present, else from common names; -1 when none.
//
// Errors: a bad file is InvalidArgument naming the file and the field; nothing aborts.
//
// Threading: immutable after load (the per-word merge cache is internally locked); every method
// is safe to call concurrently. The returned tokenizer owns all its data.
#ifndef RETNET_MODEL_HF_TOKENIZER_H_
#define RETNET_MODEL_HF_TOKENIZER_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace retnet::model {

// Parses a tokenizer.json document. `name` (a path) prefixes error messages; `config_json` is the
// content of tokenizer_config.json, or empty when there is none.
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizerJson(std::string_view json,
                                                                std::string_view name,
                                                                std::string_view config_json = "",
                                                                std::string_view config_name = "");

// Loads PATH (a tokenizer.json) and tokenizer_config.json from the same directory if present.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizerJson(const std::string& path);

// Loads a GPT-2 vocab.json + merges.txt pair (and tokenizer_config.json next to vocab.json).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadGpt2Tokenizer(const std::string& vocab_path,
                                                             const std::string& merges_path);

// The HF tokenizer of a directory: DIR/tokenizer.json, else DIR/vocab.json + DIR/merges.txt.
// NotFound when the directory has neither.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizerDir(const std::string& dir);

}  // namespace retnet::model

#endif  // RETNET_MODEL_HF_TOKENIZER_H_
