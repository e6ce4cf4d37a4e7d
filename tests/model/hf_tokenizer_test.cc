// HF tokenizer.json (model/hf_tokenizer.h): one hand-written tiny tokenizer per feature (merge
// order, byte fallback, added-token splitting, Split behaviours, Metaspace prepend schemes,
// normalizers, GPT-2 vocab.json + merges.txt), bad files refused with InvalidArgument naming the
// field, and LoadTokenizer's selection and vocab-size check. The comparison against HF's own
// implementation on trained tokenizers is tests/model/test_hf_tokenizer.py.
#include "model/hf_tokenizer.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "model/config.h"
#include "model/tokenizer.h"

namespace retnet::model {
namespace {

using Json = nlohmann::json;

const char kSpace[] = "\xE2\x96\x81";  // U+2581

// A BPE tokenizer.json over `tokens` (ids in order) with `merges`.
// GPT-2's byte -> printable character map: the UTF-8 of each byte's vocabulary character.
std::vector<std::string> Gpt2ByteChars() {
  std::vector<std::string> chars;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    const int cp = printable ? b : 256 + n++;
    std::string u;
    if (cp < 0x80) {
      u.push_back(static_cast<char>(cp));
    } else {
      u.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      u.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    chars.push_back(u);
  }
  return chars;
}

Json Bpe(const std::vector<std::string>& tokens, const Json& merges = Json::array()) {
  Json vocab = Json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  return {{"version", "1.0"},
          {"added_tokens", Json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder", nullptr},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

std::unique_ptr<Tokenizer> Parse(const Json& j, const std::string& config = "") {
  auto tok = ParseHfTokenizerJson(j.dump(), "test/tokenizer.json", config);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

std::vector<int64_t> Ids(const Tokenizer& tok, const std::string& text) {
  auto ids = tok.Encode(text);
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int64_t>{};
}

// The pieces' strings (one id per piece when the vocab holds every piece and ignore_merges).
std::vector<std::string> Pieces(const Tokenizer& tok, const std::string& text) {
  std::vector<std::string> out;
  for (int64_t id : Ids(tok, text)) out.push_back(tok.TokenBytes(id));
  return out;
}

void ExpectError(const Json& j, const std::string& needle) {
  auto tok = ParseHfTokenizerJson(j.dump(), "dir/tokenizer.json");
  ASSERT_FALSE(tok.ok()) << "expected an error naming " << needle;
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
  EXPECT_NE(tok.status().message().find("dir/tokenizer.json"), std::string::npos) << tok.status();
  EXPECT_NE(tok.status().message().find(needle), std::string::npos) << tok.status();
}

TEST(HfTokenizerTest, MergesApplyByRankInBothForms) {
  const std::vector<std::string> v = {"a", "b", "c", "ab", "bc", "abc"};
  // "b c" outranks "a b": a + bc, then "a bc".
  auto t1 = Parse(Bpe(v, Json::array({"b c", "a b", "a bc"})));
  EXPECT_EQ(Ids(*t1, "abc"), (std::vector<int64_t>{5}));
  auto t2 = Parse(Bpe(v, Json::array({"b c", "a b"})));
  EXPECT_EQ(Ids(*t2, "abc"), (std::vector<int64_t>{0, 4}));
  // The array form, "a b" first.
  auto t3 = Parse(Bpe(v, Json::array({Json::array({"a", "b"}), Json::array({"b", "c"})})));
  EXPECT_EQ(Ids(*t3, "abc"), (std::vector<int64_t>{3, 2}));
  // Equal pairs merge left to right: "bbb" -> bb + b.
  auto t4 = Parse(Bpe({"b", "bb"}, Json::array({"b b"})));
  EXPECT_EQ(Ids(*t4, "bbb"), (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(Ids(*t4, "bbbb"), (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(t4->kind(), "hf");
  EXPECT_EQ(t4->vocab_size(), 2);
  // A long word goes through the queue (and the cache) the same way twice.
  std::string longword(5000, 'b');
  EXPECT_EQ(Ids(*t4, longword).size(), 2500u);
  EXPECT_EQ(Ids(*t4, "bbb"), (std::vector<int64_t>{1, 0}));
}

TEST(HfTokenizerTest, IgnoreMergesTakesWholeWords) {
  Json j = Bpe({"a", "b", "c", "ab", "abc"}, Json::array({"a b"}));
  j["model"]["ignore_merges"] = true;
  auto tok = Parse(j);
  EXPECT_EQ(Ids(*tok, "abc"), (std::vector<int64_t>{4}));  // no merge path, but in the vocab
  EXPECT_EQ(Ids(*tok, "ab"), (std::vector<int64_t>{3}));
}

TEST(HfTokenizerTest, ByteFallbackAndUnknownTokens) {
  std::vector<std::string> v = {"<unk>", "h", "i"};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    snprintf(name, sizeof(name), "<0x%02X>", b);
    v.push_back(name);
  }
  Json j = Bpe(v, Json::array({"h i"}));
  j["model"]["vocab"]["hi"] = v.size();
  j["model"]["byte_fallback"] = true;
  j["model"]["unk_token"] = "<unk>";
  j["decoder"] = {{"type", "ByteFallback"}};
  auto tok = Parse(j);
  const std::string text = "hi\xC3\xA9";  // "hié"
  auto ids = Ids(*tok, text);
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[0], static_cast<int64_t>(v.size()));  // "hi"
  EXPECT_EQ(ids[1], 3 + 0xC3);
  EXPECT_EQ(ids[2], 3 + 0xA9);
  EXPECT_EQ(tok->TokenBytes(ids[1]), "\xC3");
  EXPECT_EQ(tok->Decode(ids), text);
  // An invalid byte run decodes to U+FFFD per byte, never to invalid UTF-8.
  EXPECT_EQ(tok->Decode({3 + 0xC3}), "\xEF\xBF\xBD");

  // Without byte fallback: unknown characters become <unk>, fused when fuse_unk.
  j["model"]["byte_fallback"] = false;
  auto plain = Parse(j);
  EXPECT_EQ(Ids(*plain, "xyhi"), (std::vector<int64_t>{0, 0, static_cast<int64_t>(v.size())}));
  j["model"]["fuse_unk"] = true;
  auto fused = Parse(j);
  EXPECT_EQ(Ids(*fused, "xyhi"), (std::vector<int64_t>{0, static_cast<int64_t>(v.size())}));
}

TEST(HfTokenizerTest, ByteFallbackOnlyEqualsTheByteTokenizer) {
  // <0xNN> = NN, <s> = 256, </s> = 257 and no merges: the built-in byte tokenizer as
  // tokenizer.json.
  std::vector<std::string> v;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    snprintf(name, sizeof(name), "<0x%02X>", b);
    v.push_back(name);
  }
  Json j = Bpe(v);
  j["model"]["byte_fallback"] = true;
  j["added_tokens"] = Json::array({{{"id", 256}, {"content", "<s>"}, {"special", true}},
                                   {{"id", 257}, {"content", "</s>"}, {"special", true}}});
  j["decoder"] = {
      {"type", "Sequence"},
      {"decoders", Json::array({Json{{"type", "ByteFallback"}}, Json{{"type", "Fuse"}}})}};
  auto tok = Parse(j);
  auto bytes = MakeByteTokenizer(256, 257);
  const std::string text = "The LORD \xE2\x82\xAC \xF0\x9F\x98\x80\n\t\x01";
  EXPECT_EQ(Ids(*tok, text), *bytes->Encode(text));
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_EQ(tok->eos_id(), 257);
  EXPECT_EQ(tok->vocab_size(), 258);
  for (int64_t id = 0; id < 258; ++id) EXPECT_EQ(tok->TokenBytes(id), bytes->TokenBytes(id));
  EXPECT_EQ(tok->Decode(Ids(*tok, text)), text);
}

TEST(HfTokenizerTest, ContinuingSubwordPrefixAndSuffix) {
  Json j = Bpe({"a", "##b", "ab", "c</w>"}, Json::array({"a ##b"}));
  j["model"]["continuing_subword_prefix"] = "##";
  auto tok = Parse(j);
  EXPECT_EQ(Ids(*tok, "ab"), (std::vector<int64_t>{2}));
  Json k = Bpe({"a", "c</w>", "ac</w>"}, Json::array({"a c</w>"}));
  k["model"]["end_of_word_suffix"] = "</w>";
  k["decoder"] = {{"type", "BPEDecoder"}, {"suffix", "</w>"}};
  auto suf = Parse(k);
  EXPECT_EQ(Ids(*suf, "ac"), (std::vector<int64_t>{2}));
  EXPECT_EQ(suf->Decode({2}), "ac");
}

TEST(HfTokenizerTest, AddedTokensSplitFirstLongestMatch) {
  Json j = Bpe({"a", "b", " ", "<"});
  j["added_tokens"] = Json::array(
      {{{"id", 4}, {"content", "<x>"}, {"special", true}},
       {{"id", 5}, {"content", "<x><y>"}, {"special", true}},
       {{"id", 6}, {"content", "[T]"}, {"special", false}, {"lstrip", true}, {"rstrip", true}},
       {{"id", 7}, {"content", "ab"}, {"special", false}, {"single_word", true}}});
  j["model"]["vocab"]["<x>"] = 4;
  auto tok = Parse(j);
  EXPECT_EQ(tok->vocab_size(), 8);
  EXPECT_EQ(Ids(*tok, "a<x><y>b<x>"), (std::vector<int64_t>{0, 5, 1, 4}));
  EXPECT_EQ(Ids(*tok, "<<x>"), (std::vector<int64_t>{3, 4}));
  // lstrip/rstrip eat the spaces around "[T]".
  EXPECT_EQ(Ids(*tok, "a  [T]  b"), (std::vector<int64_t>{0, 6, 1}));
  // single_word: "ab" only as a word of its own.
  EXPECT_EQ(Ids(*tok, "a ab b"), (std::vector<int64_t>{0, 2, 7, 2, 1}));
  EXPECT_EQ(Ids(*tok, "aab"), (std::vector<int64_t>{0, 0, 1}));
  // Specials decode to nothing, non-special added tokens to their content.
  EXPECT_EQ(tok->TokenBytes(4), "");
  EXPECT_EQ(tok->TokenBytes(6), "[T]");
  EXPECT_EQ(tok->Decode({0, 4, 6, 1}), "a [T] b");  // no decoder: joined by spaces, as HF
  EXPECT_EQ(tok->Decode({-1, 99}), "");
}

TEST(HfTokenizerTest, NormalizedAddedTokensMatchAfterNormalization) {
  Json j = Bpe({"x", "y", "<tag>"});
  j["normalizer"] = {{"type", "Lowercase"}};
  j["added_tokens"] =
      Json::array({{{"id", 3}, {"content", "<Tag>"}, {"special", false}, {"normalized", true}},
                   {{"id", 4}, {"content", "<RAW>"}, {"special", true}, {"normalized", false}}});
  auto tok = Parse(j);
  EXPECT_EQ(Ids(*tok, "X<TAG>y"), (std::vector<int64_t>{0, 3, 1}));
  EXPECT_EQ(Ids(*tok, "x<tag>"), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(Ids(*tok, "<RAW>x"), (std::vector<int64_t>{4, 0}));
  EXPECT_EQ(tok->TokenBytes(3), "<Tag>");  // an added token's content, as HF decodes it
}

TEST(HfTokenizerTest, ConcurrentEncodesAgree) {
  const std::vector<std::string> v = {"a", "b", "ab", "abab", " "};
  Json j = Bpe(v, Json::array({"a b", "ab ab"}));
  j["pre_tokenizer"] = {{"type", "WhitespaceSplit"}};
  auto tok = Parse(j);
  std::string text;
  for (int i = 0; i < 200; ++i) text += std::string(1 + i % 7, 'a') + "b ab abab ";
  const auto want = Ids(*tok, text);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int k = 0; k < 50; ++k) {
        auto ids = tok->Encode(text);
        if (!ids.ok() || *ids != want) ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(HfTokenizerTest, SplitBehaviours) {
  const std::vector<std::string> v = {"a", "b", "c", "-", "a-", "b-", "-b", "-c", "--"};
  const auto with = [&](const std::string& behavior, bool invert, const Json& pattern) {
    Json j = Bpe(v);
    j["model"]["ignore_merges"] = true;
    j["pre_tokenizer"] = {
        {"type", "Split"}, {"pattern", pattern}, {"behavior", behavior}, {"invert", invert}};
    return Parse(j);
  };
  const Json dash = {{"String", "-"}};
  using P = std::vector<std::string>;
  EXPECT_EQ(Pieces(*with("Removed", false, dash), "a-b--c"), (P{"a", "b", "c"}));
  EXPECT_EQ(Pieces(*with("Isolated", false, dash), "a-b--c"), (P{"a", "-", "b", "-", "-", "c"}));
  EXPECT_EQ(Pieces(*with("MergedWithPrevious", false, dash), "a-b--c"), (P{"a-", "b-", "-", "c"}));
  EXPECT_EQ(Pieces(*with("MergedWithNext", false, dash), "a-b--c"), (P{"a", "-b", "-", "-c"}));
  EXPECT_EQ(Pieces(*with("Contiguous", false, dash), "a-b--c"), (P{"a", "-", "b", "--", "c"}));
  EXPECT_EQ(Pieces(*with("Removed", true, dash), "a-b--c"), (P{"-", "-", "-"}));
  EXPECT_EQ(Pieces(*with("Isolated", false, {{"Regex", "-+"}}), "a-b--c"),
            (P{"a", "-", "b", "--", "c"}));
  EXPECT_EQ(Pieces(*with("Isolated", false, {{"Regex", "\\p{L}"}}), "a-b--c"),
            (P{"a", "-", "b", "--", "c"}));
}

TEST(HfTokenizerTest, MetaspacePrependSchemes) {
  const std::string s = kSpace;
  const std::vector<std::string> v = {s + "hello", "hello", s + "world", s, "<s>", s + "hi", "hi"};
  const auto with = [&](const std::string& scheme) {
    Json j = Bpe(v);
    j["model"]["ignore_merges"] = true;
    j["added_tokens"] = Json::array({{{"id", 4}, {"content", "<s>"}, {"special", true}}});
    j["pre_tokenizer"] = {
        {"type", "Metaspace"}, {"replacement", s}, {"prepend_scheme", scheme}, {"split", true}};
    j["decoder"] = {{"type", "Metaspace"}, {"replacement", s}, {"prepend_scheme", scheme}};
    return Parse(j);
  };
  auto always = with("always"), first = with("first"), never = with("never");
  EXPECT_EQ(Ids(*always, "hello world"), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(Ids(*never, "hello world"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(Ids(*first, "hello world"), (std::vector<int64_t>{0, 2}));
  // After an added token the text is no longer at the start: "first" does not prepend.
  EXPECT_EQ(Ids(*first, "<s>hi"), (std::vector<int64_t>{4, 6}));
  EXPECT_EQ(Ids(*always, "<s>hi"), (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(always->Decode({0, 2}), "hello world");
  EXPECT_EQ(always->TokenBytes(0), " hello");  // streaming keeps the space
  EXPECT_EQ(never->Decode({3, 1}), " hello");
}

TEST(HfTokenizerTest, NormalizersAndCharacterPreTokenizers) {
  const std::vector<std::string> v = {"abc", "fi", "1", "2", "3", "12", "123", "x", ",", "!", " "};
  Json j = Bpe(v);
  j["model"]["ignore_merges"] = true;
  j["normalizer"] = {
      {"type", "Sequence"},
      {"normalizers",
       Json::array({Json{{"type", "NFKC"}}, Json{{"type", "Lowercase"}},
                    Json{{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}})}};
  auto tok = Parse(j);
  // Full-width ABC -> "abc"; the ligature U+FB01 -> "fi"; spaces stripped.
  EXPECT_EQ(Ids(*tok, "  \xEF\xBC\xA1\xEF\xBC\xA2\xEF\xBC\xA3 "), (std::vector<int64_t>{0}));
  EXPECT_EQ(Ids(*tok, "\xEF\xAC\x81"), (std::vector<int64_t>{1}));

  Json d = Bpe(v);
  d["model"]["ignore_merges"] = true;
  d["pre_tokenizer"] = {{"type", "Digits"}, {"individual_digits", true}};
  EXPECT_EQ(Ids(*Parse(d), "123"), (std::vector<int64_t>{2, 3, 4}));
  d["pre_tokenizer"]["individual_digits"] = false;
  EXPECT_EQ(Ids(*Parse(d), "123x"), (std::vector<int64_t>{6, 7}));
  d["pre_tokenizer"] = {{"type", "Punctuation"}};
  EXPECT_EQ(Ids(*Parse(d), "x,!"), (std::vector<int64_t>{7, 8, 9}));
  d["pre_tokenizer"] = {{"type", "WhitespaceSplit"}};
  EXPECT_EQ(Ids(*Parse(d), " x  12 "), (std::vector<int64_t>{7, 5}));
  d["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_EQ(Ids(*Parse(d), "x ,!"), (std::vector<int64_t>{7, 8, 9}));
  // Text that is not UTF-8 is refused, not tokenized.
  EXPECT_EQ(Parse(d)->Encode("\xFF").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HfTokenizerTest, ByteLevelTokenBytesAreExact) {
  // Every byte as a base token (the GPT-2 map) and a few merges: streaming is byte-exact.
  Json j = Bpe({});
  Json vocab = Json::object();
  const std::vector<std::string> chars = Gpt2ByteChars();
  for (int b = 0; b < 256; ++b) vocab[chars[b]] = b;
  const std::string g = chars[' '];  // "Ġ"
  vocab[g + "w"] = 256;
  j["model"]["vocab"] = vocab;
  j["model"]["merges"] = Json::array({g + " w"});
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}};
  auto tok = Parse(j);
  const std::string text = "h\xC3\xA9llo w\xC3\xB6rld \xF0\x9F\x98\x80\t\n  !";
  auto ids = Ids(*tok, text);
  std::string streamed;
  for (int64_t id : ids) streamed += tok->TokenBytes(id);
  EXPECT_EQ(streamed, text);
  EXPECT_EQ(tok->Decode(ids), text);
  EXPECT_NE(std::find(ids.begin(), ids.end(), 256), ids.end());  // " w" merged
  // Half a character decodes to U+FFFD, never to invalid UTF-8.
  EXPECT_EQ(tok->Decode({0xF0, 0x9F}), "\xEF\xBF\xBD");
}

TEST(HfTokenizerTest, BadFilesNameTheField) {
  auto not_json = ParseHfTokenizerJson("{\"model\": ", "dir/tokenizer.json");
  EXPECT_EQ(not_json.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(not_json.status().message().find("dir/tokenizer.json"), std::string::npos);

  ExpectError(Json::array(), "(root)");
  Json j = Bpe({"a", "b"});
  j["model"]["vocab"]["c"] = "two";
  ExpectError(j, "model.vocab");
  j = Bpe({"a", "b"});
  j["model"]["vocab"]["c"] = 2000000000;  // far beyond the entries: no 2e9-entry table
  ExpectError(j, "model.vocab");
  ExpectError(Bpe({"a", "b"}, Json::array({"a c"})), "model.merges[0]");
  ExpectError(Bpe({"a", "b"}, Json::array({"a b"})), "model.merges[0]");  // "ab" missing
  ExpectError(Bpe({"a", "b"}, Json::array({"ab"})), "model.merges[0]");
  ExpectError(Bpe({"a", "b"}, Json::array({42})), "model.merges[0]");
  j = Bpe({"a"});
  j["model"]["type"] = "Unigram";
  ExpectError(j, "model.type");
  j = Bpe({"a"});
  j["pre_tokenizer"] = {{"type", "Nonsense"}};
  ExpectError(j, "pre_tokenizer.type");
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  ExpectError(j, "pre_tokenizer.pattern.Regex");
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Sideways"}};
  ExpectError(j, "pre_tokenizer.behavior");
  j = Bpe({"a"});
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders", Json::array({Json{{"type", "Strip"}, {"content", 3}}})}};
  ExpectError(j, "decoder.decoders[0].content");
  j = Bpe({"a"});
  j["normalizer"] = {{"type", "Replace"}, {"pattern", {{"String", "a"}}}};
  ExpectError(j, "normalizer.content");
  j = Bpe({"a"});
  j["added_tokens"] = Json::array({{{"id", -4}, {"content", "x"}}});
  ExpectError(j, "added_tokens[0].id");
  j = Bpe({"a"});
  j["model"]["unk_token"] = "<unk>";
  ExpectError(j, "model.unk_token");
  // Deep nesting is refused, not recursed into without bound.
  Json deep = {{"type", "Fuse"}};
  for (int i = 0; i < 100; ++i) deep = {{"type", "Sequence"}, {"decoders", Json::array({deep})}};
  j = Bpe({"a"});
  j["decoder"] = deep;
  ExpectError(j, "nested too deeply");
  // A bad tokenizer_config.json names that file.
  auto cfg = ParseHfTokenizerJson(Bpe({"a"}).dump(), "t.json", "{\"eos_token\": 7}",
                                  "d/tokenizer_config.json");
  EXPECT_NE(cfg.status().message().find("d/tokenizer_config.json"), std::string::npos);
}

std::string TempDir() {
  std::string dir = ::testing::TempDir() + "/hf_XXXXXX";
  EXPECT_NE(::mkdtemp(dir.data()), nullptr);
  return dir;
}

TEST(HfTokenizerTest, LoadTokenizerPrefersTokenizerJsonAndChecksTheVocab) {
  const std::string dir = TempDir();
  Json j = Bpe({"a", "b", "ab"}, Json::array({"a b"}));
  j["added_tokens"] = Json::array({{{"id", 3}, {"content", "<s>"}, {"special", true}},
                                   {{"id", 4}, {"content", "</s>"}, {"special", true}},
                                   {{"id", 5}, {"content", "<eot>"}, {"special", true}}});
  std::ofstream(dir + "/tokenizer.json") << j.dump();
  ModelConfig config;
  config.vocab_size = 300;
  auto tok = LoadTokenizer(dir, config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "hf");
  EXPECT_EQ((*tok)->bos_id(), 3);  // common names
  EXPECT_EQ((*tok)->eos_id(), 4);
  EXPECT_EQ(Ids(**tok, "ab<s>"), (std::vector<int64_t>{2, 3}));
  // tokenizer_config.json names them.
  std::ofstream(dir + "/tokenizer_config.json")
      << R"({"bos_token": {"content": "</s>"}, "eos_token": "<eot>"})";
  tok = LoadTokenizer(dir, config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 4);
  EXPECT_EQ((*tok)->eos_id(), 5);
  // Ids outside the model's vocabulary are refused, naming the file.
  config.vocab_size = 5;
  auto small = LoadTokenizer(dir, config);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("tokenizer.json"), std::string::npos);
  // Not a regular file.
  const std::string dir2 = TempDir();
  ASSERT_EQ(::mkdir((dir2 + "/tokenizer.json").c_str(), 0700), 0);
  config.vocab_size = 300;
  auto bad = LoadTokenizer(dir2, config);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("not a regular file"), std::string::npos) << bad.status();
}

TEST(HfTokenizerTest, Gpt2VocabAndMergesFiles) {
  const std::string dir = TempDir();
  Json vocab = Json::object();
  const std::vector<std::string> chars = Gpt2ByteChars();
  for (int b = 0; b < 256; ++b) vocab[chars[b]] = b;
  vocab["he"] = 256;
  vocab["<|endoftext|>"] = 257;
  std::ofstream(dir + "/vocab.json") << vocab.dump();
  std::ofstream(dir + "/merges.txt") << "#version: 0.2\nh e\n";
  ModelConfig config;
  config.vocab_size = 258;
  auto tok = LoadTokenizer(dir, config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "gpt2");
  EXPECT_EQ((*tok)->eos_id(), 257);
  EXPECT_EQ(Ids(**tok, "hehe<|endoftext|>"), (std::vector<int64_t>{256, 256, 257}));
  EXPECT_EQ((*tok)->Decode({256, 257, 256}), "hehe");
  std::ofstream(dir + "/merges.txt") << "h e\nx\n";
  auto bad = LoadTokenizer(dir, config);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("merges.txt: line 2"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace retnet::model
