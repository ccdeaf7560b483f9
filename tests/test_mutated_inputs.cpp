// Damaged input files (issue 5): for each kind of file the trainer reads, 1,000 seeded mutated
// copies of a real file (bit flips, truncation, inserted bytes, corrupted length and number
// fields) go through the same parser the binaries use. Each copy must either parse or raise
// moe::UsageError / moe::RuntimeError with a one-line message; anything else (another
// exception, a crash, a sanitizer report in the ASan build, a hang past CTest's timeout) fails.
// Then a few damaged files go through moe-train and moe-eval themselves: exit 1 or 2, one line
// on stderr, no signal. The libFuzzer targets in tests/fuzz/ search the same parsers further.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "launcher/data.h"
#include "launcher/options.h"
#include "model/checkpoint.h"
#include "model/checkpoint_manifest.h"
#include "model/config.h"
#include "model/parameters.h"
#include "model/safetensors.h"
#include "model/weights_io.h"
#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "tests/subprocess.h"

namespace moe {
namespace {

constexpr int kCopies = 1000;

const std::string kTrain = std::string(MOE_BINARY_DIR) + "/moe-train";
const std::string kEval = std::string(MOE_BINARY_DIR) + "/moe-eval";
const std::string kCorpus = std::string(MOE_SOURCE_DIR) + "/tests/fuzz/corpus";

// A binary length or count field of a format: little-endian, `width` bytes at `offset`.
struct LengthField {
  size_t offset;
  size_t width;  // 4 or 8
};

// One damaged copy and what was done to it, for the failure message.
struct Mutant {
  std::string bytes;
  std::string how;
};

// Copy `seed` of `original`: the damage kind is seed % 4, so each kind gets a quarter of the
// copies; everything else is drawn from the seed, so a failure names a reproducible copy.
Mutant mutate(const std::string& original, const std::vector<LengthField>& length_fields,
              uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto below = [&rng](uint64_t n) { return n == 0 ? uint64_t{0} : rng() % n; };
  Mutant m{original, ""};
  std::string& b = m.bytes;

  // Digits of text numbers: JSON offsets and shapes, config values, metadata strings.
  std::vector<std::pair<size_t, size_t>> numbers;  // (start, length) of each run of digits
  for (size_t i = 0; i < b.size();) {
    if (b[i] < '0' || b[i] > '9') {
      ++i;
      continue;
    }
    size_t end = i;
    while (end < b.size() && b[end] >= '0' && b[end] <= '9') ++end;
    numbers.emplace_back(i, end - i);
    i = end;
  }

  switch (seed % 4) {
    case 0: {  // a few flipped bits anywhere
      const uint64_t flips = 1 + below(8);
      m.how = "flipped bits at";
      for (uint64_t f = 0; f < flips && !b.empty(); ++f) {
        const size_t at = below(b.size());
        b[at] = static_cast<char>(b[at] ^ (1 << below(8)));
        m.how += " " + std::to_string(at);
      }
      break;
    }
    case 1: {  // cut short, as by a full disk or an interrupted copy
      const size_t size = below(b.size());
      b.resize(size);
      m.how = "truncated to " + std::to_string(size) + " bytes";
      break;
    }
    case 2: {  // bytes inserted: random ones, or the punctuation of the formats
      static const std::string kSyntax = "0123456789{}[]\",:-+.eE =#\n\\";
      const size_t at = below(b.size() + 1);
      const uint64_t count = 1 + below(16);
      std::string inserted;
      for (uint64_t i = 0; i < count; ++i)
        inserted += below(2) ? static_cast<char>(below(256)) : kSyntax[below(kSyntax.size())];
      b.insert(at, inserted);
      m.how = "inserted " + std::to_string(count) + " bytes at " + std::to_string(at);
      break;
    }
    default: {  // a length, count or number field set to an extreme
      const bool binary = !length_fields.empty() && (numbers.empty() || below(2) == 0);
      if (binary) {
        const LengthField field = length_fields[below(length_fields.size())];
        uint64_t old_value = 0;
        std::memcpy(&old_value, b.data() + field.offset, field.width);
        const uint64_t extremes[] = {0,
                                     1,
                                     ~uint64_t{0},
                                     uint64_t{1} << 31,
                                     (uint64_t{1} << 31) - 1,
                                     uint64_t{1} << 63,
                                     b.size(),
                                     b.size() + 1,
                                     b.size() - 1,
                                     old_value + 1,
                                     old_value - 1,
                                     old_value * 2,
                                     rng()};
        const uint64_t value = extremes[below(std::size(extremes))];
        std::memcpy(b.data() + field.offset, &value, field.width);
        m.how = "field at " + std::to_string(field.offset) + " set to " + std::to_string(value);
      } else if (!numbers.empty()) {
        static const char* const kNumbers[] = {
            "0", "-1", "2147483648", "4294967296", "18446744073709551615",
            "18446744073709551616", "99999999999999999999999999", "1e308", "-0", "nan", "inf",
            "0x10", "1.5", ""};
        const auto [start, length] = numbers[below(numbers.size())];
        const std::string value = kNumbers[below(std::size(kNumbers))];
        b.replace(start, length, value);
        m.how = "number at " + std::to_string(start) + " set to '" + value + "'";
      } else {
        m.how = "unchanged (no number field)";
      }
      break;
    }
  }
  return m;
}

// A fresh directory per test (tests may run in parallel), removed afterwards.
class MutatedInputs : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "moe_test_mutated_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream out(path(name), std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    EXPECT_TRUE(out) << "cannot write " << path(name);
    return path(name);
  }

