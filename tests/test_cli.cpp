// moe-train and moe-eval as a user meets them (DESIGN.md, Command line and Formats): the real
// executables run as subprocesses on a small text file and tiny models. Every bad input must
// end with the exit status DESIGN.md gives it (2 usage or configuration, 1 a missing or damaged
// file), exactly one line on stderr naming the problem, and no crash or hang; the good paths
// must print progress, write the metrics JSONL and safetensors files DESIGN.md fixes, and be
// deterministic in the seed.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tests/subprocess.h"


namespace moe {
namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

const std::string kTrain = std::string(MOE_BINARY_DIR) + "/moe-train";
const std::string kEval = std::string(MOE_BINARY_DIR) + "/moe-eval";

// A tiny run takes about a second; a hang fails the test after this long.
constexpr double kTimeoutSeconds = 30.0;

// ---------------------------------------------------------------------------------------------
// Subprocesses

using moe::testing::Result;

Result run(const std::vector<std::string>& argv) { return moe::testing::run(argv, kTimeoutSeconds); }

// Runs every command at once (each child mostly waits on MPI start-up) and returns the results
// in the same order.
std::vector<Result> run_all(const std::vector<std::vector<std::string>>& commands) {
  std::vector<std::future<Result>> running;
  for (const auto& argv : commands)
    running.push_back(std::async(std::launch::async, [&argv] { return run(argv); }));
  std::vector<Result> results;
  for (auto& f : running) results.push_back(f.get());
  return results;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// The failure contract: exit status `status`, no signal or hang, nothing but one non-empty
// line on stderr, and that line names `program` and contains each of `words`.
void expect_error(const Result& r, int status, const std::string& program,
                  const std::vector<std::string>& words) {
  ASSERT_TRUE(r.spawned) << r;
  EXPECT_FALSE(r.timed_out) << "hung" << r;
  EXPECT_EQ(r.signal, 0) << "crashed" << r;
  EXPECT_EQ(r.status, status) << r;
  const std::vector<std::string> lines = lines_of(r.err);
  ASSERT_EQ(lines.size(), 1u) << "stderr should be exactly one line" << r;
  EXPECT_FALSE(r.err.empty() || r.err.back() != '\n') << "the line should end" << r;
  EXPECT_EQ(lines[0].rfind(program + ": error: ", 0), 0u) << r;
  for (const std::string& word : words)
    EXPECT_NE(lines[0].find(word), std::string::npos) << "does not name '" << word << "'" << r;
}

void expect_success(const Result& r) {
  ASSERT_TRUE(r.spawned) << r;
  ASSERT_FALSE(r.timed_out) << "hung" << r;
  ASSERT_EQ(r.signal, 0) << "crashed" << r;
  ASSERT_EQ(r.status, 0) << r;
  EXPECT_EQ(r.err, "") << "a successful run should print nothing on stderr" << r;
}

// ---------------------------------------------------------------------------------------------
// Command lines and files

// Flags in order; setting one that is there replaces its value (Boost rejects a flag given
// twice, so each appears once).
class Flags {
 public:
  Flags() = default;
  Flags(std::initializer_list<std::pair<const std::string, std::string>> list) {
    for (const auto& [k, v] : list) set(k, v);
  }
  Flags& set(const std::string& flag, const std::string& value) {
    for (auto& [k, v] : flags_)
      if (k == flag) {
        v = value;
        return *this;
      }
    flags_.emplace_back(flag, value);
    return *this;
  }
  Flags& erase(const std::string& flag) {
    std::erase_if(flags_, [&](const auto& f) { return f.first == flag; });
    return *this;
  }
  std::vector<std::string> argv(const std::string& program) const {
    std::vector<std::string> args = {program};
    for (const auto& [k, v] : flags_) {
      args.push_back(k);
      if (!v.empty()) args.push_back(v);
    }
    return args;
  }

 private:
  std::vector<std::pair<std::string, std::string>> flags_;
};

constexpr int kSeqLength = 16;
constexpr int kExperts = 4;
constexpr int kHidden = 32;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// An llm.c shard: 256 int32 header (magic, version, count), then uint16 tokens.
std::string llmc_shard(const std::vector<uint16_t>& tokens, int32_t magic = 20240520) {
  std::vector<int32_t> header(256, 0);
  header[0] = magic;
  header[1] = 1;
  header[2] = static_cast<int32_t>(tokens.size());
  std::string bytes(reinterpret_cast<const char*>(header.data()), header.size() * 4);
  bytes.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
  return bytes;
}

// A safetensors file split into its JSON header and its data buffer.
struct Safetensors {
  ordered_json header;
  std::string data;
};

Safetensors parse_safetensors(const std::string& path) {
  const std::string bytes = read_file(path);
  Safetensors file;
  if (bytes.size() < 8) {
    ADD_FAILURE() << path << " is only " << bytes.size() << " bytes";
    return file;
  }
  uint64_t length = 0;
  std::memcpy(&length, bytes.data(), 8);
  if (length > bytes.size() - 8) {
    ADD_FAILURE() << path << ": header length " << length << " past the end";
    return file;
  }
  file.header = ordered_json::parse(bytes.substr(8, length));
  file.data = bytes.substr(8 + length);
  return file;
}

std::string serialize(const ordered_json& header, const std::string& data) {
  const std::string text = header.dump();
  const uint64_t length = text.size();
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &length, 8);
  return bytes + text + data;
}

// ---------------------------------------------------------------------------------------------
// The fixture: one directory, one text file and one exported tiny model for the whole suite.

class Cli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string pattern = ::testing::TempDir() + "moe_test_cli_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = new std::string(pattern);

