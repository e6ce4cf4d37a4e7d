// The sampler: the counter-based RNG, every logits processor against its formula, the filters
// against their definitions, the inverse-CDF draw, logprobs, batch independence, and parameter
// validation.
#include "engine/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>

namespace retnet::engine {
namespace {

at::Tensor Logits(const std::vector<std::vector<float>>& rows) {
  const auto b = static_cast<int64_t>(rows.size());
  const auto v = static_cast<int64_t>(rows.at(0).size());
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return at::from_blob(flat.data(), {b, v}, at::kFloat).clone();
}

// Deterministic pseudo-random logits in [-scale, scale) (no dependence on torch's RNG).
at::Tensor RandomLogits(int64_t b, int64_t v, uint64_t seed, double scale = 3.0) {
  std::vector<std::vector<float>> rows(b, std::vector<float>(v));
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < v; ++j) {
      rows[i][j] = static_cast<float>(scale * (2 * UniformFromCounter(seed, i * v + j) - 1));
    }
  }
  return Logits(rows);
}

std::vector<float> LogOf(const std::vector<double>& probs) {
  std::vector<float> out;
  for (double p : probs) out.push_back(static_cast<float>(std::log(p)));
  return out;
}

SampleRow Row(const SamplingParams* p, uint64_t seed = 7, uint64_t counter = 0) {
  SampleRow r;
  r.params = p;
  r.seed = seed;
  r.counter = counter;
  return r;
}

std::vector<SampleResult> Sample(const at::Tensor& logits, const std::vector<SampleRow>& rows) {
  auto r = SampleBatch(logits, rows);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::vector<SampleResult>(rows.size());
}

int64_t One(const at::Tensor& logits, const SampleRow& row) {
  return Sample(logits.dim() == 1 ? logits.unsqueeze(0) : logits, {row}).at(0).token;
}

// Frequencies of the tokens drawn for counters 0..n-1 (one batch of n identical rows).
std::vector<double> Frequencies(const std::vector<float>& logits, const SamplingParams& p,
                                int64_t n, uint64_t seed = 11) {
  const at::Tensor x = Logits({logits}).expand({n, static_cast<int64_t>(logits.size())});
  std::vector<SampleRow> rows;
  for (int64_t c = 0; c < n; ++c) rows.push_back(Row(&p, seed, static_cast<uint64_t>(c)));
  std::vector<double> freq(logits.size(), 0.0);
  for (const auto& r : Sample(x, rows)) freq.at(static_cast<size_t>(r.token)) += 1.0 / n;
  return freq;
}

std::vector<double> Softmax(const std::vector<float>& x, double temperature = 1.0) {
  double mx = *std::max_element(x.begin(), x.end());
  std::vector<double> p;
  double sum = 0;
  for (float v : x) sum += std::exp((v - mx) / temperature);
  for (float v : x) p.push_back(std::exp((v - mx) / temperature) / sum);
  return p;
}

