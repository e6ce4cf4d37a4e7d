// The built-in default model: loads through the fla/HF loader, its forms agree, and it has
// learned English (low loss on an unseen English paragraph, readable greedy output).
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <numeric>
#include <random>

#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "tests/model/test_util.h"

namespace retnet::model {
namespace {

// Written for this test; not part of the training corpus.
constexpr char kParagraph[] =
    "When the evening came, the old man walked down to the river and sat on a stone near the "
    "water. He thought about the years that had passed, and about the people he had known in "
    "the town where he was born. The light was going, and the birds were quiet in the trees.";

class DefaultModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = DefaultModelDir();
    auto model = LoadModel(dir_, {});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(model).value();
    auto tok = LoadTokenizer(dir_, model_->config());
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(tok).value();
  }

  // Mean next-byte negative log-likelihood (nats) of `text` after BOS.
  double Nll(const std::string& text) {
    std::vector<int64_t> ids = *tok_->Encode(text);
    ids.insert(ids.begin(), tok_->bos_id());
    at::Tensor tokens = at::tensor(ids, at::kLong).view({1, -1});
    at::Tensor logits = *model_->Parallel(tokens);
    at::Tensor logp = at::log_softmax(logits.narrow(1, 0, tokens.size(1) - 1), -1);
    at::Tensor target = tokens.narrow(1, 1, tokens.size(1) - 1).unsqueeze(-1);
    return -logp.gather(-1, target).mean().item<double>();
  }

  std::string dir_;
  std::unique_ptr<RetNet> model_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(DefaultModelTest, IsASmallByteLevelFlaModel) {
  const ModelConfig& c = model_->config();
  EXPECT_EQ(c.family, Family::kFla);
  EXPECT_EQ(tok_->kind(), "byte");
  EXPECT_GE(c.vocab_size, 256);
  EXPECT_GT(ParameterCount(c), 1'000'000);
  EXPECT_LT(ParameterCount(c), 10'000'000);
}

TEST_F(DefaultModelTest, HasLearnedEnglish) {
  const double english = Nll(kParagraph);
  std::string shuffled = kParagraph;
  std::mt19937 rng(1);
  std::shuffle(shuffled.begin(), shuffled.end(), rng);
  const double noise = Nll(shuffled);
  // Uniform over 258 ids is 5.55 nats; unigram English is about 2.9.
  EXPECT_LT(english, 2.0) << "nats/byte on unseen English";
  EXPECT_GT(noise - english, 1.0) << "English must be far more likely than its shuffled bytes";
}

TEST_F(DefaultModelTest, GreedyTextLooksLikeEnglish) {
  c10::InferenceMode guard;
  std::vector<int64_t> ids = *tok_->Encode("The ");
  ids.insert(ids.begin(), tok_->bos_id());
  at::Tensor state = model_->NewState(1);
  at::Tensor logits =
      *model_->Chunkwise(at::tensor(ids, at::kLong).view({1, -1}), state, 0, 16, Outputs::kLast);
  std::string text;
  int64_t pos = static_cast<int64_t>(ids.size());
  for (int i = 0; i < 300; ++i) {
    const int64_t next = logits.view({-1}).argmax().item<int64_t>();
    if (next == tok_->eos_id()) break;
    text += tok_->TokenBytes(next);
    logits = *model_->Step(at::full({1}, next, at::kLong), at::full({1}, pos++, at::kLong), state);
  }
  ASSERT_GT(text.size(), 40u) << text;
  const auto letters =
      std::count_if(text.begin(), text.end(), [](unsigned char ch) { return std::isalpha(ch); });
  const auto spaces = std::count(text.begin(), text.end(), ' ');
  EXPECT_GT(static_cast<double>(letters) / text.size(), 0.6) << text;
  EXPECT_GT(spaces, static_cast<int64_t>(text.size() / 12)) << text;  // words, not one long run
  // Common English words appear.
  const std::string lower = [&] {
    std::string s = " " + text + " ";
    for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return s;
  }();
  int common = 0;
  for (const char* w :
       {" the ", " and ", " of ", " to ", " a ", " in ", " he ", " was ", " that ", " it "}) {
    common += lower.find(w) != std::string::npos;
  }
  EXPECT_GE(common, 2) << text;
}

TEST_F(DefaultModelTest, FormsAgreeOnTheDefaultModel) {
  std::vector<int64_t> ids = *tok_->Encode(kParagraph);
  at::Tensor tokens = at::tensor(ids, at::kLong).view({1, -1});
  at::Tensor parallel = *model_->Parallel(tokens);
  at::Tensor state = model_->NewState(1);
  at::Tensor chunked = *model_->Chunkwise(tokens, state, 0, 13);
  EXPECT_LE(testing::RelErr(chunked, parallel), 1e-5);
}

}  // namespace
}  // namespace retnet::model