    // About 6 KB of text-like bytes: words from a small vocabulary, spaces and newlines.
    const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
                           "and", "then", "some", "more", "text", "follows", "here", "MoE."};
    std::string text;
    uint64_t state = 12345;
    for (int i = 0; text.size() < 6000; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      text += words[(state >> 33) % 16];
      text += (i % 12 == 11) ? "\n" : " ";
    }
    write_file(path("data.txt"), text);

    const Result r = run(tiny().set("--train-iters", "0")
                             .set("--export-safetensors", path("base.safetensors"))
                             .argv(kTrain));
    expect_success(r);
    ASSERT_TRUE(std::filesystem::exists(path("base.safetensors"))) << r;
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
    dir_ = nullptr;
  }

  static std::string path(const std::string& name) { return *dir_ + "/" + name; }

  // A tiny model: 2 layers (layer 1 Switch), C 32, 2 heads, F 64, 4 experts, T 16, batch 2.
  static Flags tiny() {
    return Flags{{"--num-layers", "2"},        {"--hidden-size", std::to_string(kHidden)},
                 {"--num-attention-heads", "2"}, {"--ffn-hidden-size", "64"},
                 {"--num-experts", std::to_string(kExperts)},
                 {"--seq-length", std::to_string(kSeqLength)},
                 {"--micro-batch-size", "2"},   {"--train-iters", "2"},
                 {"--threads", "1"},            {"--data-path", path("data.txt")}};
  }

  // A copy of the base model with its header changed by `edit`.
  static std::string edited_model(const std::string& name,
                                  const std::function<void(ordered_json&)>& edit) {
    Safetensors file = parse_safetensors(path("base.safetensors"));
    edit(file.header);
    write_file(path(name), serialize(file.header, file.data));
    return path(name);
  }

  // Training lines of a metrics file (those without val_loss), minus the timing keys.
  static std::vector<json> training_lines_without_timing(const std::string& file) {
    std::vector<json> lines;
    for (const std::string& line : lines_of(read_file(file))) {
      json object = json::parse(line);
      object.erase("tokens_per_sec");
      object.erase("ms_per_iter");
      object.erase("time_breakdown_ms");
      lines.push_back(object);
    }
    return lines;
  }

  static std::string* dir_;
};

std::string* Cli::dir_ = nullptr;

struct ErrorCase {
  std::string name;
  std::vector<std::string> argv;
  int status;
  std::vector<std::string> words;  // what the one line must mention
};