  static std::string read(const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    EXPECT_TRUE(in) << "cannot read " << file;
    std::ostringstream bytes;
    bytes << in.rdbuf();
    return bytes.str();
  }

  // What one kind of input is, and what its parser must guarantee.
  struct InputKind {
    std::string name;      // for messages; also the file name of the copies
    std::string original;  // a real file of this kind
    std::vector<LengthField> length_fields;
    std::function<void(const std::string& file)> parse;  // throws on a bad file
    bool errors_name_the_file = true;
    bool truncation_is_damage = true;  // every truncated copy must be refused
  };

  // Feeds kCopies mutated copies of kind.original to kind.parse; every failure names its seed.
  void feed_mutants(const InputKind& kind) {
    const std::string file = path(kind.name);
    write(kind.name, kind.original);
    ASSERT_NO_THROW(kind.parse(file)) << "the unmutated " << kind.name << " must parse";

    int parsed = 0, refused = 0, failures = 0;
    for (uint64_t seed = 0; seed < kCopies && failures < 10; ++seed) {
      const Mutant mutant = mutate(kind.original, kind.length_fields, seed);
      write(kind.name, mutant.bytes);
      const std::string context = kind.name + " copy " + std::to_string(seed) + " (" +
                                  mutant.how + ")";
      bool refused_this = false;
      std::string message;
      try {
        kind.parse(file);
        ++parsed;
      } catch (const UsageError& error) {
        refused_this = true;
        message = error.what();
      } catch (const RuntimeError& error) {
        refused_this = true;
        message = error.what();
      } catch (const std::exception& other) {
        ++failures;
        ADD_FAILURE() << context << ": threw something other than a UsageError or RuntimeError: "
                      << other.what();
        continue;
      }
      if (!refused_this) {
        if (kind.truncation_is_damage && seed % 4 == 1) {
          ++failures;
          ADD_FAILURE() << context << ": a truncated file was accepted";
        }
        continue;
      }
      ++refused;
      if (message.find('\n') != std::string::npos ||
          (kind.errors_name_the_file && message.find(file) == std::string::npos)) {
        ++failures;
        ADD_FAILURE() << context << ": the error must be one line naming the file: " << message;
      }
    }
    std::printf("%s: %d mutated copies, %d parsed, %d refused with one line\n", kind.name.c_str(),
                parsed + refused, parsed, refused);
    EXPECT_EQ(parsed + refused, kCopies);
    EXPECT_GT(refused, 0) << "no mutation of " << kind.name << " was refused";
  }

