// Training data: token files in, batches of (inputs, targets) windows out (DESIGN.md, Data).
//
// load_tokens reads a byte file, llm.c shards or a nanoGPT uint16 file into one token stream.
// DataLoader cuts the stream into windows of T+1 tokens, holds the last ones out for
// evaluation, and hands every data-parallel rank its micro-batches. Which windows an iteration
// reads is a pure function of (seed, iteration, global batch): the same for every layout,
// with no state to save in a checkpoint.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

enum class DataFormat {
  kAuto,    // llmc when the first file starts with the llm.c magic, else bytes
  kBytes,   // every byte a token (vocab 256)
  kLlmc,    // llm.c shards: 256 int32 header (20240520, 1, count), then count uint16 tokens
  kUint16,  // nanoGPT .bin: raw little-endian uint16 tokens, no header
};

// "auto", "bytes", "llmc", "uint16"; anything else is a UsageError.
DataFormat parse_data_format(std::string_view name);
std::string_view data_format_name(DataFormat format);

enum class DataOrder { kSequential, kShuffle };

// "sequential", "shuffle"; anything else is a UsageError.
DataOrder parse_data_order(std::string_view name);
std::string_view data_order_name(DataOrder order);

// Every token of every matched file, concatenated in file-name order.
struct TokenStream {
  std::string source;                      // the path or glob pattern as given, for messages
  std::vector<std::string> files;          // the files read, in order
  DataFormat format = DataFormat::kBytes;  // as resolved: never kAuto
  std::vector<int32_t> tokens;             // (N) token ids
  // The vocabulary the format implies: 256 (bytes), 50257 (llmc, GPT-2), 65536 (uint16).
  int vocab_size = 0;
  // The largest id in `tokens`: the model needs --vocab-size > max_token.
  int max_token = -1;
};

// Reads `path_or_glob`: a path, or a pattern with * ? [ ] expanded by glob() and read in
// name order. A missing file, a pattern matching nothing, a damaged file (bad llm.c magic or
// version, a size that disagrees with the header, an odd-sized uint16 file) or no tokens at
// all is a RuntimeError naming the file.
TokenStream load_tokens(const std::string& path_or_glob, DataFormat format);

// How one iteration's global batch is laid out over data-parallel ranks and micro-steps.
struct BatchLayout {
  int global_batch_size = 1;  // G: windows per iteration, all ranks together
  int micro_batch_size = 1;   // windows per micro-step on one rank
  int dp_size = 1;            // data-parallel ranks
  int dp_rank = 0;            // this rank, in [0, dp_size)

  int windows_per_rank() const { return global_batch_size / dp_size; }
  int num_micro_steps() const { return global_batch_size / (dp_size * micro_batch_size); }
  // UsageError unless sizes are positive, the rank is in range and micro x dp divides G.
  void validate() const;
};

struct DataLoaderOptions {
  int seq_length = 1024;  // T
  // Fraction of windows held out (the last ceil(f*n)); 0 holds out none. 1 holds out every
  // window: an evaluation-only loader (see DataLoader::for_evaluation).
  double valid_fraction = 0.1;
  DataOrder order = DataOrder::kShuffle;
  uint64_t seed = 1234;
};

// Windows of T+1 tokens: window w is tokens [w*T, w*T+T], so inputs are tokens w*T .. w*T+T-1
// and targets the same shifted by one; n = floor((N-1)/T). Windows 0 .. n_train-1 train,
// windows n_train .. n-1 (the last ceil(f*n)) are validation windows.
//
// Training position j (j = (k-1)*G + i for the i-th window of iteration k) reads training
// window j mod n_train (sequential) or perm_e[j mod n_train] with e = j / n_train (shuffle),
// where perm_e is a Fisher-Yates permutation of 0 .. n_train-1 drawn from (seed, e) alone.
//
// Not thread-safe: the training methods cache the current epoch's permutation.
class DataLoader {
 public:
  // RuntimeError (naming the source and the tokens needed) without at least one training
  // window, and one validation window when 0 < f < 1; UsageError on a bad T or f.
  DataLoader(TokenStream stream, const DataLoaderOptions& options);

  // moe-eval: every window of the file is a validation window, in order; no training windows.
  static DataLoader for_evaluation(TokenStream stream, int seq_length);

  const TokenStream& stream() const { return stream_; }
  int seq_length() const { return seq_length_; }
  int64_t num_windows() const { return num_windows_; }
  int64_t num_train_windows() const { return num_train_windows_; }
  int64_t num_valid_windows() const { return num_windows_ - num_train_windows_; }

  // The G training window ids of iteration k (1-based), in batch order.  (G)
  std::vector<int64_t> iteration_windows(int64_t iteration, int global_batch_size);

  // The window ids of one rank's micro-step m (0-based) of iteration k: rank r reads the
  // r-th contiguous slice of G/dp of the iteration's windows, micro-batch m its m-th
  // chunk of micro_batch_size.  (micro_batch_size)
  std::vector<int64_t> micro_batch_windows(int64_t iteration, const BatchLayout& layout,
                                           int micro_step);

  // Fills that micro-batch: inputs and targets are (micro_batch_size, T) row-major.
  void fill_train_batch(int32_t* inputs, int32_t* targets, int64_t iteration,
                        const BatchLayout& layout, int micro_step);

  // Validation batches: batch v holds validation windows v*mb .. v*mb+mb-1 in order; the last
  // batch may be partial.
  int64_t num_valid_batches(int micro_batch_size) const;
  // Fills validation batch v into inputs and targets (micro_batch_size, T) and returns how
  // many leading rows are real windows; the rows after them are zero and must be ignored.
  int fill_valid_batch(int32_t* inputs, int32_t* targets, int64_t batch,
                       int micro_batch_size) const;

  // Inputs and targets of one window (any id in [0, n)), each (T).
  void fill_window(int32_t* inputs, int32_t* targets, int64_t window) const;

  // The shuffle's permutation of epoch `epoch` over n training windows: a pure function.  (n)
  static std::vector<int64_t> shuffle_permutation(uint64_t seed, int64_t epoch, int64_t n);

 private:
  int64_t train_window_at(int64_t position);  // window id of training position j
  void require_training_windows() const;

  TokenStream stream_;
  int seq_length_ = 0;       // T
  int64_t num_windows_ = 0;  // n
  int64_t num_train_windows_ = 0;
  DataOrder order_ = DataOrder::kShuffle;
  uint64_t seed_ = 0;
  int64_t cached_epoch_ = -1;               // the epoch `epoch_permutation_` belongs to
  std::vector<int64_t> epoch_permutation_;  // (n_train) shuffle order of cached_epoch_
};

}  // namespace moe