void check_cases(const std::vector<ErrorCase>& cases) {
  std::vector<std::vector<std::string>> commands;
  for (const ErrorCase& c : cases) commands.push_back(c.argv);
  const std::vector<Result> results = run_all(commands);
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].name);
    const std::string program = cases[i].argv[0] == kEval ? "moe-eval" : "moe-train";
    expect_error(results[i], cases[i].status, program, cases[i].words);
  }
}

// ---------------------------------------------------------------------------------------------
// Help and usage errors: exit 2

TEST_F(Cli, HelpPrintsUsageAndExitsZero) {
  const std::vector<Result> results =
      run_all({{kTrain, "--help"}, {kEval, "--help"}, {kTrain, "-h"}});
  for (const Result& r : results) {
    expect_success(r);
    EXPECT_NE(r.out.find("usage:"), std::string::npos) << r;
    EXPECT_NE(r.out.find("--data-path"), std::string::npos) << r;
  }
  EXPECT_NE(results[0].out.find("--num-layers"), std::string::npos) << results[0];
  EXPECT_NE(results[0].out.find("--moe-expert-capacity-factor"), std::string::npos) << results[0];
  EXPECT_NE(results[1].out.find("--model"), std::string::npos) << results[1];
}

TEST_F(Cli, UsageErrorsExitTwoWithOneLine) {
  write_file(path("unknown_key.ini"), "num-layers = 2\nbogus-key = 1\n");
  write_file(path("not_a_number.ini"), "# a comment\nnum-experts = four\n");
  // The command line wins over the file, but the file's value must still be a number.
  write_file(path("overridden_not_a_number.ini"), "num-layers = abc\n");
  write_file(path("not_ini.ini"), "this is not a key value line\n");
  const std::string T = std::to_string(kSeqLength);
  check_cases({
      {"unknown flag", tiny().set("--bogus-flag", "1").argv(kTrain), 2, {"bogus-flag"}},
      {"not a number", tiny().set("--num-layers", "abc").argv(kTrain), 2, {"num-layers", "abc"}},
      {"fraction for an integer", tiny().set("--threads", "1.5").argv(kTrain), 2, {"threads"}},
      {"integer overflow", tiny().set("--num-layers", "99999999999").argv(kTrain), 2,
       {"num-layers"}},
      {"flag without its value", {kTrain, "--data-path", path("data.txt"), "--num-layers"}, 2,
       {"num-layers"}},
      {"heads do not divide hidden", tiny().set("--num-attention-heads", "3").argv(kTrain), 2,
       {"--num-attention-heads", "--hidden-size"}},
      {"top-k above the experts", tiny().set("--moe-router-topk", "5").argv(kTrain), 2,
       {"--moe-router-topk", "--num-experts"}},
      {"negative capacity factor", tiny().set("--moe-expert-capacity-factor", "-1").argv(kTrain),
       2, {"--moe-expert-capacity-factor"}},
      {"negative eval capacity factor",
       tiny().set("--moe-eval-capacity-factor", "-0.5").argv(kTrain), 2,
       {"--moe-eval-capacity-factor"}},
      {"infinite capacity factor", tiny().set("--moe-expert-capacity-factor", "inf").argv(kTrain),
       2, {"--moe-expert-capacity-factor"}},
      {"infinite learning rate", tiny().set("--lr", "inf").argv(kTrain), 2, {"--lr"}},
      {"NaN init scale", tiny().set("--init-scale", "nan").argv(kTrain), 2, {"--init-scale"}},
      {"seq-length past the positions", tiny().set("--max-position-embeddings", "8").argv(kTrain),
       2, {"--seq-length", "--max-position-embeddings"}},
      {"global batch not a multiple of micro", tiny().set("--global-batch-size", "3").argv(kTrain),
       2, {"--global-batch-size", "--micro-batch-size"}},
      {"zero micro-batch", tiny().set("--micro-batch-size", "0").argv(kTrain), 2,
       {"--micro-batch-size"}},
      {"valid fraction of one", tiny().set("--valid-fraction", "1").argv(kTrain), 2,
       {"--valid-fraction"}},
      {"vocabulary too small for bytes", tiny().set("--vocab-size", "100").argv(kTrain), 2,
       {"--vocab-size", "100"}},
      {"unknown key in the config file",
       tiny().set("--config", path("unknown_key.ini")).argv(kTrain), 2, {"bogus-key"}},
      {"not a number in the config file",
       tiny().erase("--num-experts").set("--config", path("not_a_number.ini")).argv(kTrain), 2,
       {"num-experts", "four"}},
      {"not a number in the config file, overridden",
       tiny().set("--config", path("overridden_not_a_number.ini")).argv(kTrain), 2,
       {"num-layers", "abc"}},
      {"a config line without =", tiny().set("--config", path("not_ini.ini")).argv(kTrain), 2,
       {"this is not a key value line"}},
      {"config file missing", tiny().set("--config", path("missing.ini")).argv(kTrain), 2,
       {"--config", "missing.ini"}},
      {"missing --data-path", tiny().erase("--data-path").argv(kTrain), 2, {"--data-path"}},
      {"bad --data-format", tiny().set("--data-format", "csv").argv(kTrain), 2,
       {"--data-format", "csv"}},
      {"bad --data-order", tiny().set("--data-order", "random").argv(kTrain), 2,
       {"--data-order", "random"}},
      {"bad --lr-decay-style", tiny().set("--lr-decay-style", "exp").argv(kTrain), 2,
       {"--lr-decay-style", "exp"}},
      {"bad --moe-token-drop-policy", tiny().set("--moe-token-drop-policy", "random").argv(kTrain),
       2, {"--moe-token-drop-policy", "random"}},
      {"bad --device", tiny().set("--device", "tpu").argv(kTrain), 2, {"--device", "tpu"}},
      {"moe-eval unknown flag", {kEval, "--model", path("base.safetensors"), "--bogus-flag"}, 2,
       {"bogus-flag"}},
      {"moe-eval without --model", {kEval, "--data-path", path("data.txt")}, 2, {"--model"}},
      {"moe-eval without --data-path", {kEval, "--model", path("base.safetensors")}, 2,
       {"--data-path"}},
      {"moe-eval bad --data-format",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("data.txt"),
        "--data-format", "csv"},
       2,
       {"--data-format", "csv"}},
      {"moe-eval bad --moe-token-drop-policy",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("data.txt"),
        "--moe-token-drop-policy", "random"},
       2,
       {"--moe-token-drop-policy"}},
      {"moe-eval infinite capacity factor",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("data.txt"),
        "--moe-eval-capacity-factor", "inf"},
       2,
       {"--moe-eval-capacity-factor"}},
      {"moe-eval bad --device",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("data.txt"), "--device",
        "tpu"},
       2,
       {"--device", "tpu"}},
      {"moe-eval seq-length past the model's positions",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("data.txt"),
        "--seq-length", "32"},
       2,
       {"--seq-length", "32", T}},
  });
}

