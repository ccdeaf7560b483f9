#include "launcher/data.h"

#include <glob.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/random.h"

namespace moe {
namespace {

// Token files are little-endian; we decode them with memcpy.
static_assert(std::endian::native == std::endian::little, "token files are read as little-endian");

constexpr int32_t kLlmcMagic = 20240520;
constexpr int32_t kLlmcVersion = 1;  // version 1 holds uint16 tokens
constexpr size_t kLlmcHeaderInts = 256;
constexpr size_t kLlmcHeaderBytes = kLlmcHeaderInts * sizeof(int32_t);

constexpr int kBytesVocab = 256;
constexpr int kGpt2Vocab = 50257;
constexpr int kUint16Vocab = 65536;

std::string format_number(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

// The whole file as bytes; RuntimeError naming the file if it is missing or unreadable.
std::vector<unsigned char> read_file_bytes(const std::string& path) {
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (!std::filesystem::exists(status)) throw RuntimeError(path + ": no such file");
  if (!std::filesystem::is_regular_file(status)) throw RuntimeError(path + ": not a regular file");
  const auto size = std::filesystem::file_size(path, error);
  if (error) throw RuntimeError(path + ": cannot read size: " + error.message());

  std::vector<unsigned char> bytes(size);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RuntimeError(path + ": cannot open for reading");
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (static_cast<size_t>(in.gcount()) != size)
    throw RuntimeError(path + ": read " + std::to_string(in.gcount()) + " of " +
                       std::to_string(size) + " bytes");
  return bytes;
}

// The files a path or glob pattern names, in byte-wise name order.
std::vector<std::string> expand_data_path(const std::string& path_or_glob) {
  if (path_or_glob.find_first_of("*?[") == std::string::npos) return {path_or_glob};

  glob_t matches{};
  const int status = glob(path_or_glob.c_str(), 0, nullptr, &matches);
  std::vector<std::string> files;
  if (status == 0) files.assign(matches.gl_pathv, matches.gl_pathv + matches.gl_pathc);
  globfree(&matches);
  if (status == GLOB_NOMATCH || (status == 0 && files.empty()))
    throw RuntimeError(path_or_glob + ": no file matches this pattern");
  if (status != 0) throw RuntimeError(path_or_glob + ": cannot expand this pattern");
  // glob() sorts by the locale's collation; name order means plain byte order.
  std::sort(files.begin(), files.end());
  return files;
}

int32_t read_int32(const unsigned char* at) {
  int32_t value;
  std::memcpy(&value, at, sizeof value);
  return value;
}

bool starts_with_llmc_magic(const std::vector<unsigned char>& bytes) {
  return bytes.size() >= sizeof(int32_t) && read_int32(bytes.data()) == kLlmcMagic;
}

// Appends `count` little-endian uint16 tokens starting at `at`.
void append_uint16_tokens(std::vector<int32_t>& tokens, const unsigned char* at, size_t count) {
  const size_t first = tokens.size();
  tokens.resize(first + count);
  for (size_t i = 0; i < count; ++i) {
    uint16_t token;
    std::memcpy(&token, at + 2 * i, sizeof token);
    tokens[first + i] = token;
  }
}

void append_llmc_shard(std::vector<int32_t>& tokens, const std::vector<unsigned char>& bytes,
                       const std::string& file) {
  if (!starts_with_llmc_magic(bytes)) {
    const std::string found = bytes.size() >= sizeof(int32_t)
                                  ? "magic " + std::to_string(read_int32(bytes.data()))
                                  : std::to_string(bytes.size()) + " bytes";
    throw RuntimeError(file + ": not an llm.c token shard (" + found + ", expected magic " +
                       std::to_string(kLlmcMagic) + ")");
  }
  if (bytes.size() < kLlmcHeaderBytes)
    throw RuntimeError(file + ": llm.c shard is " + std::to_string(bytes.size()) +
                       " bytes, shorter than its " + std::to_string(kLlmcHeaderBytes) +
                       "-byte header");
  const int32_t version = read_int32(bytes.data() + 4);
  if (version != kLlmcVersion)
    throw RuntimeError(file + ": llm.c shard version " + std::to_string(version) +
                       " is not supported (expected 1: uint16 tokens)");
  const int32_t count = read_int32(bytes.data() + 8);
  if (count < 0)
    throw RuntimeError(file + ": llm.c shard header has a negative token count " +
                       std::to_string(count));
  // Like llm.c, demand the exact size: a short file is truncated, a long one is not a shard.
  const size_t expected = kLlmcHeaderBytes + 2 * static_cast<size_t>(count);
  if (bytes.size() != expected)
    throw RuntimeError(file + ": llm.c shard header says " + std::to_string(count) +
                       " tokens, so the file should be " + std::to_string(expected) +
                       " bytes, but it is " + std::to_string(bytes.size()) + " bytes");
  append_uint16_tokens(tokens, bytes.data() + kLlmcHeaderBytes, static_cast<size_t>(count));
}

void append_uint16_file(std::vector<int32_t>& tokens, const std::vector<unsigned char>& bytes,
                        const std::string& file) {
  if (bytes.size() % 2 != 0)
    throw RuntimeError(file + ": a uint16 token file needs an even number of bytes, it has " +
                       std::to_string(bytes.size()));
  append_uint16_tokens(tokens, bytes.data(), bytes.size() / 2);
}

void append_bytes(std::vector<int32_t>& tokens, const std::vector<unsigned char>& bytes) {
  tokens.insert(tokens.end(), bytes.begin(), bytes.end());
}

}  // namespace

DataFormat parse_data_format(std::string_view name) {
  if (name == "auto") return DataFormat::kAuto;
  if (name == "bytes") return DataFormat::kBytes;
  if (name == "llmc") return DataFormat::kLlmc;
  if (name == "uint16") return DataFormat::kUint16;
  throw UsageError("--data-format must be auto, bytes, llmc or uint16 (got '" + std::string(name) +
                   "')");
}

std::string_view data_format_name(DataFormat format) {
  switch (format) {
    case DataFormat::kAuto: return "auto";
    case DataFormat::kBytes: return "bytes";
    case DataFormat::kLlmc: return "llmc";
    case DataFormat::kUint16: return "uint16";
  }
  return "?";
}

DataOrder parse_data_order(std::string_view name) {
  if (name == "sequential") return DataOrder::kSequential;
  if (name == "shuffle") return DataOrder::kShuffle;
  throw UsageError("--data-order must be sequential or shuffle (got '" + std::string(name) + "')");
}

std::string_view data_order_name(DataOrder order) {
  return order == DataOrder::kSequential ? "sequential" : "shuffle";
}

TokenStream load_tokens(const std::string& path_or_glob, DataFormat format) {
  TokenStream stream;
  stream.source = path_or_glob;
  stream.files = expand_data_path(path_or_glob);
  for (const std::string& file : stream.files) {
    const std::vector<unsigned char> bytes = read_file_bytes(file);
    // The first file decides `auto`; the later files must then be of the same kind.
    if (format == DataFormat::kAuto)
      format = starts_with_llmc_magic(bytes) ? DataFormat::kLlmc : DataFormat::kBytes;
    switch (format) {
      case DataFormat::kLlmc: append_llmc_shard(stream.tokens, bytes, file); break;
      case DataFormat::kUint16: append_uint16_file(stream.tokens, bytes, file); break;
      case DataFormat::kBytes:
      case DataFormat::kAuto: append_bytes(stream.tokens, bytes); break;
    }
  }
  if (stream.tokens.empty()) throw RuntimeError(path_or_glob + ": the data holds no tokens");

  stream.format = format;
  stream.vocab_size = format == DataFormat::kLlmc     ? kGpt2Vocab
                      : format == DataFormat::kUint16 ? kUint16Vocab
                                                      : kBytesVocab;
  stream.max_token = *std::max_element(stream.tokens.begin(), stream.tokens.end());
  return stream;
}

void BatchLayout::validate() const {
  if (global_batch_size < 1 || micro_batch_size < 1)
    throw UsageError("--global-batch-size and --micro-batch-size must be positive (got " +
                     std::to_string(global_batch_size) + " and " +
                     std::to_string(micro_batch_size) + ")");
  if (dp_size < 1 || dp_rank < 0 || dp_rank >= dp_size)
    throw UsageError("data-parallel rank " + std::to_string(dp_rank) + " is not in [0, " +
                     std::to_string(dp_size) + ")");
  if (global_batch_size % (micro_batch_size * dp_size) != 0)
    throw UsageError("--global-batch-size " + std::to_string(global_batch_size) +
                     " is not a multiple of --micro-batch-size x data-parallel size = " +
                     std::to_string(micro_batch_size) + " x " + std::to_string(dp_size));
}

DataLoader::DataLoader(TokenStream stream, const DataLoaderOptions& options)
    : stream_(std::move(stream)),
      seq_length_(options.seq_length),
      order_(options.order),
      seed_(options.seed) {
  const double fraction = options.valid_fraction;
  if (seq_length_ < 1)
    throw UsageError("--seq-length must be positive (got " + std::to_string(seq_length_) + ")");
  if (!(fraction >= 0.0 && fraction <= 1.0))  // also rejects NaN
    throw UsageError("--valid-fraction must be in [0, 1] (got " + format_number(fraction) + ")");

  const int64_t num_tokens = static_cast<int64_t>(stream_.tokens.size());
  num_windows_ = num_tokens >= 1 ? (num_tokens - 1) / seq_length_ : 0;
  const auto num_held_out = [fraction](int64_t n) {
    return static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n)));
  };

  if (fraction == 1.0) {  // evaluation only: every window is a validation window
    num_train_windows_ = 0;
    if (num_windows_ < 1)
      throw RuntimeError(stream_.source + ": " + std::to_string(num_tokens) +
                         " tokens make no window of --seq-length " + std::to_string(seq_length_) +
                         "; need at least " + std::to_string(seq_length_ + 1) + " tokens");
    return;
  }

  num_train_windows_ = num_windows_ - num_held_out(num_windows_);
  if (num_train_windows_ >= 1) return;  // and ceil(f*n) >= 1 whenever f > 0 and n >= 1

  // The fewest windows leaving one to train on: n - ceil(f*n) >= 1 once n >= 1/(1-f); step
  // from that estimate to the exact answer under the same floating-point ceil.
  const auto enough = [&](int64_t n) { return n - num_held_out(n) >= 1; };
  int64_t min_windows =
      std::max<int64_t>(1, static_cast<int64_t>(std::ceil(1.0 / (1.0 - fraction))));
  while (min_windows > 1 && enough(min_windows - 1)) --min_windows;
  while (!enough(min_windows)) ++min_windows;
  const int64_t min_tokens = min_windows * seq_length_ + 1;
  throw RuntimeError(stream_.source + ": " + std::to_string(num_tokens) + " tokens give " +
                     std::to_string(num_windows_) + " windows of --seq-length " +
                     std::to_string(seq_length_) + ", none left to train on with " +
                     "--valid-fraction " + format_number(fraction) + "; need at least " +
                     std::to_string(min_tokens) + " tokens");
}

