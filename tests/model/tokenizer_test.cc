// Tokenizers: byte-level round trips, UTF-8 boundaries for streaming, and a real SentencePiece
// model trained here with libsentencepiece and loaded from a checkpoint directory.
#include "model/tokenizer.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>

#include "model/config.h"
#include "model/sentencepiece_wrapper.h"

namespace retnet::model {
namespace {

TEST(ByteTokenizerTest, RoundTripsArbitraryBytes) {
  auto tok = MakeByteTokenizer(256, 257);
  const std::string text = "Hello, w\xc3\xb6rld \xe2\x82\xac\x01\xff";
  auto ids = tok->Encode(text);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), text.size());
  EXPECT_EQ((*ids)[0], 'H');
  EXPECT_EQ(tok->Decode(*ids), text);
  EXPECT_EQ(tok->vocab_size(), 258);
  EXPECT_EQ(tok->TokenBytes(256), "");  // specials decode to nothing
  EXPECT_EQ(tok->TokenBytes(-3), "");
}

TEST(Utf8Test, HoldsBackIncompleteSequences) {
  EXPECT_EQ(CompleteUtf8Prefix("abc"), 3u);
  EXPECT_EQ(CompleteUtf8Prefix("ab\xe2\x82"), 2u);      // euro sign, 2 of 3 bytes
  EXPECT_EQ(CompleteUtf8Prefix("ab\xe2\x82\xac"), 5u);  // complete
  EXPECT_EQ(CompleteUtf8Prefix("\xc3"), 0u);
  EXPECT_EQ(CompleteUtf8Prefix("\xf0\x9f\x98\x80"), 4u);
  EXPECT_EQ(CompleteUtf8Prefix(""), 0u);
}

TEST(SentencePieceTest, TrainedModelLoadsFromCheckpointDirectory) {
  std::string dir = ::testing::TempDir() + "/sp_XXXXXX";
  ASSERT_NE(::mkdtemp(dir.data()), nullptr);
  {
    std::ofstream corpus(dir + "/corpus.txt");
    for (int i = 0; i < 200; ++i) {
      corpus << "the quick brown fox jumps over the lazy dog " << i << "\n"
             << "a retentive network keeps a recurrent state per session\n";
    }
  }
  std::string error;
  ASSERT_TRUE(
      internal::TrainSentencePiece("--input=" + dir + "/corpus.txt --model_prefix=" + dir +
                                       "/tokenizer --vocab_size=400 "
                                       "--model_type=bpe --byte_fallback=true --minloglevel=2",
                                   &error))
      << error;

  ModelConfig config;
  config.vocab_size = 512;
  auto tok = LoadTokenizer(dir, config);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->kind(), "sentencepiece");
  const std::string text = "the lazy fox keeps a state";
  auto ids = (*tok)->Encode(text);
  ASSERT_TRUE(ids.ok());
  EXPECT_LT(ids->size(), text.size());  // merges happened
  EXPECT_EQ((*tok)->Decode(*ids), text);
  // Streaming by TokenBytes reproduces the text too (up to the leading space marker).
  std::string streamed;
  for (int64_t id : *ids) streamed += (*tok)->TokenBytes(id);
  EXPECT_EQ(streamed.substr(streamed.find_first_not_of(' ')), text);
  // Characters outside the training data go through byte fallback and survive.
  auto ids2 = (*tok)->Encode("zebra \xc3\xa9");
  ASSERT_TRUE(ids2.ok());
  EXPECT_EQ((*tok)->Decode(*ids2), "zebra \xc3\xa9");

  config.vocab_size = 300;  // smaller than the tokenizer
  EXPECT_EQ(LoadTokenizer(dir, config).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerSelectionTest, ByteLevelWhenNoTokenizerFile) {
  std::string dir = ::testing::TempDir() + "/tok_XXXXXX";
  ASSERT_NE(::mkdtemp(dir.data()), nullptr);
  ModelConfig config;
  config.vocab_size = 258;
  config.bos_token_id = 256;
  config.eos_token_id = 257;
  auto tok = LoadTokenizer(dir, config);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ((*tok)->kind(), "byte");
  EXPECT_EQ((*tok)->eos_id(), 257);
  // Below 256 entries and no tokenizer file: ids only.
  config.vocab_size = 100;
  config.bos_token_id = 1;
  config.eos_token_id = 2;
  auto none = LoadTokenizer(dir, config);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ((*none)->kind(), "none");
  EXPECT_EQ((*none)->vocab_size(), 100);
  EXPECT_EQ((*none)->bos_id(), 1);
  EXPECT_EQ((*none)->eos_id(), 2);
  auto ids = (*none)->Encode("hi");
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ids.status().message(), "the model has no tokenizer: send token ids");
  EXPECT_EQ((*none)->TokenBytes(5), "");
  EXPECT_EQ((*none)->Decode({5, 6}), "");
  // A tokenizer.json is read now; "{}" lacks its model.
  std::ofstream(dir + "/tokenizer.json") << "{}";
  auto bad = LoadTokenizer(dir, config);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("tokenizer.json: model"), std::string::npos)
      << bad.status();
}

}  // namespace
}  // namespace retnet::model
