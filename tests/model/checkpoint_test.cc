// Checkpoint loading: fla/HF files written here (single file, shards, legacy fused MLP, bf16)
// load into a model identical to the one they came from; every loader error is specific.
// (torchscale, syncdoth and seed layouts are covered against the Python reference goldens.)
#include "model/checkpoint.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "model/safetensors.h"
#include "tests/model/test_util.h"

namespace retnet::model {
namespace {

using testing::RelErr;

ModelConfig FlaConfig() {
  ModelConfig c = testing::SmallConfig(testing::Variant::kFla);
  c.ffn_dim = 256;  // what fla derives from hidden_ratio 2 for D = 32 (rounded up to 256)
  return c;
}

std::string FlaConfigJson(const std::string& extra = "") {
  return absl::StrCat(
      R"({"model_type": "retnet", "hidden_size": 32, "num_hidden_layers": 2, )",
      R"("num_heads": 2, "expand_k": 1, "expand_v": 2, "hidden_ratio": 2, "vocab_size": 61, )",
      R"("norm_eps": 1e-6, "hidden_act": "swish", "tie_word_embeddings": false)", extra, "}");
}

// internal name -> fla/HF key.
std::string FlaKey(const std::string& internal) {
  if (internal == "embed.w") return "model.embeddings.weight";
  if (internal == "final_norm.w") return "model.norm.weight";
  if (internal == "lm_head.w") return "lm_head.weight";
  std::string k = absl::StrReplaceAll(internal, {{"attn_norm.w", "attn_norm.weight"},
                                                 {"ffn_norm.w", "mlp_norm.weight"},
                                                 {".gn.w", ".attn.g_norm_swish_gate.weight"},
                                                 {".ffn.act.w", ".mlp.gate_proj.weight"},
                                                 {".ffn.lin.w", ".mlp.up_proj.weight"},
                                                 {".ffn.out.w", ".mlp.down_proj.weight"}});
  for (const char* p : {"q", "k", "v", "g", "o"}) {
    k = absl::StrReplaceAll(
        k, {{absl::StrCat(".", p, ".w"), absl::StrCat(".attn.", p, "_proj.weight")}});
  }
  return "model." + k;
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/ckpt_XXXXXX";
    ASSERT_NE(::mkdtemp(dir_.data()), nullptr);
    at::manual_seed(42);
    for (const auto& [name, shape] : ExpectedTensors(FlaConfig())) {
      tensors_.emplace_back(FlaKey(name), at::randn(shape) * 0.2);
      internal_[name] = tensors_.back().second;
    }
  }

  void WriteConfig(const std::string& json) { std::ofstream(dir_ + "/config.json") << json; }
  void WriteWeights(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                    const std::string& file = "model.safetensors") {
    ASSERT_TRUE(WriteSafetensors(dir_ + "/" + file, tensors).ok());
  }
  std::vector<std::pair<std::string, at::Tensor>> Without(const std::string& key) const {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (const auto& kv : tensors_) {
      if (kv.first != key) out.push_back(kv);
    }
    return out;
  }
  // Logits of the directory's model vs the model built directly from the same weights.
  void ExpectSameAsReference() {
    auto loaded = LoadModel(dir_, {});
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ModelWeights w;
    w.tensors = internal_;
    ModelConfig c = FlaConfig();
    for (int i = 0; i < c.num_layers; ++i) w.buffers.push_back(DefaultBuffers(c));
    auto reference = RetNet::Create(c, w, {});
    ASSERT_TRUE(reference.ok()) << reference.status();
    at::Tensor tokens = at::randint(61, {2, 19}, at::kLong);
    EXPECT_LE(RelErr(*(*loaded)->Parallel(tokens), *(*reference)->Parallel(tokens)), 1e-6);
  }
  absl::Status LoadStatus() { return ReadCheckpoint(dir_).status(); }
  void ExpectError(absl::StatusCode code, const std::vector<std::string>& needles) {
    absl::Status s = LoadStatus();
    EXPECT_EQ(s.code(), code) << s;
    for (const auto& n : needles)
      EXPECT_NE(s.message().find(n), std::string::npos) << "'" << n << "' not in: " << s;
  }