// ---------------------------------------------------------------------------------------------
// Runtime errors, missing and damaged files: exit 1 (or 2 where the files fit each other badly)

TEST_F(Cli, DataFileErrors) {
  write_file(path("short.txt"), "abcdef");
  std::vector<uint16_t> tokens(200);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>(i % 50);
  write_file(path("bad_magic.bin"), llmc_shard(tokens, 12345));
  std::string truncated = llmc_shard(tokens);
  truncated.resize(truncated.size() - 10);
  write_file(path("truncated_shard.bin"), truncated);
  write_file(path("odd.u16"), "abc");
  std::filesystem::create_directories(path("a_directory"));
  check_cases({
      {"data file missing", tiny().set("--data-path", path("missing.txt")).argv(kTrain), 1,
       {"missing.txt"}},
      {"data path is a directory", tiny().set("--data-path", path("a_directory")).argv(kTrain), 1,
       {"a_directory"}},
      {"glob matching nothing", tiny().set("--data-path", path("none_*.bin")).argv(kTrain), 1,
       {"none_*.bin"}},
      {"data too short for one window", tiny().set("--data-path", path("short.txt")).argv(kTrain),
       1, {"short.txt", "tokens"}},
      {"llm.c shard with a bad magic",
       tiny().set("--data-path", path("bad_magic.bin")).set("--data-format", "llmc").argv(kTrain),
       1, {"bad_magic.bin", "magic"}},
      {"truncated llm.c shard", tiny().set("--data-path", path("truncated_shard.bin")).argv(kTrain),
       1, {"truncated_shard.bin", "bytes"}},
      {"odd-sized uint16 file",
       tiny().set("--data-path", path("odd.u16")).set("--data-format", "uint16").argv(kTrain), 1,
       {"odd.u16"}},
      {"metrics file in a missing directory",
       tiny().set("--metrics-file", path("no/such/dir/m.jsonl")).argv(kTrain), 1,
       {"no/such/dir/m.jsonl"}},
      {"export into a missing directory",
       tiny().set("--train-iters", "0").set("--export-safetensors", path("no/such/dir/w.st"))
           .argv(kTrain),
       1, {"no/such/dir/w.st"}},
      {"moe-eval data file missing",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("missing.txt")}, 1,
       {"missing.txt"}},
  });
}

