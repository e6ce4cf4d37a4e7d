// The safetensors reader validates everything up front and names the file and tensor in errors.
#include "model/safetensors.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>

namespace retnet::model {
namespace {

std::string TempPath(const std::string& name) {
  std::string dir = ::testing::TempDir() + "/safetensors_XXXXXX";
  EXPECT_NE(::mkdtemp(dir.data()), nullptr);
  return dir + "/" + name;
}

// Writes an 8-byte length, `header`, and `data_bytes` zero bytes.
std::string WriteRaw(const std::string& header, size_t data_bytes, uint64_t claimed_len = 0) {
  const std::string path = TempPath("raw.safetensors");
  std::ofstream out(path, std::ios::binary);
  uint64_t n = claimed_len != 0 ? claimed_len : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
  return path;
}

TEST(SafetensorsTest, RoundTripsEveryDtypeAndMetadata) {
  const std::string path = TempPath("round.safetensors");
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"f32", at::randn({3, 5})},
      {"bf16", at::randn({7}).to(at::kBFloat16)},
      {"f16", at::randn({2, 2}).to(at::kHalf)},
      {"i64", at::arange(10, at::kLong).view({2, 5})},
      {"scalar_like", at::ones({1})},
  };
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->tensors().size(), tensors.size());
  for (const auto& [name, want] : tensors) {
    auto got = (*file)->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->scalar_type(), want.scalar_type()) << name;
    EXPECT_TRUE(at::equal(*got, want)) << name;
  }
  EXPECT_EQ((*file)->Get("absent").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, TensorsOutliveTheFileHandle) {
  const std::string path = TempPath("alive.safetensors");
  at::Tensor want = at::randn({64});
  ASSERT_TRUE(WriteSafetensors(path, {{"x", want}}).ok());
  at::Tensor got;
  {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok());
    got = *(*file)->Get("x");
  }
  EXPECT_TRUE(at::equal(got, want));
}

void ExpectInvalid(const std::string& path, const std::string& needle) {
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file.status().message().find(needle), std::string::npos) << file.status();
  EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status();
}

TEST(SafetensorsTest, RejectsShortFile) {
  const std::string path = TempPath("short.safetensors");
  std::ofstream(path, std::ios::binary) << "abc";
  ExpectInvalid(path, "truncated");
}

TEST(SafetensorsTest, RejectsOversizedHeader) {
  ExpectInvalid(WriteRaw("{}", 0, kMaxSafetensorsHeaderBytes + 1), "exceeds the limit");
}

TEST(SafetensorsTest, RejectsHeaderLongerThanFile) {
  ExpectInvalid(WriteRaw("{}", 0, 4096), "truncated");
}

TEST(SafetensorsTest, RejectsInvalidJson) {
  ExpectInvalid(WriteRaw("{not json", 0), "not valid JSON");
}

TEST(SafetensorsTest, RejectsUnknownDtype) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", 1),
                "'w': unsupported dtype F8");
}

TEST(SafetensorsTest, RejectsTruncatedData) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "'w'");
}

TEST(SafetensorsTest, RejectsShapeByteMismatch) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16),
                "needs 12 bytes");
}

TEST(SafetensorsTest, RejectsNegativeDimension) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
                "negative");
}

TEST(SafetensorsTest, RejectsOverlappingTensors) {
  ExpectInvalid(WriteRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         12),
                "overlap");
}

// The tensors must tile the data region exactly: a gap, a byte left over or an overlap means the
// header and the data disagree (a header length off by one shifts every tensor).
TEST(SafetensorsTest, RejectsHoleBetweenTensors) {
  ExpectInvalid(WriteRaw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                         12),
                "bytes [4, 8) of the data region belong to no tensor");
}

TEST(SafetensorsTest, RejectsHoleAtTheStart) {
  ExpectInvalid(WriteRaw(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
                "bytes [0, 4)");
}

TEST(SafetensorsTest, RejectsTrailingDataBytes) {
  ExpectInvalid(WriteRaw(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 9),
                "the data region has 9 bytes but the tensors cover 8");
}

TEST(SafetensorsTest, RejectsHeaderLengthOffByOne) {
  // A valid file whose header is padded with spaces: one byte short moves a space into the data
  // region (left over), one byte long moves a data byte into the header (not JSON).
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   )";
  EXPECT_TRUE(SafetensorsFile::Open(WriteRaw(header, 8)).ok());
  ExpectInvalid(WriteRaw(header, 8, header.size() - 1), "the tensors cover 8");
  ExpectInvalid(WriteRaw(header, 8, header.size() + 1), "not valid JSON");
}