  std::string dir_;
  std::vector<std::pair<std::string, at::Tensor>> tensors_;
  std::map<std::string, at::Tensor> internal_;
};

TEST_F(CheckpointTest, LoadsFlaSingleFile) {
  WriteConfig(FlaConfigJson());
  WriteWeights(tensors_);
  auto ckpt = ReadCheckpoint(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->config.family, Family::kFla);
  EXPECT_EQ(ckpt->config.ffn_dim, 256);
  EXPECT_EQ(ckpt->config.rotary, Rotary::kRotateHalf);
  ExpectSameAsReference();
}

TEST_F(CheckpointTest, LoadsShardedCheckpoint) {
  WriteConfig(FlaConfigJson());
  std::vector<std::pair<std::string, at::Tensor>> a(tensors_.begin(), tensors_.begin() + 7);
  std::vector<std::pair<std::string, at::Tensor>> b(tensors_.begin() + 7, tensors_.end());
  WriteWeights(a, "model-00001-of-00002.safetensors");
  WriteWeights(b, "model-00002-of-00002.safetensors");
  std::string map;
  for (const auto& [k, v] : a)
    map +=
        absl::StrCat(map.empty() ? "" : ",", "\"", k, "\": \"model-00001-of-00002.safetensors\"");
  for (const auto& [k, v] : b)
    map += absl::StrCat(",\"", k, "\": \"model-00002-of-00002.safetensors\"");
  std::ofstream(dir_ + "/model.safetensors.index.json")
      << "{\"metadata\": {}, \"weight_map\": {" << map << "}}";
  ExpectSameAsReference();
}

TEST_F(CheckpointTest, SplitsLegacyFusedGateProj) {
  WriteConfig(FlaConfigJson());
  auto tensors = Without("model.layers.0.mlp.up_proj.weight");
  for (auto& [k, v] : tensors) {
    if (k == "model.layers.0.mlp.gate_proj.weight") {
      v = at::cat({internal_["layers.0.ffn.act.w"], internal_["layers.0.ffn.lin.w"]}, 0);
    }
  }
  WriteWeights(tensors);
  ExpectSameAsReference();
}

TEST_F(CheckpointTest, LoadsBfloat16Weights) {
  WriteConfig(FlaConfigJson());
  auto tensors = tensors_;
  for (auto& [k, v] : tensors) {
    v = v.to(at::kBFloat16);
  }
  WriteWeights(tensors);
  auto loaded = LoadModel(dir_, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto logits = (*loaded)->Parallel(at::zeros({1, 3}, at::kLong));
  ASSERT_TRUE(logits.ok());
  EXPECT_EQ(logits->scalar_type(), at::kFloat);
}

TEST_F(CheckpointTest, MissingDirectoryAndConfigAreNotFound) {
  EXPECT_EQ(ReadCheckpoint(dir_ + "/nope").status().code(), absl::StatusCode::kNotFound);
  WriteWeights(tensors_);
  ExpectError(absl::StatusCode::kNotFound, {"config.json"});
}

TEST_F(CheckpointTest, MissingWeightsFileIsNotFound) {
  WriteConfig(FlaConfigJson());
  ExpectError(absl::StatusCode::kNotFound, {"model.safetensors"});
}

TEST_F(CheckpointTest, MalformedConfigIsInvalid) {
  WriteConfig("{\"model_type\": ");
  WriteWeights(tensors_);
  ExpectError(absl::StatusCode::kInvalidArgument, {"config.json", "JSON"});
}

TEST_F(CheckpointTest, MissingConfigFieldNamesIt) {
  WriteConfig(R"({"model_type": "retnet", "hidden_size": 32, "num_heads": 2, "vocab_size": 61})");
  WriteWeights(tensors_);
  ExpectError(absl::StatusCode::kInvalidArgument, {"config.json", "num_hidden_layers"});
}

TEST_F(CheckpointTest, UnknownFamily) {
  WriteConfig(R"({"model_type": "llama", "hidden_size": 32})");
  WriteWeights(tensors_);
  ExpectError(absl::StatusCode::kInvalidArgument, {"unknown model family", "llama"});
}

TEST_F(CheckpointTest, MissingTensorNamesTensorAndFile) {
  WriteConfig(FlaConfigJson());
  WriteWeights(Without("model.layers.1.attn.k_proj.weight"));
  ExpectError(absl::StatusCode::kInvalidArgument,
              {"missing tensor 'model.layers.1.attn.k_proj.weight'", "model.safetensors"});
}

TEST_F(CheckpointTest, UnexpectedTensorNamesIt) {
  WriteConfig(FlaConfigJson());
  auto tensors = tensors_;
  tensors.emplace_back("model.layers.0.attn.extra.weight", at::zeros({2}));
  WriteWeights(tensors);
  ExpectError(absl::StatusCode::kInvalidArgument,
              {"unexpected tensor 'model.layers.0.attn.extra.weight'"});
}

TEST_F(CheckpointTest, WrongShapeNamesTensorAndShapes) {
  WriteConfig(FlaConfigJson());
  auto tensors = tensors_;
  for (auto& [k, v] : tensors) {
    if (k == "model.layers.0.attn.v_proj.weight") v = at::zeros({63, 32});
  }
  WriteWeights(tensors);
  ExpectError(absl::StatusCode::kInvalidArgument,
              {"'model.layers.0.attn.v_proj.weight'", "[63, 32]", "expected [64, 32]",
               "model.safetensors"});
}

TEST_F(CheckpointTest, WrongDtypeNamesIt) {
  WriteConfig(FlaConfigJson());
  auto tensors = tensors_;
  for (auto& [k, v] : tensors) {
    if (k == "model.norm.weight") v = at::ones({32}, at::kLong);
  }
  WriteWeights(tensors);
  ExpectError(absl::StatusCode::kInvalidArgument, {"'model.norm.weight'", "dtype I64"});
}

TEST_F(CheckpointTest, TruncatedWeightsFile) {
  WriteConfig(FlaConfigJson());
  WriteWeights(tensors_);
  const std::string path = dir_ + "/model.safetensors";
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 100);
  ExpectError(absl::StatusCode::kInvalidArgument, {"model.safetensors", "truncated"});
}

TEST_F(CheckpointTest, UnsupportedFlaVariantsAreUnimplemented) {
  WriteWeights(tensors_);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"(, "use_short_conv": true)", "short convolution"},
      {R"(, "num_kv_heads": 1)", "GQA"},
      {R"(, "feature_map": "elu")", "feature maps"},
      {R"(, "attn": {"layers": [1]})", "hybrid attention"},
      {R"(, "use_output_gate": false)", "output gate"},
  };
  for (const auto& [extra, needle] : cases) {
    WriteConfig(FlaConfigJson(extra));
    ExpectError(absl::StatusCode::kUnimplemented, {needle, "config.json"});
  }
}

TEST_F(CheckpointTest, TorchscaleMoeAndMultiwayAreUnimplemented) {
  const std::string cfg =
      R"({"family": "torchscale", "decoder_embed_dim": 32, "decoder_value_embed_dim": 64,
    "decoder_retention_heads": 2, "decoder_ffn_embed_dim": 48, "decoder_layers": 1, "vocab_size": 61)";
  WriteWeights({{"decoder.layers.0.retention.q_proj.weight", at::zeros({32, 32})}});
  WriteConfig(cfg + R"(, "multiway": true})");
  ExpectError(absl::StatusCode::kUnimplemented, {"multiway"});
  WriteConfig(cfg + R"(, "moe_freq": 2})");
  ExpectError(absl::StatusCode::kUnimplemented, {"mixture-of-experts"});
}

}  // namespace
}  // namespace retnet::model