TEST_F(Cli, DamagedSafetensorsFiles) {
  const std::string base = read_file(path("base.safetensors"));
  ASSERT_GT(base.size(), 64u);
  const Safetensors parsed = parse_safetensors(path("base.safetensors"));

  write_file(path("tiny.st"), "abc");
  std::string past_end = base;
  const uint64_t huge = base.size();  // the length field alone already leaves fewer bytes
  std::memcpy(past_end.data(), &huge, 8);
  write_file(path("length_past_end.st"), past_end);
  std::string bad_json = base;
  bad_json[8] = '[';  // '{' -> '[': the header no longer parses
  bad_json[9] = '@';
  write_file(path("bad_json.st"), bad_json);
  edited_model("offsets_past_end.st", [&](ordered_json& h) {
    const uint64_t end = parsed.data.size();
    h["ln_f.bias"]["data_offsets"] = {end, end + 4 * kHidden};
  });
  // Same element count, so the file itself is consistent: only the model can tell.
  edited_model("wrong_shape.st", [](ordered_json& h) {
    h["ln_f.weight"]["shape"] = {2, kHidden / 2};
  });
  edited_model("missing_tensor.st", [](ordered_json& h) { h.erase("h.1.moe.router.weight"); });
  edited_model("missing_metadata_key.st",
               [](ordered_json& h) { h["__metadata__"].erase("hidden_size"); });
  std::string truncated = base;
  truncated.resize(base.size() - 100);
  write_file(path("truncated.st"), truncated);

  const auto init_from = [](const std::string& file) {
    return tiny().set("--init-from", path(file)).argv(kTrain);
  };
  const auto eval = [](const std::string& file) {
    return std::vector<std::string>{kEval, "--model", path(file), "--data-path", path("data.txt"),
                                    "--threads", "1"};
  };
  check_cases({
      {"--init-from a missing file", init_from("missing.st"), 1, {"missing.st"}},
      {"--init-from a directory", tiny().set("--init-from", *dir_).argv(kTrain), 1, {*dir_}},
      {"--init-from a 3-byte file", init_from("tiny.st"), 1, {"tiny.st", "8"}},
      {"--init-from header length past the end", init_from("length_past_end.st"), 1,
       {"length_past_end.st", "header length"}},
      {"--init-from bad JSON", init_from("bad_json.st"), 1, {"bad_json.st", "JSON"}},
      {"--init-from data_offsets past the end", init_from("offsets_past_end.st"), 1,
       {"offsets_past_end.st", "ln_f.bias", "data_offsets"}},
      {"--init-from a tensor of the wrong shape", init_from("wrong_shape.st"), 1,
       {"wrong_shape.st", "ln_f.weight", "[2, 16]", "[32]"}},
      {"--init-from a missing tensor", init_from("missing_tensor.st"), 1,
       {"missing_tensor.st", "h.1.moe.router.weight"}},
      {"--init-from metadata without hidden_size", init_from("missing_metadata_key.st"), 1,
       {"missing_metadata_key.st", "hidden_size"}},
      {"--init-from a truncated file", init_from("truncated.st"), 1, {"truncated.st"}},
      {"moe-eval a missing model", eval("missing.st"), 1, {"missing.st"}},
      {"moe-eval a truncated model", eval("truncated.st"), 1, {"truncated.st"}},
      {"moe-eval bad JSON", eval("bad_json.st"), 1, {"bad_json.st", "JSON"}},
      {"moe-eval a tensor of the wrong shape", eval("wrong_shape.st"), 1,
       {"wrong_shape.st", "ln_f.weight"}},
      {"moe-eval a missing tensor", eval("missing_tensor.st"), 1,
       {"missing_tensor.st", "h.1.moe.router.weight"}},
  });
}

