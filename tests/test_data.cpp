// Token loading (bytes, llm.c shards, uint16), the window and hold-out arithmetic, the
// sequential and shuffled orders, data-parallel slicing and validation batches (DESIGN.md,
// Data), and the counter-based generator the shuffle draws from.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/random.h"
#include "launcher/data.h"
#include "tests/expect_error.h"

namespace moe {
namespace {

using moe::testing::error_message;

// Messages reach the user as one line on stderr.
void expect_one_line_naming(const std::string& message, const std::string& name) {
  EXPECT_NE(message.find(name), std::string::npos)
      << "message does not name " << name << ": " << message;
  EXPECT_EQ(message.find('\n'), std::string::npos) << "message spans lines: " << message;
}

// A fresh directory per test, removed afterwards (tests may run in parallel).
class DataFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "moe_test_data_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::string write_bytes(const std::string& name, const std::vector<unsigned char>& bytes) {
    std::ofstream out(path(name), std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return path(name);
  }

  // An llm.c shard; the header fields and the number of tokens written can be falsified.
  std::string write_llmc(const std::string& name, const std::vector<uint16_t>& tokens,
                         int32_t magic = 20240520, int32_t version = 1, int32_t count = -1) {
    std::vector<int32_t> header(256, 0);  // (256)
    header[0] = magic;
    header[1] = version;
    header[2] = count >= 0 ? count : static_cast<int32_t>(tokens.size());
    std::vector<unsigned char> bytes(header.size() * 4 + tokens.size() * 2);
    std::memcpy(bytes.data(), header.data(), header.size() * 4);
    if (!tokens.empty())  // data() of an empty vector may be null: not for memcpy
      std::memcpy(bytes.data() + header.size() * 4, tokens.data(), tokens.size() * 2);
    return write_bytes(name, bytes);
  }