  std::string dir_;
};

// A tiny Switch model: 2 layers (layer 1 Switch, 2 experts), C 16, 2 heads, F 32, T 8.
ModelConfig tiny_config() {
  ModelConfig config;
  config.num_layers = 2;
  config.hidden_size = 16;
  config.num_attention_heads = 2;
  config.ffn_hidden_size = 32;
  config.num_experts = 2;
  config.moe_layer_freq = 2;
  config.moe_router_topk = 1;
  config.vocab_size = 256;
  config.max_position_embeddings = 8;
  return config;
}

// The same model as moe-train flags.
std::vector<std::string> tiny_train_flags() {
  return {"--num-layers", "2",  "--hidden-size", "16", "--num-attention-heads", "2",
          "--ffn-hidden-size", "32", "--num-experts", "2", "--moe-layer-freq", "2",
          "--seq-length", "8", "--micro-batch-size", "2", "--train-iters", "1",
          "--threads", "1"};
}

// An exported model, as moe-train --export-safetensors writes it.
std::string export_tiny_model(const std::string& file) {
  const ModelConfig config = tiny_config();
  const ParamLayout layout(config);
  std::vector<float> params(layout.total_floats());  // (total_floats)
  initialize_parameters(layout, 1234, 0.1, params.data());
  export_safetensors(file, config, layout, params.data());
  return file;
}

TEST_F(MutatedInputs, SafetensorsWeights) {
  const ParamLayout layout(tiny_config());
  std::vector<float> params(layout.total_floats());  // (total_floats)
  feed_mutants({.name = "model.safetensors",
                .original = read(export_tiny_model(path("original.safetensors"))),
                .length_fields = {{0, 8}},  // the header length
                // What moe-eval --model reads first, then what moe-train --init-from loads.
                .parse = [&](const std::string& file) {
                  read_safetensors_config(file);
                  import_safetensors(file, layout, params.data());
                }});
}

// __metadata__ that disagrees with the tensors (a hidden size of a billion, more layers than
// the file has tensors) is refused when read, before it can size a model: moe-eval once
// allocated activations for it and ran out of memory instead.
TEST_F(MutatedInputs, SafetensorsMetadataMustDescribeTheTensors) {
  const std::string model = read(export_tiny_model(path("original.safetensors")));
  uint64_t header_length = 0;
  std::memcpy(&header_length, model.data(), 8);
  const std::string header = model.substr(8, header_length), data = model.substr(8 + header_length);
  auto with_metadata = [&](const std::string& key, const std::string& value) {
    const std::string field = "\"" + key + "\":\"";
    const size_t start = header.find(field);
    EXPECT_NE(start, std::string::npos) << key;
    std::string changed = header;
    const size_t value_start = start + field.size();
    changed.replace(value_start, changed.find('"', value_start) - value_start, value);
    std::string bytes(8, '\0');
    const uint64_t length = changed.size();
    std::memcpy(bytes.data(), &length, 8);
    return write(key + ".safetensors", bytes + changed + data);
  };
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"hidden_size", "1000000000"}, {"num_layers", "1000000000"}, {"vocab_size", "1000000000"}}) {
    try {
      read_safetensors_config(with_metadata(key, value));
      ADD_FAILURE() << key << " " << value << " was accepted";
    } catch (const RuntimeError& error) {
      std::printf("%s %s: %s\n", key.c_str(), value.c_str(), error.what());
    }
  }
}

TEST_F(MutatedInputs, LlmcTokenShard) {
  const std::string shard = read(kCorpus + "/fuzz_tokens/llmc_shard_48_tokens.bin");
  for (const DataFormat format : {DataFormat::kAuto, DataFormat::kLlmc}) {
    SCOPED_TRACE(std::string(data_format_name(format)));
    feed_mutants({.name = "shard.bin",
                  .original = shard,
                  .length_fields = {{0, 4}, {4, 4}, {8, 4}},  // magic, version, token count
                  .parse = [format](const std::string& file) {
                    DataLoader::for_evaluation(load_tokens(file, format), 8);
                  },
                  // `auto` reads a shard whose magic was damaged as bytes, of any length.
                  .truncation_is_damage = format == DataFormat::kLlmc});
  }
}