TEST_F(Cli, TokensOutsideTheModelVocabulary) {
  std::vector<uint16_t> tokens(100);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>(i % 200);
  tokens[37] = 300;
  write_file(path("token300.bin"), llmc_shard(tokens));
  check_cases({
      {"moe-eval: token 300, vocabulary 256",
       {kEval, "--model", path("base.safetensors"), "--data-path", path("token300.bin")}, 2,
       {"token300.bin", "300", "256"}},
      {"moe-train --init-from: token 300, vocabulary 256",
       tiny().set("--data-path", path("token300.bin")).set("--init-from", path("base.safetensors"))
           .argv(kTrain),
       2, {"token300.bin", "300"}},
      {"moe-train --vocab-size 256: token 300",
       tiny().set("--data-path", path("token300.bin")).set("--vocab-size", "256").argv(kTrain), 2,
       {"--vocab-size", "300"}},
  });
}

// ---------------------------------------------------------------------------------------------
// Good paths

TEST_F(Cli, ExportOfInitialWeightsHoldsTheConfig) {
  const Safetensors file = parse_safetensors(path("base.safetensors"));
  ASSERT_TRUE(file.header.contains("__metadata__"));
  const ordered_json& meta = file.header["__metadata__"];
  EXPECT_EQ(meta.value("format", ""), "pt");
  const std::map<std::string, std::string> expected = {
      {"num_layers", "2"},        {"hidden_size", "32"},   {"num_attention_heads", "2"},
      {"ffn_hidden_size", "64"},  {"num_experts", "4"},    {"moe_layer_freq", "2"},
      {"moe_router_topk", "1"},   {"vocab_size", "256"},   {"max_position_embeddings", "16"}};
  for (const auto& [key, value] : expected) {
    ASSERT_TRUE(meta.contains(key)) << key;
    ASSERT_TRUE(meta[key].is_string()) << key << " should be stored as a string";
    EXPECT_EQ(meta[key].get<std::string>(), value) << key;
  }
  const std::map<std::string, std::vector<int64_t>> shapes = {
      {"wte.weight", {256, 32}},
      {"wpe.weight", {16, 32}},
      {"ln_f.bias", {32}},
      {"h.0.attn.c_attn.weight", {96, 32}},
      {"h.0.mlp.c_fc.weight", {64, 32}},
      {"h.0.mlp.c_proj.weight", {32, 64}},
      {"h.1.moe.router.weight", {4, 32}},
      {"h.1.moe.experts.3.c_fc.weight", {64, 32}},
      {"h.1.moe.experts.3.c_proj.bias", {32}}};
  for (const auto& [name, shape] : shapes) {
    ASSERT_TRUE(file.header.contains(name)) << name;
    EXPECT_EQ(file.header[name]["dtype"], "F32") << name;
    EXPECT_EQ(file.header[name]["shape"].get<std::vector<int64_t>>(), shape) << name;
  }
  EXPECT_FALSE(file.header.contains("h.1.mlp.c_fc.weight")) << "layer 1 is a Switch layer";
  EXPECT_FALSE(file.header.contains("h.0.moe.router.weight")) << "layer 0 is dense";
}