DataLoader DataLoader::for_evaluation(TokenStream stream, int seq_length) {
  return DataLoader(std::move(stream), DataLoaderOptions{.seq_length = seq_length,
                                                         .valid_fraction = 1.0,
                                                         .order = DataOrder::kSequential,
                                                         .seed = 0});
}

void DataLoader::require_training_windows() const {
  MOE_CHECK(num_train_windows_ >= 1, "this data loader holds evaluation windows only");
}

std::vector<int64_t> DataLoader::shuffle_permutation(uint64_t seed, int64_t epoch, int64_t n) {
  static constexpr uint64_t kShuffleTag = hash_string("moe.data.shuffle");
  std::vector<int64_t> permutation(static_cast<size_t>(n));  // (n)
  std::iota(permutation.begin(), permutation.end(), int64_t{0});
  // Fisher-Yates, from the back: the draw for slot i is named by (seed, epoch, i) alone.
  for (int64_t i = n - 1; i >= 1; --i) {
    const uint64_t key =
        random_key({seed, kShuffleTag, static_cast<uint64_t>(epoch), static_cast<uint64_t>(i)});
    const auto j = static_cast<int64_t>(uniform_below(key, static_cast<uint64_t>(i) + 1));
    std::swap(permutation[i], permutation[j]);
  }
  return permutation;
}