TEST_F(MutatedInputs, Uint16AndByteTokenFiles) {
  feed_mutants({.name = "tokens_uint16.bin",
                .original = read(kCorpus + "/fuzz_tokens/uint16_48_tokens.bin"),
                .length_fields = {},
                .parse = [](const std::string& file) {
                  DataLoader::for_evaluation(load_tokens(file, DataFormat::kUint16), 8);
                },
                .truncation_is_damage = false});
  feed_mutants({.name = "text.txt",
                .original = read(kCorpus + "/fuzz_tokens/text_bytes.txt"),
                .length_fields = {},
                .parse = [](const std::string& file) {
                  DataLoaderOptions options;
                  options.seq_length = 8;
                  DataLoader(load_tokens(file, DataFormat::kBytes), options);
                },
                .truncation_is_damage = false});
}

// A one-rank checkpoint of the tiny model under save_dir, as moe-train --save writes it; returns
// its directory (save_dir/iter_0000003).
std::string save_tiny_checkpoint(const std::string& save_dir) {
  CheckpointInfo info;
  info.iteration = 3;
  info.optimizer_steps = 3;
  info.config = tiny_config();
  info.training = {{"seed", "1234"}, {"global_batch_size", "2"}};
  const ParamLayout layout(info.config);
  const size_t n = layout.total_floats();
  std::vector<float> params(n), exp_avg(n, 0.0f), exp_avg_sq(n, 0.0f);  // (n) each
  initialize_parameters(layout, 1234, 0.1, params.data());
  auto self = make_self_communicator();
  save_checkpoint(save_dir, info, layout, ParallelDims{},
                  {params.data(), exp_avg.data(), exp_avg_sq.data()}, *self, 0);
  return save_dir + "/" + checkpoint_name(info.iteration);
}

TEST_F(MutatedInputs, CheckpointMetadataAndManifest) {
  const std::string checkpoint = save_tiny_checkpoint(path("save"));
  feed_mutants({.name = "metadata.json",
                .original = read(checkpoint + "/metadata.json"),
                .length_fields = {},
                .parse = [](const std::string& file) { parse_checkpoint_info(read(file), file); },
                .truncation_is_damage = false});
  feed_mutants({.name = "manifest.json",
                .original = read(checkpoint + "/manifest.json"),
                .length_fields = {},
                .parse = [](const std::string& file) {
                  parse_checkpoint_manifest(read(file), file);
                },
                .truncation_is_damage = false});
}

// Findings of the fuzzers, kept as cases: each was a crash or an unbounded allocation.
TEST_F(MutatedInputs, HostileSafetensorsHeaders) {
  const auto safetensors = [](const std::string& header, size_t data_bytes) {
    std::string bytes(8, '\0');
    const uint64_t length = header.size();
    std::memcpy(bytes.data(), &length, 8);
    return bytes + header + std::string(data_bytes, '\0');
  };
  const auto expect_refused = [&](const std::string& name, const std::string& bytes,
                                  const std::string& problem) {
    const std::string file = write(name, bytes);
    try {
      SafetensorsFile loaded(file);
      ADD_FAILURE() << name << " was accepted";
    } catch (const RuntimeError& error) {
      EXPECT_NE(std::string(error.what()).find(problem), std::string::npos) << error.what();
    }
  };
  // data_offsets nested 100,000 deep: describing it in the message once recursed per level.
  const std::string deep(100000, '[');
  expect_refused("deep.safetensors",
                 safetensors("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":" + deep +
                                 std::string(100000, ']') + "}}",
                             4),
                 "not [begin, end]");
  // 1,000 tensors over the same 64 KiB: 64 MiB of tensors from a 130 KB file.
  std::string header = "{";
  for (int i = 0; i < 1000; ++i)
    header += std::string(i ? "," : "") + "\"t" + std::to_string(i) +
              "\":{\"dtype\":\"F32\",\"shape\":[16384],\"data_offsets\":[0,65536]}";
  expect_refused("overlap.safetensors", safetensors(header + "}", 65536), "overlapping");
}