void ExpectFrequencies(const std::vector<double>& freq, const std::vector<double>& expected,
                       double tol) {
  ASSERT_EQ(freq.size(), expected.size());
  for (size_t i = 0; i < freq.size(); ++i) {
    if (expected[i] == 0) {
      EXPECT_EQ(freq[i], 0) << "token " << i << " must never be drawn";
    } else {
      EXPECT_NEAR(freq[i], expected[i], tol + 1e-9) << "token " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Counter-based RNG

TEST(CounterRngTest, IsAPureFunctionOfSeedAndCounter) {
  EXPECT_EQ(BitsFromCounter(1, 2), BitsFromCounter(1, 2));
  EXPECT_EQ(UniformFromCounter(123, 456), UniformFromCounter(123, 456));
  EXPECT_NE(UniformFromCounter(123, 456), UniformFromCounter(123, 457));
  EXPECT_NE(UniformFromCounter(123, 456), UniformFromCounter(124, 456));
  // Unlike plain SplitMix64, a seed offset by the Weyl increment is not a shifted stream.
  const uint64_t golden = 0x9E3779B97F4A7C15ULL;
  for (uint64_t c = 0; c < 16; ++c) {
    EXPECT_NE(BitsFromCounter(5 + golden, c), BitsFromCounter(5, c + 1));
  }
}

TEST(CounterRngTest, IsUniformAndUncorrelated) {
  constexpr int kN = 20000;
  constexpr int kBins = 20;
  for (uint64_t seed : {0ULL, 1ULL, 0xFFFFFFFFFFFFFFFFULL}) {
    std::vector<int> bins(kBins, 0);
    double sum = 0, lag = 0, prev = 0;
    for (int c = 0; c < kN; ++c) {
      const double u = UniformFromCounter(seed, static_cast<uint64_t>(c));
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      ++bins[static_cast<int>(u * kBins)];
      sum += u;
      if (c > 0) lag += (u - 0.5) * (prev - 0.5);
      prev = u;
    }
    double chi2 = 0;
    const double expected = static_cast<double>(kN) / kBins;
    for (int b : bins) chi2 += (b - expected) * (b - expected) / expected;
    EXPECT_LT(chi2, 43.8) << "seed " << seed;  // chi-square, 19 dof, p = 0.001
    EXPECT_NEAR(sum / kN, 0.5, 0.01) << "seed " << seed;
    EXPECT_NEAR(lag / (kN - 1) / (1.0 / 12), 0.0, 0.03) << "seed " << seed;  // lag-1 correlation
  }
  // Neighbouring seeds give unrelated streams.
  int equal = 0;
  for (uint64_t c = 0; c < 1000; ++c) {
    equal += static_cast<int>(UniformFromCounter(41, c) * 10) ==
             static_cast<int>(UniformFromCounter(42, c) * 10);
  }
  EXPECT_NEAR(equal, 100, 40);
}

// ---------------------------------------------------------------------------------------------
// Greedy, determinism, the draw itself

TEST(SampleBatchTest, GreedyIsArgmaxWithLowestIdOnTies) {
  SamplingParams greedy;
  greedy.temperature = 0;
  const at::Tensor x = RandomLogits(4, 50, 3);
  std::vector<SampleRow> rows(4, Row(&greedy));
  const auto got = Sample(x, rows);
  for (int64_t b = 0; b < 4; ++b) {
    int64_t best = 0;
    for (int64_t j = 1; j < 50; ++j) {
      if (x[b][j].item<float>() > x[b][best].item<float>()) best = j;
    }
    EXPECT_EQ(got[b].token, best) << "row " << b;
  }
  EXPECT_EQ(One(Logits({{1, 5, 3, 5, 5}}), Row(&greedy)), 1);
  EXPECT_EQ(One(Logits({{2, 2, 2, 2}}), Row(&greedy)), 0);
  EXPECT_EQ(One(Logits({{-std::numeric_limits<float>::infinity(), 0.5f, 0.5f}}), Row(&greedy)), 1);
}

// Plain greedy rows of a contiguous CPU tensor take the host argmax (no tensor ops); a strided
// view of the same logits takes the tensor path. Both give the same ids, ties and NaN included.
TEST(SampleBatchTest, HostGreedyFastPathEqualsTheTensorPath) {
  SamplingParams greedy;
  greedy.temperature = 0;
  at::Tensor x = RandomLogits(9, 300, 17);
  x[2][7] = x[2].max().item<float>() + 1;  // a tie at the maximum: the lower id wins
  x[2][250] = x[2][7].item<float>();
  x[5][11] = std::numeric_limits<float>::quiet_NaN();
  x[6].fill_(-std::numeric_limits<float>::infinity());
  const at::Tensor strided = x.t().contiguous().t();  // same values, not contiguous
  ASSERT_FALSE(strided.is_contiguous());
  std::vector<SampleRow> rows(9, Row(&greedy));
  const auto fast = Sample(x, rows);
  const auto slow = Sample(strided, rows);
  for (int64_t b = 0; b < 9; ++b) EXPECT_EQ(fast[b].token, slow[b].token) << "row " << b;
  EXPECT_EQ(fast[2].token, 7);
  EXPECT_EQ(fast[5].token, 299);  // a NaN row gives vocab - 1, as the tensor path does
}

TEST(SampleBatchTest, TopK1IsGreedyAtAnyTemperature) {
  const at::Tensor x = RandomLogits(1, 100, 5);
  SamplingParams greedy;
  greedy.temperature = 0;
  const int64_t best = One(x, Row(&greedy));
  for (double t : {0.3, 1.0, 10.0}) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = 1;
    for (uint64_t c = 0; c < 50; ++c) {
      EXPECT_EQ(One(x, Row(&p, 3, c)), best) << "temperature " << t << " counter " << c;
    }
  }
  // Ties under top_k = 1 also resolve to the lowest id.
  SamplingParams p;
  p.top_k = 1;
  for (uint64_t c = 0; c < 20; ++c) EXPECT_EQ(One(Logits({{0, 4, 1, 4}}), Row(&p, 1, c)), 1);
}

TEST(SampleBatchTest, SameSeedAndCounterGiveTheSameTokenAndCountersVary) {
  const at::Tensor x = at::zeros({1, 16});  // uniform over 16 tokens
  SamplingParams p;
  std::vector<int64_t> a, b, other_seed;
  for (uint64_t c = 0; c < 200; ++c) {
    a.push_back(One(x, Row(&p, 99, c)));
    b.push_back(One(x, Row(&p, 99, c)));
    other_seed.push_back(One(x, Row(&p, 100, c)));
  }
  EXPECT_EQ(a, b);
  EXPECT_NE(a, other_seed);
  EXPECT_GE(std::set<int64_t>(a.begin(), a.end()).size(), 14u);
}

TEST(SampleBatchTest, DrawIsTheInverseCdfOfTheCounterUniform) {
  // Descending order: ids 3, 2, 1, 0 with cumulative mass 0.4, 0.7, 0.9, 1.0.
  const at::Tensor x = Logits({LogOf({0.1, 0.2, 0.3, 0.4})});
  const std::vector<std::pair<double, int64_t>> cdf = {{0.4, 3}, {0.7, 2}, {0.9, 1}, {1.0, 0}};
  SamplingParams p;
  int checked = 0;
  for (uint64_t c = 0; c < 300; ++c) {
    const double u = UniformFromCounter(77, c);
    bool near_edge = false;
    int64_t expected = -1;
    for (const auto& [edge, id] : cdf) {
      near_edge |= std::abs(u - edge) < 1e-5;
      if (expected < 0 && u < edge) expected = id;
    }
    if (near_edge) continue;
    EXPECT_EQ(One(x, Row(&p, 77, c)), expected) << "u = " << u;
    ++checked;
  }
  EXPECT_GT(checked, 290);
}

TEST(SampleBatchTest, FrequenciesMatchTheSoftmax) {
  const std::vector<float> x = {0.5f, -1.0f, 2.0f, 1.0f};
  SamplingParams p;
  ExpectFrequencies(Frequencies(x, p, 4000), Softmax(x), 0.025);
}

TEST(SampleBatchTest, TemperatureSharpensAndFlattens) {
  const std::vector<float> x = {0.5f, -1.0f, 2.0f, 1.0f};
  SamplingParams cold, hot;
  cold.temperature = 0.5;
  hot.temperature = 2.0;
  const auto f_cold = Frequencies(x, cold, 4000);
  const auto f_hot = Frequencies(x, hot, 4000);
  ExpectFrequencies(f_cold, Softmax(x, 0.5), 0.025);
  ExpectFrequencies(f_hot, Softmax(x, 2.0), 0.025);
  EXPECT_GT(f_cold[2], Softmax(x)[2] + 0.15);
  EXPECT_LT(f_hot[2], Softmax(x)[2] - 0.15);
}

// ---------------------------------------------------------------------------------------------
// Filters

// Probabilities by id: id 1 = 0.4, id 3 = 0.3, id 0 = 0.2, id 2 = 0.1.
const std::vector<double> kProbs = {0.2, 0.4, 0.1, 0.3};

TEST(SampleBatchTest, TopKKeepsTheKMostProbable) {
  SamplingParams p;
  p.top_k = 2;
  ExpectFrequencies(Frequencies(LogOf(kProbs), p, 3000), {0, 4.0 / 7, 0, 3.0 / 7}, 0.03);
}

TEST(SampleBatchTest, TopPKeepsTheSmallestPrefixWithEnoughMass) {
  SamplingParams p;
  p.top_p = 0.35;  // 0.4 >= 0.35
  ExpectFrequencies(Frequencies(LogOf(kProbs), p, 500), {0, 1, 0, 0}, 0);
  p.top_p = 0.65;  // 0.4 < 0.65 <= 0.7
  ExpectFrequencies(Frequencies(LogOf(kProbs), p, 3000), {0, 4.0 / 7, 0, 3.0 / 7}, 0.03);
  p.top_p = 0.75;  // 0.7 < 0.75 <= 0.9
  ExpectFrequencies(Frequencies(LogOf(kProbs), p, 3000), {2.0 / 9, 4.0 / 9, 0, 3.0 / 9}, 0.03);
  p.top_p = 1.0;
  ExpectFrequencies(Frequencies(LogOf(kProbs), p, 3000), kProbs, 0.03);
}

TEST(SampleBatchTest, TopPAppliesToTheTopKRenormalisedDistribution) {
  // top_k = 3 leaves 0.4, 0.3, 0.2 -> 4/9, 3/9, 2/9; top_p = 0.75 then needs only 4/9 + 3/9.
  // (Without renormalisation 0.4 + 0.3 = 0.7 < 0.75 would keep id 0 as well.)
  SamplingParams p;
  p.top_k = 3;
  p.top_p = 0.75;
  ExpectFrequencies(Frequencies(LogOf(kProbs), p, 3000), {0, 4.0 / 7, 0, 3.0 / 7}, 0.03);
}

TEST(SampleBatchTest, MinPDropsTokensBelowMinPTimesTheMaximum) {
  const std::vector<double> probs = {0.15, 0.05, 0.5, 0.3};
  SamplingParams p;
  p.min_p = 0.2;  // threshold 0.1: drops 0.05
  ExpectFrequencies(Frequencies(LogOf(probs), p, 3000), {0.15 / 0.95, 0, 0.5 / 0.95, 0.3 / 0.95},
                    0.03);
  p.min_p = 0.4;  // threshold 0.2: drops 0.15 and 0.05
  ExpectFrequencies(Frequencies(LogOf(probs), p, 3000), {0, 0, 0.5 / 0.8, 0.3 / 0.8}, 0.03);
}

// ---------------------------------------------------------------------------------------------
// Logits processors

std::vector<float> Processed(const at::Tensor& logits, const SampleRow& row) {
  auto r = ProcessLogits(logits, {row});
  EXPECT_TRUE(r.ok()) << r.status();
  std::vector<float> out;
  if (!r.ok()) return out;
  for (int64_t j = 0; j < r->size(1); ++j) out.push_back((*r)[0][j].item<float>());
  return out;
}

TEST(ProcessorsTest, RepetitionPenaltyDividesPositiveAndMultipliesNegativeLogits) {
  SamplingParams p;
  p.temperature = 0;
  const std::vector<int64_t> prompt = {0, 0, 4};
  const std::vector<int64_t> output = {3, 4};
  p.repetition_penalty = 1.25;
  SampleRow row = Row(&p);
  row.prompt_tokens = &prompt;
  row.output_tokens = &output;
  const at::Tensor x = Logits({{3.0f, 2.4f, -1.0f, -1.15f, 0.5f, 7.0f}});
  const std::vector<float> got = Processed(x, row);
  const std::vector<float> want = {
      static_cast<float>(3.0 / 1.25), 2.4f, -1.0f, static_cast<float>(-1.15 * 1.25),
      static_cast<float>(0.5 / 1.25), 7.0f};
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_FLOAT_EQ(got[i], want[i]) << "token " << i;
  EXPECT_FLOAT_EQ(x[0][0].item<float>(), 3.0f) << "the input logits must not change";

  // The greedy choice flips exactly where the formula says (3 / r vs 2.4), from the prompt alone.
  const at::Tensor pos = Logits({{3.0f, 2.4f}});
  const std::vector<int64_t> prompt0 = {0, 0};
  SampleRow prompt_only = Row(&p);
  prompt_only.prompt_tokens = &prompt0;
  p.repetition_penalty = 1.2;  // 2.5 > 2.4
  EXPECT_EQ(One(pos, prompt_only), 0);
  p.repetition_penalty = 1.3;  // 2.31 < 2.4
  EXPECT_EQ(One(pos, prompt_only), 1);
  // Negative logits are multiplied (-1 * r vs -1.15), from the output alone.
  const at::Tensor neg = Logits({{-1.0f, -1.15f}});
  const std::vector<int64_t> out0 = {0};
  SampleRow output_only = Row(&p);
  output_only.output_tokens = &out0;
  p.repetition_penalty = 1.1;  // -1.1 > -1.15
  EXPECT_EQ(One(neg, output_only), 0);
  p.repetition_penalty = 1.2;  // -1.2 < -1.15
  EXPECT_EQ(One(neg, output_only), 1);
}

TEST(ProcessorsTest, PresenceAndFrequencyPenaltiesCountTheOutputOnly) {
  SamplingParams p;
  p.temperature = 0;
  p.presence_penalty = 0.3;
  p.frequency_penalty = 0.1;
  const std::vector<int64_t> prompt = {1, 1, 1};
  const std::vector<int64_t> output = {0, 2, 0, 0};
  SampleRow row = Row(&p);
  row.prompt_tokens = &prompt;
  row.output_tokens = &output;
  const std::vector<float> got = Processed(Logits({{1.0f, 0.5f, 0.0f}}), row);
  ASSERT_EQ(got.size(), 3u);
  EXPECT_FLOAT_EQ(got[0], static_cast<float>(1.0 - (0.3 + 3 * 0.1)));
  EXPECT_FLOAT_EQ(got[1], 0.5f);  // in the prompt only: untouched
  EXPECT_FLOAT_EQ(got[2], static_cast<float>(0.0 - (0.3 + 1 * 0.1)));

  const at::Tensor x = Logits({{1.0f, 0.5f}});
  const std::vector<int64_t> three = {0, 0, 0};
  SampleRow r3 = Row(&p);
  r3.output_tokens = &three;
  p.frequency_penalty = 0;
  p.presence_penalty = 0.4;  // 0.6 > 0.5
  EXPECT_EQ(One(x, r3), 0);
  p.presence_penalty = 0.6;  // 0.4 < 0.5
  EXPECT_EQ(One(x, r3), 1);
  p.presence_penalty = 0;
  p.frequency_penalty = 0.1;  // 1 - 0.3 = 0.7 > 0.5
  EXPECT_EQ(One(x, r3), 0);
  p.frequency_penalty = 0.2;  // 1 - 0.6 = 0.4 < 0.5
  EXPECT_EQ(One(x, r3), 1);
  // A negative presence penalty rewards repetition.
  const std::vector<int64_t> one = {1};
  SampleRow r1 = Row(&p);
  r1.output_tokens = &one;
  p.frequency_penalty = 0;
  p.presence_penalty = -0.6;  // 0.5 + 0.6 = 1.1 > 1.0
  EXPECT_EQ(One(x, r1), 1);
  // Prompt tokens are not penalised by presence/frequency.
  SampleRow prompt_only = Row(&p);
  prompt_only.prompt_tokens = &three;
  p.presence_penalty = 2;
  p.frequency_penalty = 2;
  EXPECT_EQ(One(x, prompt_only), 0);
}

TEST(ProcessorsTest, LogitBiasForcesAndForbids) {
  const at::Tensor x = RandomLogits(1, 100, 8);
  SamplingParams force;
  force.logit_bias = {{37, 100.0}};
  for (uint64_t c = 0; c < 200; ++c) EXPECT_EQ(One(x, Row(&force, 1, c)), 37);

  SamplingParams greedy;
  greedy.temperature = 0;
  const int64_t best = One(x, Row(&greedy));
  greedy.logit_bias = {{best, -100.0}};
  const int64_t second = One(x, Row(&greedy));
  EXPECT_NE(second, best);
  const std::vector<float> processed = Processed(x, Row(&greedy));
  EXPECT_FLOAT_EQ(processed[static_cast<size_t>(best)], x[0][best].item<float>() - 100.0f);
  EXPECT_EQ(*std::max_element(processed.begin(), processed.end()),
            processed[static_cast<size_t>(second)]);

  // A token that would be drawn almost always is never drawn with -100.
  std::vector<float> peaked(10, 0.0f);
  peaked[4] = 8.0f;
  SamplingParams forbid;
  forbid.logit_bias = {{4, -100.0}, {6, 0.5}};
  const auto freq = Frequencies(peaked, forbid, 1000);
  EXPECT_EQ(freq[4], 0);
  EXPECT_GT(freq[6], 0.1);  // exp(0.5) / (8 + exp(0.5)) = 0.17
}

TEST(ProcessorsTest, SuppressionForbidsEos) {
  constexpr int64_t kEos = 5;
  std::vector<float> x(8, 0.0f);
  x[kEos] = 10.0f;
  x[2] = 1.0f;
  SamplingParams greedy;
  greedy.temperature = 0;
  SampleRow row = Row(&greedy);
  EXPECT_EQ(One(Logits({x}), row), kEos);
  row.suppress = {kEos};
  EXPECT_EQ(One(Logits({x}), row), 2);
  EXPECT_EQ(Processed(Logits({x}), row)[kEos], -std::numeric_limits<float>::infinity());

  SamplingParams p;
  const at::Tensor batch = Logits({x}).expand({1000, 8});
  std::vector<SampleRow> rows;
  for (uint64_t c = 0; c < 1000; ++c) {
    rows.push_back(Row(&p, 3, c));
    rows.back().suppress = {kEos, 7};
  }
  std::set<int64_t> seen;
  for (const auto& r : Sample(batch, rows)) seen.insert(r.token);
  EXPECT_EQ(seen.count(kEos), 0u);
  EXPECT_EQ(seen.count(7), 0u);
  EXPECT_EQ(seen.size(), 6u);
}

// ---------------------------------------------------------------------------------------------
// Logprobs

TEST(SampleBatchTest, LogprobsAreThoseOfTheRawDistribution) {
  const at::Tensor x = RandomLogits(4, 40, 21);
  const at::Tensor raw = at::log_softmax(x, -1);
  SamplingParams none, chosen, five, twenty;
  chosen.logprobs = 0;
  chosen.temperature = 0;
  chosen.logit_bias = {{3, 50.0}};  // changes the choice, not the reported distribution
  five.logprobs = 5;
  five.temperature = 0.7;
  five.repetition_penalty = 1.5;
  five.top_k = 10;
  twenty.logprobs = 20;
  twenty.top_p = 0.5;
  const std::vector<int64_t> output = {1, 2, 3, 4};
  std::vector<SampleRow> rows = {Row(&none), Row(&chosen), Row(&five), Row(&twenty)};
  rows[2].output_tokens = &output;
  const auto got = Sample(x, rows);

  EXPECT_EQ(got[0].logprob, 0.0f);
  EXPECT_TRUE(got[0].top.empty());
  EXPECT_EQ(got[1].token, 3);
  EXPECT_TRUE(got[1].top.empty());
  for (size_t b = 1; b < 4; ++b) {
    const auto bi = static_cast<int64_t>(b);
    EXPECT_NEAR(got[b].logprob, raw[bi][got[b].token].item<float>(), 1e-6) << "row " << b;
    const size_t n = static_cast<size_t>(rows[b].params->logprobs);
    ASSERT_EQ(got[b].top.size(), n);
    // Expected top-n: the raw log probs sorted descending (random logits have no ties).
    std::vector<std::pair<float, int64_t>> sorted;
    for (int64_t j = 0; j < 40; ++j) sorted.emplace_back(raw[bi][j].item<float>(), j);
    std::sort(sorted.rbegin(), sorted.rend());
    for (size_t i = 0; i < n; ++i) {
      EXPECT_EQ(got[b].top[i].first, sorted[i].second) << "row " << b << " rank " << i;
      EXPECT_NEAR(got[b].top[i].second, sorted[i].first, 1e-6) << "row " << b << " rank " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Batches

TEST(SampleBatchTest, MixedParameterBatchEqualsEachRowAlone) {
  constexpr int64_t kV = 64;
  std::vector<SamplingParams> params(8);
  params[0].temperature = 0;
  params[1].temperature = 0.8;
  params[1].top_k = 5;
  params[2].top_p = 0.6;
  params[2].logprobs = 3;
  params[3].min_p = 0.3;
  params[3].temperature = 1.5;
  params[4].repetition_penalty = 1.3;
  params[4].presence_penalty = 0.5;
  params[4].frequency_penalty = 0.25;
  params[4].logprobs = 0;
  params[5].logit_bias = {{10, 3.0}, {11, -2.0}};
  params[5].temperature = 0;
  params[5].logprobs = 20;
  params[6].temperature = 2.0;
  params[6].top_k = 20;
  params[6].top_p = 0.9;
  params[6].min_p = 0.05;
  params[7].temperature = 0.5;  // suppressed ids only
  const std::vector<int64_t> prompt = {1, 2, 3, 10, 10};
  const std::vector<int64_t> output = {4, 4, 5, 11};
  const at::Tensor x = RandomLogits(8, kV, 33);

  for (uint64_t step = 0; step < 30; ++step) {
    std::vector<SampleRow> rows;
    for (size_t b = 0; b < params.size(); ++b) {
      SampleRow r = Row(&params[b], 1000 + b, step);
      r.prompt_tokens = &prompt;
      r.output_tokens = &output;
      if (b == 7 || b == 0) r.suppress = {0, 1, 2, static_cast<int64_t>(step)};
      rows.push_back(r);
    }
    const auto batch = Sample(x, rows);
    // The same rows in reverse order, and each row alone.
    std::vector<SampleRow> reversed(rows.rbegin(), rows.rend());
    const auto rev = Sample(x.flip({0}), reversed);
    for (size_t b = 0; b < rows.size(); ++b) {
      const auto bi = static_cast<int64_t>(b);
      const auto alone = Sample(x.narrow(0, bi, 1), {rows[b]}).at(0);
      const auto& other = rev[rows.size() - 1 - b];
      for (const SampleResult* r : {&batch[b], &other}) {
        EXPECT_EQ(r->token, alone.token) << "row " << b << " step " << step;
        EXPECT_EQ(r->logprob, alone.logprob) << "row " << b << " step " << step;
        EXPECT_EQ(r->top, alone.top) << "row " << b << " step " << step;
      }
    }
  }
}

TEST(SampleBatchTest, MixedBatchDrawsFollowEachRowsOwnParameters) {
  // A greedy row next to sampled rows of different temperatures and filters over 2000 steps.
  const std::vector<float> x = {0.5f, -1.0f, 2.0f, 1.0f};
  SamplingParams greedy, hot, topk;
  greedy.temperature = 0;
  hot.temperature = 2.0;
  topk.top_k = 2;
  std::map<int, std::vector<double>> freq = {
      {0, std::vector<double>(4)}, {1, std::vector<double>(4)}, {2, std::vector<double>(4)}};
  constexpr int kN = 2000;
  const at::Tensor batch = Logits({x, x, x});
  for (uint64_t c = 0; c < kN; ++c) {
    const auto got = Sample(batch, {Row(&greedy, 1, c), Row(&hot, 2, c), Row(&topk, 3, c)});
    for (int b = 0; b < 3; ++b) freq[b][static_cast<size_t>(got[b].token)] += 1.0 / kN;
  }
  ExpectFrequencies(freq[0], {0, 0, 1, 0}, 0);
  ExpectFrequencies(freq[1], Softmax(x, 2.0), 0.03);
  const auto p = Softmax(x);
  ExpectFrequencies(freq[2], {0, 0, p[2] / (p[2] + p[3]), p[3] / (p[2] + p[3])}, 0.03);
}

TEST(SampleBatchTest, AcceptsNonContiguousLogitsAndLeavesThemUnchanged) {
  const at::Tensor full = RandomLogits(3 * 5, 32, 4).view({3, 5, 32});
  const at::Tensor last = full.select(1, 4);  // [3, 32], not contiguous
  ASSERT_FALSE(last.is_contiguous());
  const at::Tensor before = last.clone();
  SamplingParams p;
  p.repetition_penalty = 2;
  p.logit_bias = {{0, 1.0}};
  p.logprobs = 2;
  const std::vector<int64_t> output = {1, 2, 3};
  std::vector<SampleRow> rows(3, Row(&p, 5, 9));
  for (auto& r : rows) r.output_tokens = &output;
  const auto a = Sample(last, rows);
  const auto b = Sample(last.contiguous(), rows);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a[i].token, b[i].token);
    EXPECT_EQ(a[i].top, b[i].top);
  }
  EXPECT_TRUE(at::equal(last, before));
}

TEST(SampleBatchTest, CudaMatchesCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const at::Tensor x = RandomLogits(6, 1000, 12);
  std::vector<SamplingParams> params(6);
  params[0].temperature = 0;
  params[1].top_k = 50;
  params[2].top_p = 0.8;
  params[2].logprobs = 5;
  params[3].min_p = 0.1;
  params[4].repetition_penalty = 1.4;
  params[4].logit_bias = {{7, 2.0}};
  params[5].temperature = 0.3;
  const std::vector<int64_t> output = {7, 8, 9, 9};
  for (uint64_t c = 0; c < 20; ++c) {
    std::vector<SampleRow> rows;
    for (size_t b = 0; b < 6; ++b) {
      rows.push_back(Row(&params[b], b, c));
      rows.back().output_tokens = &output;
    }
    const auto cpu = Sample(x, rows);
    const auto gpu = Sample(x.to(at::kCUDA), rows);
    for (size_t b = 0; b < 6; ++b) {
      EXPECT_EQ(cpu[b].token, gpu[b].token) << "row " << b << " counter " << c;
      EXPECT_NEAR(cpu[b].logprob, gpu[b].logprob, 1e-5);
    }
  }
}

TEST(SampleBatchTest, RejectsMalformedInputs) {
  SamplingParams p;
  const at::Tensor x = at::zeros({2, 8});
  EXPECT_EQ(SampleBatch(x, {Row(&p)}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SampleBatch(x.unsqueeze(0), {Row(&p), Row(&p)}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SampleBatch(x.to(at::kDouble), {Row(&p), Row(&p)}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SampleBatch(x, {Row(&p), Row(nullptr)}).status().code(),
            absl::StatusCode::kInvalidArgument);
  p.frequency_penalty = 1;
  const std::vector<int64_t> bad = {3, 8};
  SampleRow row = Row(&p);
  row.output_tokens = &bad;
  const auto s = SampleBatch(x, {Row(&p), row}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("row 1"), std::string::npos) << s;
  SampleRow sup = Row(&p);
  sup.suppress = {-1};
  EXPECT_EQ(SampleBatch(x, {sup, Row(&p)}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SampleBatch(at::zeros({0, 8}), {}).ok());
}

// ---------------------------------------------------------------------------------------------
// Validation

TEST(ValidateSamplingParamsTest, AcceptsDefaultsAndTheEdgesOfEachRange) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}, 100).ok());
  SamplingParams p;
  p.temperature = 0;
  p.top_p = 1;
  p.min_p = 0.999;
  p.presence_penalty = -2;
  p.frequency_penalty = 2;
  p.logit_bias = {{0, -100}, {99, 100}};
  p.min_tokens = p.max_new_tokens;
  p.stop_token_ids = {0, 99};
  p.stop_strings = std::vector<std::string>(16, "x");
  p.logprobs = 20;
  EXPECT_TRUE(ValidateSamplingParams(p, 100).ok()) << ValidateSamplingParams(p, 100);
}

TEST(ValidateSamplingParamsTest, RejectsEachInvalidFieldByName) {
  const std::vector<std::pair<std::function<void(SamplingParams&)>, std::string>> cases = {
      {[](SamplingParams& p) { p.temperature = -0.1; }, "sampling.temperature"},
      {[](SamplingParams& p) { p.temperature = std::nan(""); }, "sampling.temperature"},
      {[](SamplingParams& p) { p.top_k = -1; }, "sampling.top_k"},
      {[](SamplingParams& p) { p.top_p = 0; }, "sampling.top_p"},
      {[](SamplingParams& p) { p.top_p = 1.5; }, "sampling.top_p: must be in (0, 1], got 1.5"},
      {[](SamplingParams& p) { p.min_p = 1; }, "sampling.min_p"},
      {[](SamplingParams& p) { p.min_p = -0.1; }, "sampling.min_p"},
      {[](SamplingParams& p) { p.repetition_penalty = 0; }, "sampling.repetition_penalty"},
      {[](SamplingParams& p) { p.presence_penalty = 3; }, "sampling.presence_penalty"},
      {[](SamplingParams& p) { p.frequency_penalty = -2.5; }, "sampling.frequency_penalty"},
      {[](SamplingParams& p) {
         p.logit_bias = {{100, 1.0}};
       },
       "sampling.logit_bias"},
      {[](SamplingParams& p) {
         p.logit_bias = {{-1, 1.0}};
       },
       "sampling.logit_bias"},
      {[](SamplingParams& p) {
         p.logit_bias = {{5, 101.0}};
       },
       "sampling.logit_bias"},
      {[](SamplingParams& p) {
         p.logit_bias = {{5, 1.0}, {5, 2.0}};
       },
       "sampling.logit_bias"},
      {[](SamplingParams& p) {
         p.stop_token_ids = {3, 100};
       },
       "stopping.stop_token_ids"},
      {[](SamplingParams& p) {
         p.stop_strings = {"ok", ""};
       },
       "stopping.stop"},
      {[](SamplingParams& p) { p.stop_strings = std::vector<std::string>(17, "x"); },
       "stopping.stop"},
      {[](SamplingParams& p) { p.min_tokens = 129; }, "stopping.min_tokens"},
      {[](SamplingParams& p) { p.min_tokens = -1; }, "stopping.min_tokens"},
      {[](SamplingParams& p) { p.max_new_tokens = 0; }, "stopping.max_new_tokens"},
      {[](SamplingParams& p) { p.logprobs = 21; }, "logprobs"},
      {[](SamplingParams& p) { p.logprobs = -2; }, "logprobs"},
  };
  for (const auto& [mutate, field] : cases) {
    SamplingParams p;
    mutate(p);
    const absl::Status s = ValidateSamplingParams(p, 100);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << "want '" << field << "' in: " << s;
  }
  EXPECT_EQ(ValidateSamplingParams(SamplingParams{}, 0).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retnet::engine