TEST_F(Cli, CommandLineOverridesTheConfigFile) {
  write_file(path("three_layers.ini"),
             "# flags win over the file\nnum-layers = 3\nnum-experts = 2\nmoe-layer-freq = 1\n");
  const Result r = run(tiny()
                           .erase("--num-experts")
                           .set("--config", path("three_layers.ini"))
                           .set("--num-layers", "2")
                           .set("--train-iters", "0")
                           .set("--export-safetensors", path("override.safetensors"))
                           .argv(kTrain));
  expect_success(r);
  const Safetensors file = parse_safetensors(path("override.safetensors"));
  const ordered_json& meta = file.header["__metadata__"];
  EXPECT_EQ(meta.value("num_layers", ""), "2") << "the command line should win";
  EXPECT_EQ(meta.value("num_experts", ""), "2") << "the file should set what the line does not";
  EXPECT_EQ(meta.value("moe_layer_freq", ""), "1");
}

TEST_F(Cli, TinyRunLogsProgressAndMetrics) {
  // Two Switch layers (freq 1), two iterations, a held-out tenth evaluated at the end.
  const Result r = run(tiny()
                           .set("--moe-layer-freq", "1")
                           .set("--metrics-file", path("tiny.jsonl"))
                           .set("--export-safetensors", path("tiny.safetensors"))
                           .argv(kTrain));
  expect_success(r);

  bool progress = false;
  for (const std::string& line : lines_of(r.out))
    progress = progress || (line.find("lm") != std::string::npos &&
                            line.find("tok/s") != std::string::npos &&
                            line.find("load") != std::string::npos);
  EXPECT_TRUE(progress) << "no progress line with lm, tok/s and load" << r;

  const std::vector<std::string> lines = lines_of(read_file(path("tiny.jsonl")));
  ASSERT_EQ(lines.size(), 3u) << "two iterations and one evaluation" << r;
  const int tokens_per_iteration = 2 * kSeqLength;  // global batch 2 windows, top-1
  for (int i = 0; i < 2; ++i) {
    SCOPED_TRACE(lines[i]);
    const json m = json::parse(lines[i]);
    EXPECT_EQ(m.at("iteration").get<int>(), i + 1);
    for (const char* key : {"lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr",
                            "tokens_per_sec", "dropped_fraction"}) {
      ASSERT_TRUE(m.contains(key)) << key;
      ASSERT_TRUE(m[key].is_number()) << key;
      EXPECT_TRUE(std::isfinite(m[key].get<double>())) << key;
    }
    EXPECT_GT(m["lm_loss"].get<double>(), 0.0);
    EXPECT_GT(m["load_balancing_loss"].get<double>(), 0.0);
    EXPECT_GE(m["z_loss"].get<double>(), 0.0);
    EXPECT_GT(m["grad_norm"].get<double>(), 0.0);
    EXPECT_GT(m["tokens_per_sec"].get<double>(), 0.0);
    EXPECT_GE(m["dropped_fraction"].get<double>(), 0.0);
    EXPECT_LE(m["dropped_fraction"].get<double>(), 1.0);
    ASSERT_TRUE(m.contains("expert_load"));
    const json& load = m["expert_load"];
    ASSERT_TRUE(load.is_array());
    ASSERT_EQ(load.size(), 2u) << "one list per Switch layer";
    for (const json& layer : load) {
      ASSERT_TRUE(layer.is_array());
      ASSERT_EQ(layer.size(), static_cast<size_t>(kExperts));
      double total = 0;
      for (const json& x : layer) {
        ASSERT_TRUE(x.is_number());
        EXPECT_GE(x.get<double>(), 0.0);
        total += x.get<double>();
      }
      EXPECT_EQ(total, tokens_per_iteration) << "every token chooses one expert";
    }
  }
  const json eval = json::parse(lines[2]);
  EXPECT_EQ(eval.at("iteration").get<int>(), 2);
  ASSERT_TRUE(eval.contains("val_loss") && eval["val_loss"].is_number()) << lines[2];
  const double val_loss = eval["val_loss"].get<double>();
  EXPECT_TRUE(std::isfinite(val_loss) && val_loss > 0) << lines[2];

  // moe-eval on exactly the held-out tokens gives the same loss as the run's evaluation: the
  // same windows, in the same micro-batches, through the same exported weights.
  const std::string text = read_file(path("data.txt"));
  const int64_t n = (static_cast<int64_t>(text.size()) - 1) / kSeqLength;
  const auto n_valid = static_cast<int64_t>(std::ceil(0.1 * static_cast<double>(n)));
  write_file(path("held_out.txt"),
             text.substr((n - n_valid) * kSeqLength, n_valid * kSeqLength + 1));
  const std::vector<Result> evals = run_all(
      {{kEval, "--model", path("tiny.safetensors"), "--data-path", path("held_out.txt"),
        "--micro-batch-size", "2", "--threads", "1"},
       {kEval, "--model", path("tiny.safetensors"), "--data-path", path("data.txt"),
        "--micro-batch-size", "2", "--eval-iters", "3", "--threads", "1"}});
  for (const Result& e : evals) {
    expect_success(e);
    ASSERT_FALSE(lines_of(e.out).empty()) << e;
  }
  const json held_out = json::parse(lines_of(evals[0].out).back());
  ASSERT_TRUE(held_out.contains("loss") && held_out.contains("tokens")) << evals[0];
  EXPECT_EQ(held_out["tokens"].get<int64_t>(), n_valid * kSeqLength);
  EXPECT_NEAR(held_out["loss"].get<double>(), val_loss, 1e-5);
  const json three_batches = json::parse(lines_of(evals[1].out).back());
  EXPECT_EQ(three_batches["tokens"].get<int64_t>(), 3 * 2 * kSeqLength) << evals[1];
}