TEST(SafetensorsTest, HeaderMayBePaddedWithSpacesOnly) {
  const std::string json = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  EXPECT_TRUE(SafetensorsFile::Open(WriteRaw(json + "       ", 1)).ok());
  ExpectInvalid(WriteRaw(json + "\n", 1), "not valid JSON");
  ExpectInvalid(WriteRaw(json + "\t ", 1), "not valid JSON");
  ExpectInvalid(WriteRaw(json + "x", 1), "not valid JSON");
  ExpectInvalid(WriteRaw(" " + json, 1), "not valid JSON");
  ExpectInvalid(WriteRaw(json + std::string(1, '\0'), 1), "not valid JSON");
  ExpectInvalid(WriteRaw(R"({"a":1}})", 0), "not valid JSON");
  ExpectInvalid(WriteRaw("[]", 0), "not valid JSON");
}

TEST(SafetensorsTest, RejectsEmptyHeader) { ExpectInvalid(WriteRaw("", 0), "not valid JSON"); }

TEST(SafetensorsTest, EmptyTensorsTakeNoBytes) {
  auto file =
      SafetensorsFile::Open(WriteRaw(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},)"
                                     R"("w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                                     4));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Get("e")->numel(), 0);
}

TEST(SafetensorsTest, RejectsBeginAfterEnd) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4), "'w'");
}

TEST(SafetensorsTest, RejectsShapesThatOverflow) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[4611686018427387904,)"
                         R"(4611686018427387904,4],"data_offsets":[0,4]}})",
                         4),
                "overflows");
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"U8","shape":[9223372036854775813],)"
                         R"("data_offsets":[0,4]}})",
                         4),
                "overflows");
  // numel fits in 64 bits but the byte count does not.
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F64","shape":[4611686018427387904],)"
                         R"("data_offsets":[0,8]}})",
                         8),
                "'w'");
}

TEST(SafetensorsTest, RejectsNonIntegerOffsetsAndShapes) {
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", 4),
                "data_offsets");
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}})", 4),
                "non-integer");
  ExpectInvalid(WriteRaw(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4),
                "data_offsets");
}

// Special files are refused at once, never read (a FIFO would block, /dev/zero never ends).
TEST(SafetensorsTest, RefusesFifoDeviceAndDirectoryWithoutBlocking) {
  const std::string fifo = TempPath("fifo.safetensors");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ExpectInvalid(fifo, "not a regular file");
  const std::string zero = TempPath("zero.safetensors");
  ASSERT_EQ(::symlink("/dev/zero", zero.c_str()), 0);
  ExpectInvalid(zero, "not a regular file");
  const std::string dir = TempPath("dir.safetensors");
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  ExpectInvalid(dir, "not a regular file");
  // A symlink to a regular file is fine.
  const std::string real = TempPath("real.safetensors"), link = TempPath("link.safetensors");
  ASSERT_TRUE(WriteSafetensors(real, {{"x", at::ones({2})}}).ok());
  ASSERT_EQ(::symlink(real.c_str(), link.c_str()), 0);
  EXPECT_TRUE(SafetensorsFile::Open(link).ok());
}

TEST(SafetensorsTest, ReadRegularFileIsBounded) {
  const std::string small = TempPath("small.json");
  std::ofstream(small) << "0123456789";
  EXPECT_EQ(*ReadRegularFile(small, 10), "0123456789");
  auto big = ReadRegularFile(small, 9);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("limit"), std::string::npos) << big.status();
  const std::string fifo = TempPath("fifo.json");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(ReadRegularFile(fifo, 1 << 20).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadRegularFile("/dev/zero", 1 << 20).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadRegularFile(TempPath("absent.json"), 10).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  auto file = SafetensorsFile::Open(TempPath("absent.safetensors"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace retnet::model
