// The CPU fast step (model/cpu_step.h) against the reference ops, and the slot-indexed Step.
//
// Every variant of test_util.h (and a few more combinations) runs the same trajectory through a
// reference model and a fast model with identical weights, on scattered pool slots at mixed and
// large positions; logits and states must agree within 1e-5 relative, and slots outside the
// batch must stay bit-identical.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "model/checkpoint.h"
#include "model/retnet.h"
#include "tests/model/test_util.h"

namespace retnet::model {
namespace {

using testing::RandomInput;
using testing::RelErr;
using testing::SmallConfig;
using testing::Variant;

constexpr double kTol = 1e-5;

std::unique_ptr<RetNet> Make(const ModelConfig& c, ModelOptions::Path path,
                             at::ScalarType dtype = at::kFloat) {
  ModelOptions o;
  o.path = path;
  o.dtype = dtype;
  auto m = RetNet::CreateRandom(c, 11, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

struct Case {
  std::string name;
  ModelConfig config;
};

std::vector<Case> Cases() {
  std::vector<Case> cases = {{"fla", SmallConfig(Variant::kFla)},
                             {"torchscale", SmallConfig(Variant::kTorchscale)},
                             {"torchscale_v1", SmallConfig(Variant::kTorchscaleV1)},
                             {"seed", SmallConfig(Variant::kSeed)}};
  ModelConfig c = SmallConfig(Variant::kFla);  // fla with biases, a GELU gate, LayerNorms
  c.proj_bias = true;
  c.ffn_bias = true;
  c.gate_act = Activation::kGelu;
  c.block_norm = NormKind::kLayerNorm;
  c.block_norm_bias = true;
  c.group_norm = NormKind::kLayerNorm;
  c.group_norm_bias = true;
  c.final_norm = false;
  cases.push_back({"fla_biases_layernorm", c});
  ModelConfig t = SmallConfig(Variant::kTorchscaleV1);  // FFN v1 without the inner norm
  t.ffn_inner_norm = false;
  t.ffn_act = Activation::kSwish;
  cases.push_back({"torchscale_v1_no_subln", t});
  return cases;
}

TEST(CpuStep, PathResolution) {
  const ModelConfig c = SmallConfig(Variant::kFla);
  EXPECT_TRUE(Make(c, ModelOptions::Path::kAuto)->cpu_fast_step());
  EXPECT_TRUE(Make(c, ModelOptions::Path::kFast)->cpu_fast_step());
  EXPECT_FALSE(Make(c, ModelOptions::Path::kReference)->cpu_fast_step());
  // Reduced-precision weights on the CPU fall back to the reference step.
  EXPECT_FALSE(Make(c, ModelOptions::Path::kFast, at::kBFloat16)->cpu_fast_step());
}

// The same prompts and steps through both paths on scattered slots of one pool each.
TEST(CpuStep, MatchesReferenceForEveryVariantOnScatteredSlots) {
  for (const Case& tc : Cases()) {
    SCOPED_TRACE(tc.name);
    auto ref = Make(tc.config, ModelOptions::Path::kReference);
    auto fast = Make(tc.config, ModelOptions::Path::kFast);
    ASSERT_NE(ref, nullptr);
    ASSERT_NE(fast, nullptr);
    ASSERT_TRUE(fast->cpu_fast_step());
    // 24 rows: enough (row, head) items for the OpenMP paths; 40 slots, so 16 stay idle.
    const int64_t batch = 24, capacity = 40;
    std::vector<int64_t> slots, positions;
    for (int64_t b = 0; b < batch; ++b) slots.push_back((b * 7 + 3) % capacity);
    at::Tensor pool_ref = at::randn(ref->StateShape(capacity)) * 0.1;
    for (int64_t b = 0; b < batch; ++b) {
      // Mixed positions, some large (rotary angles and 1/sqrt(c_n) far from 0).
      const int64_t len = 1 + (b * 13) % 29;
      const int64_t start = b % 5 == 0 ? 30000 + b : 0;
      at::Tensor s = pool_ref.narrow(1, slots[b], 1);
      ASSERT_TRUE(ref->Chunkwise(RandomInput(tc.config, 1, len, 50 + b), s, start, 8).ok());
      positions.push_back(start + len);
    }
    at::Tensor pool_fast = pool_ref.clone();
    const at::Tensor idle_before = pool_ref.clone();
    for (int step = 0; step < 4; ++step) {
      at::Tensor input = RandomInput(tc.config, batch, 1, 900 + step).select(1, 0).contiguous();
      const at::Tensor pos = at::tensor(positions, at::kLong);
      auto want = ref->Step(input, pos, pool_ref, slots);
      auto got = fast->Step(input, pos, pool_fast, slots);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_LE(RelErr(*got, *want), kTol) << "step " << step;
      for (int64_t b = 0; b < batch; ++b) {
        EXPECT_LE(RelErr(pool_fast.narrow(1, slots[b], 1), pool_ref.narrow(1, slots[b], 1)), kTol)
            << "state of row " << b << " after step " << step;
      }
      for (auto& p : positions) ++p;
    }
    std::vector<bool> used(capacity, false);
    for (int64_t s : slots) used[s] = true;
    for (int64_t s = 0; s < capacity; ++s) {
      if (used[s]) continue;
      EXPECT_TRUE(at::equal(pool_fast.narrow(1, s, 1), idle_before.narrow(1, s, 1))) << s;
      EXPECT_TRUE(at::equal(pool_ref.narrow(1, s, 1), idle_before.narrow(1, s, 1))) << s;
    }
  }
}

// Batch 1 (the GEMV branch) and the default checkpoint's own greedy continuation.
TEST(CpuStep, DefaultModelGreedyTokensMatchTheReference) {
  ModelOptions ref_options, fast_options;
  ref_options.path = ModelOptions::Path::kReference;
  fast_options.path = ModelOptions::Path::kFast;
  auto ref = LoadModel(DefaultModelDir(), ref_options);
  auto fast = LoadModel(DefaultModelDir(), fast_options);
  ASSERT_TRUE(ref.ok()) << ref.status();
  ASSERT_TRUE(fast.ok()) << fast.status();
  ASSERT_TRUE((*fast)->cpu_fast_step());
  const at::Tensor prompt = at::tensor(std::vector<int64_t>{84, 104, 101, 32, 113}).view({1, 5});
  std::vector<int64_t> tokens[2];
  const RetNet* models[2] = {ref->get(), fast->get()};
  for (int m = 0; m < 2; ++m) {
    at::Tensor state = models[m]->NewState(1);
    auto logits = models[m]->Chunkwise(prompt, state, 0, 0, Outputs::kLast);
    ASSERT_TRUE(logits.ok()) << logits.status();
    int64_t token = logits->view({-1}).argmax().item<int64_t>();
    for (int64_t i = 0; i < 48; ++i) {
      tokens[m].push_back(token);
      auto step =
          models[m]->Step(at::full({1}, token, at::kLong), at::full({1}, 5 + i, at::kLong), state);
      ASSERT_TRUE(step.ok()) << step.status();
      token = step->view({-1}).argmax().item<int64_t>();
    }
  }
  EXPECT_EQ(tokens[0], tokens[1]);
}

TEST(CpuStep, ConcurrentCallsOnDistinctStatesMatchSequentialOnes) {
  auto fast = Make(SmallConfig(Variant::kFla), ModelOptions::Path::kFast);
  ASSERT_NE(fast, nullptr);
  const int64_t batch = 3;
  at::Tensor base = at::randn(fast->StateShape(batch)) * 0.1;
  const at::Tensor input = at::tensor(std::vector<int64_t>{1, 2, 3});
  const at::Tensor pos = at::tensor(std::vector<int64_t>{4, 9, 16});
  at::Tensor want_state = base.clone();
  auto want = fast->Step(input, pos, want_state);
  ASSERT_TRUE(want.ok());
  std::vector<at::Tensor> states(4), outs(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    states[t] = base.clone();
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        at::Tensor s = base.clone();
        auto out = fast->Step(input, pos, s);
        if (!out.ok()) return;
        outs[t] = *out;
        states[t] = s;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    ASSERT_TRUE(outs[t].defined());
    EXPECT_TRUE(at::equal(outs[t], *want)) << t;
    EXPECT_TRUE(at::equal(states[t], want_state)) << t;
  }
}

TEST(CpuStep, SlotIndexedStepRejectsBadSlotsNamingTheField) {
  for (ModelOptions::Path path : {ModelOptions::Path::kReference, ModelOptions::Path::kFast}) {
    auto m = Make(SmallConfig(Variant::kFla), path);
    at::Tensor pool = m->NewState(4);
    const at::Tensor input = at::tensor(std::vector<int64_t>{1, 2});
    const at::Tensor pos = at::tensor(std::vector<int64_t>{0, 0});
    for (const std::vector<int64_t>& slots :
         {std::vector<int64_t>{1, 1}, std::vector<int64_t>{0, 4}, std::vector<int64_t>{-1, 0},
          std::vector<int64_t>{0}}) {
      auto r = m->Step(input, pos, pool, slots);
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(std::string(r.status().message()).find("slots"), std::string::npos) << r.status();
    }
    EXPECT_TRUE(at::equal(pool, m->NewState(4)));  // nothing was written
  }
}

}  // namespace
}  // namespace retnet::model