TEST_F(Cli, EvalPrintsJsonWithLossAndTokens) {
  const Result r = run({kEval, "--model", path("base.safetensors"), "--data-path",
                        path("data.txt"), "--threads", "1"});
  expect_success(r);
  const std::vector<std::string> lines = lines_of(r.out);
  ASSERT_FALSE(lines.empty()) << r;
  json result;
  ASSERT_NO_THROW(result = json::parse(lines.back())) << r;
  ASSERT_TRUE(result.is_object()) << r;
  ASSERT_TRUE(result.contains("loss") && result["loss"].is_number()) << r;
  ASSERT_TRUE(result.contains("tokens") && result["tokens"].is_number_integer()) << r;
  // Every window of the file: T tokens each, T = the model's 16 positions.
  const int64_t size = static_cast<int64_t>(read_file(path("data.txt")).size());
  EXPECT_EQ(result["tokens"].get<int64_t>(), (size - 1) / kSeqLength * kSeqLength);
  // Small initial weights predict nearly uniformly over 256 bytes: about ln 256 = 5.545.
  EXPECT_NEAR(result["loss"].get<double>(), std::log(256.0), 0.5) << r;
}

TEST_F(Cli, SameSeedSameMetricsOtherSeedDiffers) {
  const auto training = [](const std::string& seed, const std::string& metrics) {
    return tiny()
        .set("--train-iters", "3")
        .set("--seed", seed)
        .set("--moe-input-jitter-eps", "0.01")
        .set("--metrics-file", path(metrics))
        .argv(kTrain);
  };
  // The base model was exported from the default seed: --init-from it must train the same.
  std::vector<std::string> from_file = training("1234", "from_file.jsonl");
  from_file.push_back("--init-from");
  from_file.push_back(path("base.safetensors"));
  const std::vector<Result> results = run_all({training("1234", "a.jsonl"),
                                               training("1234", "b.jsonl"),
                                               training("99", "c.jsonl"), from_file});
  for (const Result& r : results) expect_success(r);

  const std::vector<json> a = training_lines_without_timing(path("a.jsonl"));
  const std::vector<json> b = training_lines_without_timing(path("b.jsonl"));
  const std::vector<json> c = training_lines_without_timing(path("c.jsonl"));
  const std::vector<json> f = training_lines_without_timing(path("from_file.jsonl"));
  ASSERT_EQ(a.size(), 4u) << "three iterations and one evaluation";
  ASSERT_EQ(b.size(), a.size());
  ASSERT_EQ(f.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i], b[i]) << "same seed, line " << i;
    EXPECT_EQ(a[i], f[i]) << "--init-from the seed's own initial weights, line " << i;
  }
  ASSERT_FALSE(c.empty());
  EXPECT_NE(a[0].at("lm_loss"), c[0].at("lm_loss")) << "another seed should start elsewhere";
}

}  // namespace
}  // namespace moe