int64_t DataLoader::train_window_at(int64_t position) {
  const int64_t slot = position % num_train_windows_;
  if (order_ == DataOrder::kSequential) return slot;
  const int64_t epoch = position / num_train_windows_;
  if (epoch != cached_epoch_) {
    epoch_permutation_ = shuffle_permutation(seed_, epoch, num_train_windows_);
    cached_epoch_ = epoch;
  }
  return epoch_permutation_[slot];
}

std::vector<int64_t> DataLoader::iteration_windows(int64_t iteration, int global_batch_size) {
  require_training_windows();
  MOE_CHECK(iteration >= 1, "iterations count from 1");
  if (global_batch_size < 1)
    throw UsageError("--global-batch-size must be positive (got " +
                     std::to_string(global_batch_size) + ")");
  const int64_t first_position = (iteration - 1) * global_batch_size;
  std::vector<int64_t> windows(global_batch_size);  // (G)
  for (int i = 0; i < global_batch_size; ++i) windows[i] = train_window_at(first_position + i);
  return windows;
}

std::vector<int64_t> DataLoader::micro_batch_windows(int64_t iteration, const BatchLayout& layout,
                                                     int micro_step) {
  require_training_windows();
  layout.validate();
  MOE_CHECK(iteration >= 1, "iterations count from 1");
  MOE_CHECK(micro_step >= 0 && micro_step < layout.num_micro_steps(),
            "micro-step " + std::to_string(micro_step) + " out of range");
  const int64_t first_position = (iteration - 1) * layout.global_batch_size +
                                 int64_t{layout.dp_rank} * layout.windows_per_rank() +
                                 int64_t{micro_step} * layout.micro_batch_size;
  std::vector<int64_t> windows(layout.micro_batch_size);  // (micro_batch_size)
  for (int i = 0; i < layout.micro_batch_size; ++i)
    windows[i] = train_window_at(first_position + i);
  return windows;
}

