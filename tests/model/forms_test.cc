// The three forms of RetNet agree: parallel == chunkwise (any chunk size, state carried) ==
// recurrent (token by token), for every variant and both retention normalisations; prefill then
// decode equals one parallel pass; a batched step equals each session stepped alone.
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <memory>
#include <tuple>

#include "model/retnet.h"
#include "tests/model/test_util.h"

namespace retnet::model {
namespace {

using testing::RandomInput;
using testing::RelErr;
using testing::SmallConfig;
using testing::Variant;
using testing::VariantName;

constexpr double kTol = 1e-5;

std::unique_ptr<RetNet> MakeModel(Variant v, at::ScalarType dtype = at::kFloat) {
  ModelOptions options;
  options.dtype = dtype;
  auto model = RetNet::CreateRandom(SmallConfig(v), /*seed=*/1234, options);
  EXPECT_TRUE(model.ok()) << model.status();
  return std::move(model).value();
}

// Token-by-token recurrent outputs for a whole batch from position `start`.
at::Tensor Recurrent(const RetNet& model, const at::Tensor& input, const at::Tensor& state,
                     int64_t start) {
  std::vector<at::Tensor> out;
  for (int64_t t = 0; t < input.size(1); ++t) {
    at::Tensor pos = at::full({input.size(0)}, start + t, at::kLong);
    auto step = model.Step(input.select(1, t), pos, state);
    EXPECT_TRUE(step.ok()) << step.status();
    out.push_back(*step);
  }
  return at::stack(out, 1);
}

class FormsTest : public ::testing::TestWithParam<Variant> {};

TEST_P(FormsTest, ParallelChunkwiseRecurrentAgreeAtLength2048) {
  auto model = MakeModel(GetParam());
  const at::Tensor input = RandomInput(model->config(), 1, 2048, 7);
  auto parallel = model->Parallel(input);
  ASSERT_TRUE(parallel.ok()) << parallel.status();

  at::Tensor reference_state;
  for (int64_t chunk : {1, 7, 64, 100, 2048}) {
    at::Tensor state = model->NewState(1);
    auto chunked = model->Chunkwise(input, state, 0, chunk);
    ASSERT_TRUE(chunked.ok()) << chunked.status();
    EXPECT_LE(RelErr(*chunked, *parallel), kTol) << "chunk size " << chunk;
    if (!reference_state.defined()) {
      reference_state = state.clone();
    } else {
      EXPECT_LE(RelErr(state, reference_state), kTol) << "state after chunk size " << chunk;
    }
  }
  at::Tensor state = model->NewState(1);
  at::Tensor recurrent = Recurrent(*model, input, state, 0);
  EXPECT_LE(RelErr(recurrent, *parallel), kTol);
  // The recurrent state equals the chunkwise one: padding never decays it (no padding exists).
  EXPECT_LE(RelErr(state, reference_state), kTol);
}

TEST_P(FormsTest, ChunkwiseMatchesParallelForBatchAndOddLengths) {
  auto model = MakeModel(GetParam());
  for (int64_t len : {1, 5, 63, 130}) {
    const at::Tensor input = RandomInput(model->config(), 3, len, 11 + len);
    auto parallel = model->Parallel(input);
    ASSERT_TRUE(parallel.ok()) << parallel.status();
    for (int64_t chunk : {1, 4, 64}) {
      at::Tensor state = model->NewState(3);
      auto chunked = model->Chunkwise(input, state, 0, chunk);
      ASSERT_TRUE(chunked.ok()) << chunked.status();
      EXPECT_LE(RelErr(*chunked, *parallel), kTol) << "T=" << len << " C=" << chunk;
    }
  }
}

TEST_P(FormsTest, PrefillThenDecodeEqualsParallel) {
  auto model = MakeModel(GetParam());
  const int64_t t1 = 150, t2 = 40;
  const at::Tensor input = RandomInput(model->config(), 2, t1 + t2, 3);
  auto parallel = model->Parallel(input);
  ASSERT_TRUE(parallel.ok()) << parallel.status();

  at::Tensor state = model->NewState(2);
  auto prefill = model->Chunkwise(input.narrow(1, 0, t1), state, 0, 32, Outputs::kLast);
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  EXPECT_LE(RelErr(*prefill, parallel->narrow(1, t1 - 1, 1)), kTol);
  at::Tensor decoded = Recurrent(*model, input.narrow(1, t1, t2), state, t1);
  EXPECT_LE(RelErr(decoded, parallel->narrow(1, t1, t2)), kTol);
}

TEST_P(FormsTest, MultiTurnChunkwiseContinuationEqualsParallel) {
  auto model = MakeModel(GetParam());
  const at::Tensor input = RandomInput(model->config(), 1, 300, 5);
  auto parallel = model->Parallel(input);
  ASSERT_TRUE(parallel.ok()) << parallel.status();
  at::Tensor state = model->NewState(1);
  int64_t start = 0;
  std::vector<at::Tensor> parts;
  for (int64_t len : {90, 1, 120, 89}) {  // turns of different lengths, chunk size 16
    auto out = model->Chunkwise(input.narrow(1, start, len), state, start, 16);
    ASSERT_TRUE(out.ok()) << out.status();
    parts.push_back(*out);
    start += len;
  }
  EXPECT_LE(RelErr(at::cat(parts, 1), *parallel), kTol);
}

TEST_P(FormsTest, BatchedStepAtMixedPositionsEqualsSingleSteps) {
  auto model = MakeModel(GetParam());
  const std::vector<int64_t> lengths = {3, 40, 1, 77};
  const int64_t batch = static_cast<int64_t>(lengths.size());
  std::vector<at::Tensor> states, next_inputs;
  for (int64_t b = 0; b < batch; ++b) {
    at::Tensor s = model->NewState(1);
    const at::Tensor prompt = RandomInput(model->config(), 1, lengths[b], 100 + b);
    ASSERT_TRUE(model->Chunkwise(prompt, s, 0, 16).ok());
    states.push_back(s);
    next_inputs.push_back(RandomInput(model->config(), 1, 1, 200 + b).select(1, 0));
  }
  // A pool with extra rows around the active ones: the step must update exactly rows [2, 6).
  at::Tensor pool = at::randn(model->StateShape(batch + 3));
  pool.narrow(1, 2, batch).copy_(at::cat(states, 1));
  const at::Tensor untouched =
      at::cat({pool.narrow(1, 0, 2), pool.narrow(1, 2 + batch, 1)}, 1).clone();
  at::Tensor view = pool.narrow(1, 2, batch);
  auto batched = model->Step(at::cat(next_inputs, 0), at::tensor(lengths, at::kLong), view);
  ASSERT_TRUE(batched.ok()) << batched.status();

  for (int64_t b = 0; b < batch; ++b) {
    at::Tensor alone_state = states[b].clone();
    auto alone = model->Step(next_inputs[b], at::full({1}, lengths[b], at::kLong), alone_state);
    ASSERT_TRUE(alone.ok()) << alone.status();
    EXPECT_LE(RelErr(batched->narrow(0, b, 1), *alone), kTol) << "session " << b;
    EXPECT_LE(RelErr(pool.narrow(1, 2 + b, 1), alone_state), kTol) << "state of session " << b;
  }
  EXPECT_TRUE(
      at::equal(at::cat({pool.narrow(1, 0, 2), pool.narrow(1, 2 + batch, 1)}, 1), untouched));
}

TEST_P(FormsTest, ReducedPrecisionWeightsTrackFloat32) {
  auto reference = MakeModel(GetParam());
  const at::Tensor input = RandomInput(reference->config(), 1, 64, 9);
  auto want = reference->Parallel(input);
  ASSERT_TRUE(want.ok());
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    auto model = MakeModel(GetParam(), dtype);
    auto parallel = model->Parallel(input);
    ASSERT_TRUE(parallel.ok()) << parallel.status();
    EXPECT_EQ(parallel->scalar_type(), at::kFloat);
    EXPECT_LE(RelErr(*parallel, *want), 0.1) << c10::toString(dtype);
    // Forms agree with each other in reduced precision too (state stays fp32).
    at::Tensor state = model->NewState(1);
    EXPECT_EQ(state.scalar_type(), at::kFloat);
    at::Tensor recurrent = Recurrent(*model, input, state, 0);
    EXPECT_LE(RelErr(recurrent, *parallel), 0.05) << c10::toString(dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(AllVariants, FormsTest,
                         ::testing::Values(Variant::kFla, Variant::kTorchscale,
                                           Variant::kTorchscaleV1, Variant::kSeed),
                         [](const auto& info) { return VariantName(info.param); });

TEST(FormsValidationTest, BadInputsAreRejectedWithTheFieldName) {
  auto model = MakeModel(Variant::kFla);
  at::Tensor state = model->NewState(1);
  auto out_of_range = model->Parallel(at::full({1, 4}, 61, at::kLong));
  EXPECT_EQ(out_of_range.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out_of_range.status().message().find("tokens"), std::string::npos);
  auto negative = model->Chunkwise(at::full({1, 4}, -1, at::kLong), state, 0, 2);
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  auto wrong_dtype = model->Parallel(at::zeros({1, 4}, at::kFloat));
  EXPECT_EQ(wrong_dtype.status().code(), absl::StatusCode::kInvalidArgument);
  auto empty = model->Parallel(at::zeros({1, 0}, at::kLong));
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  auto wrong_state = model->Chunkwise(at::zeros({2, 4}, at::kLong), state, 0, 2);
  EXPECT_EQ(wrong_state.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_state.status().message().find("state"), std::string::npos);
  auto bad_positions = model->Step(at::zeros({1}, at::kLong), at::zeros({2}, at::kLong), state);
  EXPECT_EQ(bad_positions.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_positions.status().message().find("positions"), std::string::npos);
  auto strided =
      model->Step(at::zeros({1}, at::kLong), at::zeros({1}, at::kLong),
                  at::zeros(model->StateShape(1)).transpose(3, 4).contiguous().transpose(3, 4));
  EXPECT_EQ(strided.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(FormsValidationTest, StateBytesMatchTheShape) {
  auto model = MakeModel(Variant::kTorchscale);
  const ModelConfig& c = model->config();
  EXPECT_EQ(model->StateBytesPerSession(),
            c.num_layers * c.num_heads * c.head_k_dim() * c.head_v_dim() * 4);
  EXPECT_EQ(model->NewState(3).numel() * 4, 3 * model->StateBytesPerSession());
}

}  // namespace
}  // namespace retnet::model