  std::string dir_;
};

// A stream of tokens 0, 1, ..., N-1: every window's first input is w*T.
TokenStream counting_stream(int num_tokens) {
  TokenStream stream;
  stream.source = "counting";
  stream.tokens.resize(num_tokens);
  std::iota(stream.tokens.begin(), stream.tokens.end(), 0);
  stream.vocab_size = num_tokens;
  stream.max_token = num_tokens - 1;
  return stream;
}

DataLoader make_loader(int num_tokens, int seq_length, double valid_fraction,
                       DataOrder order = DataOrder::kSequential, uint64_t seed = 1234) {
  return DataLoader(
      counting_stream(num_tokens),
      {.seq_length = seq_length, .valid_fraction = valid_fraction, .order = order, .seed = seed});
}

std::vector<int64_t> iota_windows(int64_t first, int64_t count) {
  std::vector<int64_t> windows(count);
  std::iota(windows.begin(), windows.end(), first);
  return windows;
}

// ---- names ----------------------------------------------------------------------------------

TEST(DataNames, ParseFormatsAndOrders) {
  EXPECT_EQ(parse_data_format("auto"), DataFormat::kAuto);
  EXPECT_EQ(parse_data_format("bytes"), DataFormat::kBytes);
  EXPECT_EQ(parse_data_format("llmc"), DataFormat::kLlmc);
  EXPECT_EQ(parse_data_format("uint16"), DataFormat::kUint16);
  EXPECT_EQ(parse_data_order("sequential"), DataOrder::kSequential);
  EXPECT_EQ(parse_data_order("shuffle"), DataOrder::kShuffle);
  for (DataFormat format :
       {DataFormat::kAuto, DataFormat::kBytes, DataFormat::kLlmc, DataFormat::kUint16})
    EXPECT_EQ(parse_data_format(data_format_name(format)), format);
  expect_one_line_naming(error_message<UsageError>([] { parse_data_format("int32"); }), "int32");
  expect_one_line_naming(error_message<UsageError>([] { parse_data_order("random"); }), "random");
}

// ---- loading --------------------------------------------------------------------------------

TEST_F(DataFiles, LoadsAnyFileAsBytes) {
  const std::string file = write_bytes("text.txt", {'h', 'e', 'l', 'l', 'o', 0xff});
  for (DataFormat format : {DataFormat::kBytes, DataFormat::kAuto}) {
    const TokenStream stream = load_tokens(file, format);
    EXPECT_EQ(stream.tokens, (std::vector<int32_t>{'h', 'e', 'l', 'l', 'o', 255}));
    EXPECT_EQ(stream.format, DataFormat::kBytes);
    EXPECT_EQ(stream.vocab_size, 256);
    EXPECT_EQ(stream.max_token, 255);
    EXPECT_EQ(stream.files, std::vector<std::string>{file});
  }
}

TEST_F(DataFiles, LoadsAnLlmcShard) {
  const std::vector<uint16_t> tokens = {50256, 0, 1, 40000, 65535};
  const std::string file = write_llmc("shard.bin", tokens);
  for (DataFormat format : {DataFormat::kLlmc, DataFormat::kAuto}) {
    const TokenStream stream = load_tokens(file, format);
    EXPECT_EQ(stream.tokens, (std::vector<int32_t>{50256, 0, 1, 40000, 65535}));
    EXPECT_EQ(stream.format, DataFormat::kLlmc);
    EXPECT_EQ(stream.vocab_size, 50257);
    EXPECT_EQ(stream.max_token, 65535);
  }
}

TEST_F(DataFiles, GlobConcatenatesShardsInNameOrder) {
  // Written out of order; only the pattern's matches count.
  write_llmc("train_001.bin", {3, 4, 5});
  write_llmc("train_000.bin", {1, 2});
  write_llmc("val_000.bin", {99});
  const TokenStream stream = load_tokens(path("train_*.bin"), DataFormat::kAuto);
  EXPECT_EQ(stream.tokens, (std::vector<int32_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(stream.files, (std::vector<std::string>{path("train_000.bin"), path("train_001.bin")}));
}

TEST_F(DataFiles, LoadsUint16Files) {
  const std::string file = write_bytes("tokens.bin", {0x34, 0x12, 0xff, 0xff, 0x07, 0x00});
  const TokenStream stream = load_tokens(file, DataFormat::kUint16);
  EXPECT_EQ(stream.tokens, (std::vector<int32_t>{0x1234, 65535, 7}));
  EXPECT_EQ(stream.format, DataFormat::kUint16);
  EXPECT_EQ(stream.max_token, 65535);
}

TEST_F(DataFiles, RejectsDamagedLlmcShards) {
  const std::string not_a_shard = write_bytes("text.txt", {'a', 'b', 'c', 'd', 'e'});
  std::string message =
      error_message<RuntimeError>([&] { load_tokens(not_a_shard, DataFormat::kLlmc); });
  expect_one_line_naming(message, not_a_shard);
  EXPECT_NE(message.find("magic"), std::string::npos) << message;

  const std::string bad_magic = write_llmc("bad_magic.bin", {1, 2}, /*magic=*/20240521);
  expect_one_line_naming(
      error_message<RuntimeError>([&] { load_tokens(bad_magic, DataFormat::kLlmc); }), bad_magic);

  const std::string bad_version = write_llmc("v2.bin", {1, 2}, 20240520, /*version=*/2);
  message = error_message<RuntimeError>([&] { load_tokens(bad_version, DataFormat::kAuto); });
  expect_one_line_naming(message, bad_version);
  EXPECT_NE(message.find("version 2"), std::string::npos) << message;

  // The header promises 100 tokens, the file holds 50: 1024 + 200 bytes expected, 1124 found.
  const std::vector<uint16_t> fifty(50, 7);
  const std::string short_file = write_llmc("short.bin", fifty, 20240520, 1, /*count=*/100);
  message = error_message<RuntimeError>([&] { load_tokens(short_file, DataFormat::kLlmc); });
  expect_one_line_naming(message, short_file);
  EXPECT_NE(message.find("1224"), std::string::npos) << message;
  EXPECT_NE(message.find("1124"), std::string::npos) << message;

  // The magic and version, then nothing: the 1024-byte header is cut short.
  std::vector<unsigned char> cut(8);
  const int32_t magic_and_version[2] = {20240520, 1};
  std::memcpy(cut.data(), magic_and_version, sizeof magic_and_version);
  const std::string cut_header = write_bytes("cut.bin", cut);
  expect_one_line_naming(
      error_message<RuntimeError>([&] { load_tokens(cut_header, DataFormat::kAuto); }), cut_header);
}

TEST_F(DataFiles, RejectsMissingAndEmptyData) {
  const std::string missing = path("missing.bin");
  for (DataFormat format :
       {DataFormat::kAuto, DataFormat::kBytes, DataFormat::kLlmc, DataFormat::kUint16})
    expect_one_line_naming(error_message<RuntimeError>([&] { load_tokens(missing, format); }),
                           missing);

  const std::string pattern = path("nothing_*.bin");
  expect_one_line_naming(
      error_message<RuntimeError>([&] { load_tokens(pattern, DataFormat::kLlmc); }), pattern);

  expect_one_line_naming(
      error_message<RuntimeError>([&] { load_tokens(dir_, DataFormat::kBytes); }), dir_);

  const std::string empty = write_bytes("empty.txt", {});
  expect_one_line_naming(
      error_message<RuntimeError>([&] { load_tokens(empty, DataFormat::kBytes); }), empty);
  const std::string empty_shard = write_llmc("empty_shard.bin", {});
  expect_one_line_naming(
      error_message<RuntimeError>([&] { load_tokens(empty_shard, DataFormat::kLlmc); }),
      empty_shard);
}

TEST_F(DataFiles, RejectsOddSizedUint16Files) {
  const std::string odd = write_bytes("odd.bin", {1, 0, 2});
  const std::string message =
      error_message<RuntimeError>([&] { load_tokens(odd, DataFormat::kUint16); });
  expect_one_line_naming(message, odd);
  EXPECT_NE(message.find("3"), std::string::npos) << message;
}

// ---- windows and hold-out -------------------------------------------------------------------

TEST(DataWindows, CountsWindowsAndHoldsOutTheLastOnes) {
  // N = 1001, T = 10: n = floor(1000 / 10) = 100; f = 0.1 holds out ceil(10) = 10.
  DataLoader loader = make_loader(1001, 10, 0.1);
  EXPECT_EQ(loader.num_windows(), 100);
  EXPECT_EQ(loader.num_train_windows(), 90);
  EXPECT_EQ(loader.num_valid_windows(), 10);

  // One token short of the last window's target: 99 windows, ceil(9.9) = 10 held out.
  DataLoader shorter = make_loader(1000, 10, 0.1);
  EXPECT_EQ(shorter.num_windows(), 99);
  EXPECT_EQ(shorter.num_valid_windows(), 10);

  EXPECT_EQ(make_loader(1001, 10, 0.0).num_valid_windows(), 0);
  EXPECT_EQ(make_loader(1001, 10, 0.25).num_valid_windows(), 25);
  EXPECT_EQ(make_loader(1001, 10, 0.001).num_valid_windows(), 1);  // ceil(0.1)
}

TEST(DataWindows, WindowTargetsAreInputsShiftedByOne) {
  DataLoader loader = make_loader(1001, 10, 0.1);
  std::vector<int32_t> inputs(10), targets(10);           // (T)
  loader.fill_window(inputs.data(), targets.data(), 99);  // the last window: tokens 990..1000
  for (int t = 0; t < 10; ++t) {
    EXPECT_EQ(inputs[t], 990 + t);
    EXPECT_EQ(targets[t], 991 + t);
  }
}

TEST(DataWindows, TooLittleDataSaysHowManyTokensAreNeeded) {
  // f = 0.1 needs n - ceil(n/10) >= 1, so n = 2 windows: 2*10 + 1 = 21 tokens.
  std::string message = error_message<RuntimeError>([] { make_loader(20, 10, 0.1); });
  expect_one_line_naming(message, "counting");
  EXPECT_NE(message.find("need at least 21 tokens"), std::string::npos) << message;
  EXPECT_EQ(make_loader(21, 10, 0.1).num_train_windows(), 1);

  // f = 0 needs one window: 11 tokens.
  message = error_message<RuntimeError>([] { make_loader(10, 10, 0.0); });
  EXPECT_NE(message.find("need at least 11 tokens"), std::string::npos) << message;

  // f = 0.5 needs n - ceil(n/2) >= 1: n = 2 windows (1 + 1), 21 tokens.
  message = error_message<RuntimeError>([] { make_loader(15, 10, 0.5); });
  EXPECT_NE(message.find("need at least 21 tokens"), std::string::npos) << message;
  EXPECT_EQ(make_loader(21, 10, 0.5).num_train_windows(), 1);

  // f = 0.9: n - ceil(0.9 n) >= 1 first holds at n = 10 (a floating-point 0.9*n, like Python's).
  const int64_t min_windows = [] {
    for (int64_t n = 1;; ++n)
      if (n - static_cast<int64_t>(std::ceil(0.9 * static_cast<double>(n))) >= 1) return n;
  }();
  message = error_message<RuntimeError>([] { make_loader(50, 10, 0.9); });
  EXPECT_NE(message.find("need at least " + std::to_string(min_windows * 10 + 1) + " tokens"),
            std::string::npos)
      << message;
  EXPECT_EQ(make_loader(static_cast<int>(min_windows * 10 + 1), 10, 0.9).num_train_windows(), 1);
}

TEST(DataWindows, RejectsBadSettings) {
  error_message<UsageError>([] { make_loader(100, 0, 0.1); });
  error_message<UsageError>([] { make_loader(100, 10, -0.1); });
  error_message<UsageError>([] { make_loader(100, 10, 1.5); });
  error_message<UsageError>([] { make_loader(100, 10, std::nan("")); });
}

// ---- training order -------------------------------------------------------------------------

TEST(DataOrderSequential, WrapsAroundTheTrainingWindows) {
  DataLoader loader = make_loader(41, 4, 0.0);  // n_train = 10
  ASSERT_EQ(loader.num_train_windows(), 10);
  EXPECT_EQ(loader.iteration_windows(1, 4), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(loader.iteration_windows(2, 4), (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(loader.iteration_windows(3, 4), (std::vector<int64_t>{8, 9, 0, 1}));
  EXPECT_EQ(loader.iteration_windows(6, 4), (std::vector<int64_t>{0, 1, 2, 3}));

  // Held-out windows are never trained on: with f = 0.2 the order wraps after window 7.
  DataLoader held_out = make_loader(41, 4, 0.2);
  EXPECT_EQ(held_out.iteration_windows(2, 4), (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(held_out.iteration_windows(3, 4), (std::vector<int64_t>{0, 1, 2, 3}));
}

TEST(DataOrderShuffle, EveryEpochIsAPermutation) {
  const int n_train = 10, global_batch = 3;  // epochs straddle iterations
  DataLoader loader = make_loader(n_train * 4 + 1, 4, 0.0, DataOrder::kShuffle, 7);
  std::vector<int64_t> positions;  // every training position of iterations 1..20
  for (int k = 1; k <= 20; ++k)
    for (int64_t w : loader.iteration_windows(k, global_batch)) positions.push_back(w);

  std::vector<std::vector<int64_t>> epochs;
  for (size_t first = 0; first + n_train <= positions.size(); first += n_train) {
    std::vector<int64_t> epoch(positions.begin() + first, positions.begin() + first + n_train);
    EXPECT_EQ(epoch, DataLoader::shuffle_permutation(7, epochs.size(), n_train));
    std::vector<int64_t> sorted = epoch;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, iota_windows(0, n_train)) << "epoch " << epochs.size();
    epochs.push_back(epoch);
  }
  EXPECT_NE(epochs[0], iota_windows(0, n_train)) << "the shuffle left epoch 0 in order";
  EXPECT_NE(epochs[0], epochs[1]) << "two epochs drew the same order";
}

TEST(DataOrderShuffle, IsAPureFunctionOfTheSeed) {
  const int num_tokens = 100 * 8 + 1;
  DataLoader first = make_loader(num_tokens, 8, 0.1, DataOrder::kShuffle, 42);
  DataLoader again = make_loader(num_tokens, 8, 0.1, DataOrder::kShuffle, 42);
  DataLoader other_seed = make_loader(num_tokens, 8, 0.1, DataOrder::kShuffle, 43);
  DataLoader sequential = make_loader(num_tokens, 8, 0.1, DataOrder::kSequential, 42);

  // `again` jumps straight to iteration 9 (epoch 1): no state carries over between calls.
  const std::vector<int64_t> late = again.iteration_windows(9, 16);
  for (int k = 1; k <= 9; ++k) {
    const std::vector<int64_t> windows = first.iteration_windows(k, 16);
    EXPECT_NE(windows, other_seed.iteration_windows(k, 16)) << "iteration " << k;
    EXPECT_NE(windows, sequential.iteration_windows(k, 16)) << "iteration " << k;
    if (k == 9) {
      EXPECT_EQ(windows, late);
    }
  }
  EXPECT_EQ(first.iteration_windows(1, 16), again.iteration_windows(1, 16));
  for (int64_t w : first.iteration_windows(3, 16)) EXPECT_LT(w, first.num_train_windows());
}

// ---- data-parallel slicing ------------------------------------------------------------------

TEST(DataParallel, RanksAndMicroStepsTileTheIterationInOrder) {
  const int seq_length = 5, global_batch = 8;
  for (DataOrder order : {DataOrder::kSequential, DataOrder::kShuffle}) {
    DataLoader loader = make_loader(37 * seq_length + 1, seq_length, 0.1, order, 3);
    for (int dp_size : {1, 2, 4}) {
      for (int micro_batch : {1, 2}) {
        for (int64_t k : {1, 2, 5, 9}) {
          std::vector<int64_t> tiled;  // rank 0's micro-steps, then rank 1's, ...
          for (int rank = 0; rank < dp_size; ++rank) {
            const BatchLayout layout{global_batch, micro_batch, dp_size, rank};
            ASSERT_EQ(layout.num_micro_steps() * micro_batch * dp_size, global_batch);
            for (int m = 0; m < layout.num_micro_steps(); ++m) {
              const std::vector<int64_t> windows = loader.micro_batch_windows(k, layout, m);
              tiled.insert(tiled.end(), windows.begin(), windows.end());

              // The batch holds exactly those windows' tokens.
              std::vector<int32_t> inputs(micro_batch * seq_length);   // (mb, T)
              std::vector<int32_t> targets(micro_batch * seq_length);  // (mb, T)
              loader.fill_train_batch(inputs.data(), targets.data(), k, layout, m);
              for (int row = 0; row < micro_batch; ++row) {
                EXPECT_EQ(inputs[row * seq_length], windows[row] * seq_length);
                EXPECT_EQ(targets[row * seq_length + seq_length - 1],
                          windows[row] * seq_length + seq_length);
              }
            }
          }
          EXPECT_EQ(tiled, loader.iteration_windows(k, global_batch))
              << "dp " << dp_size << " micro " << micro_batch << " iteration " << k;
        }
      }
    }
  }
}

TEST(DataParallel, RejectsLayoutsThatDoNotDivideTheBatch) {
  error_message<UsageError>([] { BatchLayout{6, 1, 4, 0}.validate(); });
  error_message<UsageError>([] { BatchLayout{8, 3, 1, 0}.validate(); });
  error_message<UsageError>([] { BatchLayout{8, 1, 2, 2}.validate(); });
  error_message<UsageError>([] { BatchLayout{0, 1, 1, 0}.validate(); });
  BatchLayout{8, 2, 4, 3}.validate();
}

// ---- validation batches ---------------------------------------------------------------------

TEST(DataValidation, BatchesWalkTheHeldOutWindowsInOrder) {
  DataLoader loader = make_loader(1001, 10, 0.1);  // validation windows 90..99
  const int micro_batch = 4;
  ASSERT_EQ(loader.num_valid_batches(micro_batch), 3);
  std::vector<int32_t> inputs(micro_batch * 10), targets(micro_batch * 10);  // (mb, T)
  std::vector<int64_t> seen;
  for (int64_t v = 0; v < 3; ++v) {
    const int rows = loader.fill_valid_batch(inputs.data(), targets.data(), v, micro_batch);
    EXPECT_EQ(rows, v < 2 ? 4 : 2);
    for (int row = 0; row < rows; ++row) {
      seen.push_back(inputs[row * 10] / 10);
      EXPECT_EQ(targets[row * 10], inputs[row * 10] + 1);
    }
    for (int i = rows * 10; i < micro_batch * 10; ++i) EXPECT_EQ(inputs[i] | targets[i], 0);
  }
  EXPECT_EQ(seen, iota_windows(90, 10));
}

TEST(DataValidation, EvaluationLoaderHoldsOutEveryWindow) {
  for (DataLoader loader :
       {DataLoader::for_evaluation(counting_stream(1001), 10), make_loader(1001, 10, 1.0)}) {
    EXPECT_EQ(loader.num_train_windows(), 0);
    EXPECT_EQ(loader.num_valid_windows(), 100);
    ASSERT_EQ(loader.num_valid_batches(7), 15);
    std::vector<int32_t> inputs(7 * 10), targets(7 * 10);  // (mb, T)
    EXPECT_EQ(loader.fill_valid_batch(inputs.data(), targets.data(), 0, 7), 7);
    EXPECT_EQ(inputs[0], 0);
    EXPECT_EQ(loader.fill_valid_batch(inputs.data(), targets.data(), 14, 7), 2);
    EXPECT_EQ(inputs[10], 990);
    EXPECT_THROW(loader.iteration_windows(1, 1), RuntimeError);
  }
  const std::string message =
      error_message<RuntimeError>([] { DataLoader::for_evaluation(counting_stream(10), 10); });
  EXPECT_NE(message.find("need at least 11 tokens"), std::string::npos) << message;
}

// ---- the counter-based generator ------------------------------------------------------------

TEST(Random, DrawsArePureFunctionsOfTheirKey) {
  const uint64_t key = random_key({1234, hash_string("wte.weight"), 17});
  EXPECT_EQ(key, random_key({1234, hash_string("wte.weight"), 17}));
  EXPECT_NE(key, random_key({1234, hash_string("wpe.weight"), 17}));
  EXPECT_NE(random_key({1}), random_key({1, 0}));
  EXPECT_NE(random_key({1, 2}), random_key({2, 1}));
  EXPECT_EQ(hash_string(""), 0xcbf29ce484222325ull);   // FNV-1a offset basis
  EXPECT_EQ(hash_string("a"), 0xaf63dc4c8601ec8cull);  // the published FNV-1a 64 of "a"
  EXPECT_EQ(standard_normal(key), standard_normal(key));
}

TEST(Random, DistributionsHaveTheRightMoments) {
  const int num_draws = 200000;
  double uniform_sum = 0, normal_sum = 0, normal_squares = 0, truncated_squares = 0;
  double uniform_min = 1, uniform_max = 0, truncated_max = 0;
  std::vector<int> below_counts(5, 0);  // (5)
  for (int i = 0; i < num_draws; ++i) {
    const uint64_t key = random_key({99, static_cast<uint64_t>(i)});
    const double u = uniform_double(key);
    uniform_sum += u;
    uniform_min = std::min(uniform_min, u);
    uniform_max = std::max(uniform_max, u);
    const double x = standard_normal(key);
    normal_sum += x;
    normal_squares += x * x;
    const double t = truncated_normal(key, 2.0f);
    truncated_squares += t * t;
    truncated_max = std::max(truncated_max, std::fabs(t));
    ++below_counts[uniform_below(key, 5)];
  }
  EXPECT_GE(uniform_min, 0.0);
  EXPECT_LT(uniform_max, 1.0);
  EXPECT_NEAR(uniform_sum / num_draws, 0.5, 0.005);
  EXPECT_NEAR(normal_sum / num_draws, 0.0, 0.01);
  EXPECT_NEAR(normal_squares / num_draws, 1.0, 0.015);
  // N(0,1) cut at +-2 has variance 1 - 2*2*phi(2)/(2*Phi(2)-1) = 0.7737.
  EXPECT_NEAR(truncated_squares / num_draws, 0.7737, 0.01);
  EXPECT_LE(truncated_max, 2.0);
  for (int count : below_counts) EXPECT_NEAR(count, num_draws / 5, num_draws / 100);
}

TEST(Random, ShuffleDrawsEveryPermutationAlike) {
  // 6000 epochs of 3 windows: each of the 6 orders about 1000 times.
  std::map<std::vector<int64_t>, int> counts;
  for (int64_t epoch = 0; epoch < 6000; ++epoch)
    ++counts[DataLoader::shuffle_permutation(5, epoch, 3)];
  ASSERT_EQ(counts.size(), 6u);
  for (const auto& [order, count] : counts) EXPECT_NEAR(count, 1000, 120);
}

}  // namespace
}  // namespace moe