void DataLoader::fill_window(int32_t* inputs, int32_t* targets, int64_t window) const {
  MOE_CHECK(window >= 0 && window < num_windows_,
            "window " + std::to_string(window) + " out of range");
  const int32_t* first = stream_.tokens.data() + window * seq_length_;
  std::copy(first, first + seq_length_, inputs);
  std::copy(first + 1, first + 1 + seq_length_, targets);
}

void DataLoader::fill_train_batch(int32_t* inputs, int32_t* targets, int64_t iteration,
                                  const BatchLayout& layout, int micro_step) {
  const std::vector<int64_t> windows = micro_batch_windows(iteration, layout, micro_step);
  for (size_t row = 0; row < windows.size(); ++row)
    fill_window(inputs + row * seq_length_, targets + row * seq_length_, windows[row]);
}

int64_t DataLoader::num_valid_batches(int micro_batch_size) const {
  MOE_CHECK(micro_batch_size >= 1, "micro-batch size must be positive");
  return (num_valid_windows() + micro_batch_size - 1) / micro_batch_size;
}

int DataLoader::fill_valid_batch(int32_t* inputs, int32_t* targets, int64_t batch,
                                 int micro_batch_size) const {
  MOE_CHECK(batch >= 0 && batch < num_valid_batches(micro_batch_size),
            "validation batch " + std::to_string(batch) + " out of range");
  const int64_t first = batch * micro_batch_size;  // index among the validation windows
  const int num_rows =
      static_cast<int>(std::min<int64_t>(micro_batch_size, num_valid_windows() - first));
  for (int row = 0; row < num_rows; ++row)
    fill_window(inputs + int64_t{row} * seq_length_, targets + int64_t{row} * seq_length_,
                num_train_windows_ + first + row);
  const int64_t padding = int64_t{micro_batch_size - num_rows} * seq_length_;
  std::fill_n(inputs + int64_t{num_rows} * seq_length_, padding, 0);
  std::fill_n(targets + int64_t{num_rows} * seq_length_, padding, 0);
  return num_rows;
}

}  // namespace moe
