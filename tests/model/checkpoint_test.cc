// Checkpoint loading: fla/HF files written here (single file, shards, legacy fused MLP, bf16)
// load into a model identical to the one they came from; every loader error is specific.
// (torchscale, syncdoth and seed layouts are covered against the Python reference goldens; here
// only the July-2023 torchscale layout's group-norm eps.) Absurd config sizes and special files
// are refused before anything is allocated or read (tests/model/test_corrupt_checkpoints.py runs
// a whole corruption corpus through the binaries).
#include "model/checkpoint.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <functional>

#include "absl/strings/match.h"
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

// EOS as an id or a list in config.json; generation_config.json's list replaces it and gives the
// BOS; tokenizer_config.json's add_bos_token is kept; ids outside the vocabulary are refused.
TEST_F(CheckpointTest, ReadsGenerationAndTokenizerConfigDefaults) {
  WriteConfig(FlaConfigJson(R"(, "eos_token_id": [7, 9])"));
  WriteWeights(tensors_);
  auto c = ReadCheckpoint(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->config.eos_token_ids, std::vector<int64_t>({7, 9}));
  EXPECT_EQ(c->config.eos_token_id, 7);
  EXPECT_EQ(c->config.add_bos_token, -1);
  std::ofstream(dir_ + "/generation_config.json")
      << R"({"bos_token_id": 1, "eos_token_id": [3, 4, 5]})";
  std::ofstream(dir_ + "/tokenizer_config.json") << R"({"add_bos_token": false})";
  c = ReadCheckpoint(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->config.eos_token_ids, std::vector<int64_t>({3, 4, 5}));
  EXPECT_EQ(c->config.eos_token_id, 3);
  EXPECT_EQ(c->config.bos_token_id, 1);
  EXPECT_EQ(c->config.add_bos_token, 0);
  std::ofstream(dir_ + "/generation_config.json") << R"({"eos_token_id": [3, 61]})";
  ExpectError(absl::StatusCode::kInvalidArgument, {"eos_token_id 61", "vocabulary"});
  std::ofstream(dir_ + "/generation_config.json") << R"({"eos_token_id": ["x"]})";
  ExpectError(absl::StatusCode::kInvalidArgument, {"generation_config.json", "eos_token_id"});
  std::ofstream(dir_ + "/generation_config.json") << R"({})";
  std::ofstream(dir_ + "/tokenizer_config.json") << R"({"add_bos_token": "yes"})";
  ExpectError(absl::StatusCode::kInvalidArgument, {"tokenizer_config.json", "add_bos_token"});
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

TEST_F(CheckpointTest, AbsurdConfigSizesNameFileAndField) {
  WriteWeights(tensors_);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("hidden_size": 1099511627776)", "'hidden_size'"},
      {R"("hidden_size": 9223372036854775809)", "'hidden_size'"},
      {R"("hidden_size": -32)", "'hidden_size'"},
      {R"("hidden_size": "32")", "'hidden_size'"},
      {R"("num_hidden_layers": 1000000000)", "'num_hidden_layers'"},
      {R"("num_hidden_layers": 1e9)", "'num_hidden_layers'"},
      {R"("num_heads": 0)", "'num_heads'"},
      {R"("num_heads": 3)", "num_heads=3"},
      {R"("vocab_size": 1099511627776)", "'vocab_size'"},
      {R"("vocab_size": 0)", "'vocab_size'"},
      {R"("expand_k": 1e300)", "'expand_k'"},
      {R"("expand_v": -2)", "'expand_v'"},
      {R"("hidden_ratio": 1e300)", "'hidden_ratio'"},
      {R"("intermediate_size": 1099511627776)", "'intermediate_size'"},
      {R"("eos_token_id": 1099511627776)", "'eos_token_id'"},
  };
  for (const auto& [field, needle] : cases) {
    // The later key wins in the parsed object: put the mutation last.
    std::string json = FlaConfigJson();
    json.insert(json.size() - 1, ", " + field);
    if (absl::StrContains(field, "hidden_ratio")) {
      json = absl::StrReplaceAll(
          json, {{R"("vocab_size")", R"("intermediate_size": null, "vocab_size")"}});
    }
    WriteConfig(json);
    SCOPED_TRACE(field);
    ExpectError(absl::StatusCode::kInvalidArgument, {"config.json", needle});
  }
}

TEST_F(CheckpointTest, SpecialFilesAreRefusedWithoutBlocking) {
  WriteWeights(tensors_);
  const std::string config = dir_ + "/config.json";
  ASSERT_EQ(::mkfifo(config.c_str(), 0600), 0);  // a reader would wait for a writer forever
  ExpectError(absl::StatusCode::kInvalidArgument, {"config.json", "not a regular file"});
  ASSERT_EQ(::unlink(config.c_str()), 0);
  ASSERT_EQ(::symlink("/dev/zero", config.c_str()), 0);  // would read without end
  ExpectError(absl::StatusCode::kInvalidArgument, {"config.json", "not a regular file"});
  ASSERT_EQ(::unlink(config.c_str()), 0);
  ASSERT_EQ(::mkdir(config.c_str(), 0700), 0);
  ExpectError(absl::StatusCode::kInvalidArgument, {"config.json", "not a regular file"});
  ASSERT_EQ(::rmdir(config.c_str()), 0);

  WriteConfig(FlaConfigJson());
  const std::string weights = dir_ + "/model.safetensors";
  ASSERT_EQ(::unlink(weights.c_str()), 0);
  ASSERT_EQ(::mkfifo(weights.c_str(), 0600), 0);
  ExpectError(absl::StatusCode::kInvalidArgument, {"model.safetensors", "not a regular file"});
  ASSERT_EQ(::unlink(weights.c_str()), 0);
  // A symlink to a regular file is fine.
  const std::string elsewhere = dir_ + "/elsewhere.bin";
  WriteWeights(tensors_, "elsewhere.bin");
  ASSERT_EQ(::symlink(elsewhere.c_str(), weights.c_str()), 0);
  EXPECT_TRUE(ReadCheckpoint(dir_).ok());
}