// Fuzzer findings: text quoted from a file into an error once carried the file's newlines.
TEST_F(MutatedInputs, ErrorsQuotingTheFileStayOneLine) {
  const auto expect_one_line = [](const std::function<void()>& parse, const std::string& what) {
    try {
      parse();
      ADD_FAILURE() << what << " was accepted";
    } catch (const RuntimeError& error) {
      EXPECT_EQ(std::string(error.what()).find('\n'), std::string::npos) << error.what();
    }
  };
  std::string header = "{\"__metadata__\":{\"num_layers\":\"2\\nx\"}}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string bytes(8, '\0');
  const uint64_t length = header.size();
  std::memcpy(bytes.data(), &length, 8);
  const std::string model = write("newline.safetensors", bytes + header);
  expect_one_line([&] { read_safetensors_config(model); }, "a metadata value with a newline");
  expect_one_line(
      [] {
        parse_checkpoint_manifest(
            "{\"format\":\"moe-trainer manifest\",\"version\":1,\"hash\":\"xxh64\","
            "\"iteration\":1,\"files\":{\".a\\nb\":{\"bytes\":1,\"xxh64\":\"0123456789abcdef\"}}}",
            "manifest.json");
      },
      "a manifest file name with a newline");
  expect_one_line(
      [] {
        parse_checkpoint_info("{\"format\":\"moe-trainer checkpoint\",\"version\":2,"
                              "\"iteration\":1,\"optimizer_steps\":1,\"model\":{\"a\\nb\":1.5}}",
                              "metadata.json");
      },
      "a model key with a newline");
}

// The arguments `program --config file` as parse_*_options takes them.
template <typename Parse>
void parse_config(Parse&& parse, const char* program, const std::string& file) {
  std::vector<std::string> args = {program, "--config", file};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  parse(static_cast<int>(args.size()), argv.data());
}

TEST_F(MutatedInputs, ConfigFiles) {
  // Validation errors name the flag, not the file: only one line is required of them.
  feed_mutants({.name = "train.ini",
                .original = read(std::string(MOE_SOURCE_DIR) + "/configs/switch-small.ini") +
                            "data-path = data.txt\n",
                .length_fields = {},
                .parse = [](const std::string& file) {
                  parse_config(parse_train_options, "moe-train", file);
                },
                .errors_name_the_file = false,
                .truncation_is_damage = false});
  feed_mutants({.name = "eval.ini",
                .original = read(kCorpus + "/fuzz_config/eval.ini"),
                .length_fields = {},
                .parse = [](const std::string& file) {
                  parse_config(parse_eval_options, "moe-eval", file);
                },
                .errors_name_the_file = false,
                .truncation_is_damage = false});
}

// A fuzzer finding: Boost fills its messages by replacing %value%-style placeholders until none
// is left, so a config value or flag holding one made moe-train loop forever.
TEST_F(MutatedInputs, PlaceholdersInConfigFilesAreRefusedNotAHang) {
  for (const char* line :
       {"num-layers = %value%x\n", "moe-inp%canonical_option%ut-jitter-eps = 0.01\n"}) {
    const std::string file = write("placeholder.ini", std::string("data-path = data.txt\n") + line);
    EXPECT_THROW(parse_config(parse_train_options, "moe-train", file), UsageError) << line;
  }
}

// The binaries themselves on damaged files: exit 1 (damaged file) or 2 (bad configuration),
// exactly one line on stderr, no signal, no hang.
TEST_F(MutatedInputs, BinariesRefuseDamagedFilesWithOneLine) {
  const std::string text = write("text.txt", read(kCorpus + "/fuzz_tokens/text_bytes.txt"));
  const std::string model = read(export_tiny_model(path("model.safetensors")));
  const std::string shard = read(kCorpus + "/fuzz_tokens/llmc_shard_48_tokens.bin");
  const std::string config = read(std::string(MOE_SOURCE_DIR) + "/configs/switch-small.ini");

  std::string huge_header = model;  // a header length far past the end of the file
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(huge_header.data(), &huge, 8);
  std::string huge_count = shard;  // a token count the file does not hold
  const int32_t count = 1 << 30;
  std::memcpy(huge_count.data() + 8, &count, 4);
  std::string bad_offsets = model;  // the first tensor's data_offsets [0, n) made [9, n)
  bad_offsets.replace(bad_offsets.find("\"data_offsets\":[0,") + 16, 1, "9");

  const std::string truncated_model = write("truncated.safetensors", model.substr(0, 100));
  const std::string huge_header_model = write("huge_header.safetensors", huge_header);
  const std::string bad_offsets_model = write("bad_offsets.safetensors", bad_offsets);
  const std::string truncated_shard = write("truncated_shard.bin", shard.substr(0, 600));
  const std::string huge_count_shard = write("huge_count_shard.bin", huge_count);
  // Cut inside "hidden-size = 256": 25 is no multiple of the 4 heads.
  const std::string truncated_config =
      write("truncated.ini", config.substr(0, config.find("= 256") + 4));
  const std::string garbage_config =
      write("garbage.ini", "num-layers = 4\nhidden-size = \x01\xff\n");
  // A checkpoint whose metadata.json lost its end: the manifest no longer matches it.
  const std::string checkpoint = save_tiny_checkpoint(path("save"));
  const std::string metadata = read(checkpoint + "/metadata.json");
  write("save/" + checkpoint_name(3) + "/metadata.json", metadata.substr(0, metadata.size() / 2));

  const auto train = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {kTrain};
    for (const std::string& flag : tiny_train_flags()) argv.push_back(flag);
    argv.insert(argv.end(), extra.begin(), extra.end());
    return argv;
  };
  struct Case {
    std::string what;
    std::vector<std::string> argv;
    int status;
  };
  const std::vector<Case> cases = {
      {"moe-eval, truncated model", {kEval, "--model", truncated_model, "--data-path", text}, 1},
      {"moe-eval, header length past the end",
       {kEval, "--model", huge_header_model, "--data-path", text}, 1},
      {"moe-eval, data_offsets shifted",
       {kEval, "--model", bad_offsets_model, "--data-path", text}, 1},
      {"moe-train --init-from, truncated model",
       train({"--init-from", truncated_model, "--data-path", text}), 1},
      {"moe-train --init-from, data_offsets shifted",
       train({"--init-from", bad_offsets_model, "--data-path", text}), 1},
      {"moe-train, truncated shard",
       train({"--data-path", truncated_shard, "--data-format", "llmc"}), 1},
      {"moe-train, shard count past the end", train({"--data-path", huge_count_shard}), 1},
      {"moe-eval, shard count past the end",
       {kEval, "--model", path("model.safetensors"), "--data-path", huge_count_shard}, 1},
      {"moe-eval --load, truncated metadata.json",
       {kEval, "--load", path("save"), "--data-path", text}, 1},
      {"moe-train, truncated config",
       {kTrain, "--config", truncated_config, "--data-path", text}, 2},
      {"moe-train, garbage config", {kTrain, "--config", garbage_config, "--data-path", text}, 2},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const testing::Result r = testing::run(c.argv, 120.0);
    ASSERT_TRUE(r.spawned) << r;
    EXPECT_FALSE(r.timed_out) << r;
    EXPECT_EQ(r.signal, 0) << r;
    EXPECT_EQ(r.status, c.status) << r;
    const bool one_line = !r.err.empty() && r.err.find('\n') == r.err.size() - 1;
    EXPECT_TRUE(one_line) << "stderr must be exactly one line" << r;
  }
}

}  // namespace
}  // namespace moe