// internal name -> July-2023 torchscale key (no "decoder." prefix).
std::string TorchscaleV1Key(const std::string& internal) {
  std::string k = internal;
  const auto dot = k.rfind('.');
  const std::string suffix = k.substr(dot + 1) == "w" ? "weight" : "bias";
  k = k.substr(0, dot);
  if (k == "embed") return "embed_tokens.weight";
  if (k == "final_norm") return "layer_norm." + suffix;
  if (k == "lm_head") return "output_projection.weight";
  k = absl::StrReplaceAll(k, {{".attn_norm", ".retention_layer_norm"},
                              {".ffn_norm", ".final_layer_norm"},
                              {".ffn.act", ".ffn.fc1"},
                              {".ffn.out", ".ffn.fc2"},
                              {".ffn.inner_norm", ".ffn.ffn_layernorm"},
                              {".o", ".retention.out_proj"}});
  for (const char* p : {"q", "k", "v", "g"}) {
    if (absl::EndsWith(k, absl::StrCat(".", p))) {
      k = absl::StrCat(k.substr(0, k.size() - 1), "retention.", p, "_proj");
    }
  }
  return k + "." + suffix;
}

// Upstream's MultiScaleRetention of the July-2023 layout (e.g. 0b1f113) builds its group norm
// with a hard-coded eps of 1e-6, whatever the config's layernorm_eps (1e-5) says; the block
// norms keep layernorm_eps. An explicit group_norm_eps still wins.
TEST_F(CheckpointTest, TorchscaleV1GroupNormEpsIsUpstreamsHardCodedValue) {
  ModelConfig want = testing::SmallConfig(testing::Variant::kTorchscaleV1);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  ModelWeights weights;
  at::manual_seed(7);
  for (const auto& [name, shape] : ExpectedTensors(want)) {
    at::Tensor t = at::randn(shape) * 0.2;
    if (absl::EndsWith(name, "norm.w")) t = t + 1;
    tensors.emplace_back(TorchscaleV1Key(name), t);
    weights.tensors[name] = t;
  }
  WriteWeights(tensors);
  const std::string config =
      R"({"family": "torchscale", "decoder_embed_dim": 32, "decoder_value_embed_dim": 64,
          "decoder_retention_heads": 2, "decoder_ffn_embed_dim": 64, "decoder_layers": 2,
          "vocab_size": 61, "layernorm_eps": 1e-5, "activation_fn": "gelu",
          "no_scale_embedding": true, "share_decoder_input_output_embed": false)";
  WriteConfig(config + "}");
  auto ckpt = ReadCheckpoint(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->config.layout, "torchscale-v1");
  EXPECT_EQ(ckpt->config.group_norm, NormKind::kLayerNorm);
  EXPECT_EQ(ckpt->config.group_norm_eps, 1e-6);
  EXPECT_EQ(ckpt->config.block_norm_eps, 1e-5);

  // The loaded model computes with that eps: equal to one built with 1e-6, not to one with 1e-5
  // (the value projections are scaled down so that eps matters, as in the goldens).
  for (auto& [name, t] : weights.tensors) {
    if (absl::StrContains(name, ".v.")) t = t * 0.01;
  }
  for (auto& [key, t] : tensors) {
    if (absl::StrContains(key, "retention.v_proj")) t = t * 0.01;
  }
  WriteWeights(tensors);
  auto loaded = LoadModel(dir_, {});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  for (int i = 0; i < want.num_layers; ++i) weights.buffers.push_back(DefaultBuffers(want));
  at::Tensor tokens = at::randint(61, {1, 23}, at::kLong);
  auto logits_of = [&](double eps) {
    ModelConfig c = want;
    c.group_norm_eps = eps;
    auto model = RetNet::Create(c, weights, {});
    EXPECT_TRUE(model.ok()) << model.status();
    return *(*model)->Parallel(tokens);
  };
  at::Tensor got = *(*loaded)->Parallel(tokens);
  EXPECT_LE(RelErr(got, logits_of(1e-6)), 1e-6);
  EXPECT_GT(RelErr(got, logits_of(1e-5)), 1e-3);

  WriteConfig(config + R"(, "group_norm_eps": 1e-5})");
  auto overridden = ReadCheckpoint(dir_);
  ASSERT_TRUE(overridden.ok()) << overridden.status();
  EXPECT_EQ(overridden->config.group_norm_eps, 1e-5);
}

}  // namespace
}  // namespace retnet::model
