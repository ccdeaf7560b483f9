// moe-eval --dump-routing (launcher/routing_dump.h): the dump must be the router's own
// decisions. In process: a random model over a text file; each dumped byte must be the file's
// byte at its position, and the dump's per-expert choice and kept counts must equal the
// router's statistics (RouterStats) of independent forwards of the same batches. Through the
// executables: moe-train exports a tiny model, moe-eval --dump-routing writes one row per token
// whose bytes match the file, and an unwritable dump path is one line on stderr and exit 1.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "launcher/data.h"
#include "launcher/routing_dump.h"
#include "model/gpt.h"
#include "model/parameters.h"
#include "tests/subprocess.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

const std::string kTrain = std::string(MOE_BINARY_DIR) + "/moe-train";
const std::string kEval = std::string(MOE_BINARY_DIR) + "/moe-eval";

// Text with the kinds of bytes study 5 looks at: names opening lines, punctuation, newlines.
std::string sample_text() {
  std::string text;
  for (int i = 0; i < 40; ++i)
    text += "FIRST CITIZEN:\nBefore we proceed any further, hear me speak; " + std::to_string(i) +
            "!\n\nALL:\nSpeak, speak.\n\n";
  return text;
}

fs::path scratch_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("moe_test_routing_dump_" + name + "_" +
                                                    std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

std::string write_file(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path.string();
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> fields;
  std::istringstream in(line);
  for (std::string field; std::getline(in, field, ',');) fields.push_back(field);
  return fields;
}

TEST(RoutingDump, MatchesTheRouterAndTheInput) {
  const fs::path dir = scratch_dir("in_process");
  const std::string text = sample_text();
  const std::string data_path = write_file(dir / "data.txt", text);

  ModelConfig config;
  config.num_layers = 4;
  config.hidden_size = 16;
  config.num_attention_heads = 2;
  config.ffn_hidden_size = 32;
  config.num_experts = 4;
  config.moe_layer_freq = 2;
  config.moe_router_topk = 1;
  config.vocab_size = 256;
  config.max_position_embeddings = 32;
  const int T = 32, micro_batch = 3;
  const DataLoader data = DataLoader::for_evaluation(load_tokens(data_path, DataFormat::kBytes), T);

  auto backend = make_cpu_backend();
  ParamLayout layout(config);
  auto self = make_self_communicator();
  GptModel model(*backend, config, layout, micro_batch, T, ModelGroups{*self, *self, *self});
  std::vector<float> values(layout.total_floats());  // (total_floats)
  // Scale 1.0 spreads the router's choices over the experts, so the counts say something.
  initialize_parameters(layout, 7, 1.0, values.data());
  backend->copy_from_host(model.params(), values.data(), values.size() * sizeof(float));

  RoutingOptions routing;
  routing.capacity_factor = 1.0;  // tight: some choices are dropped, so `kept` is tested too
  const RoutingDump dump = collect_routing(model, data, micro_batch, 0, routing);

  const int num_switch = 2, E = config.num_experts;
  ASSERT_EQ(dump.switch_layer_ids, (std::vector<int>{1, 3}));
  const size_t num_tokens = static_cast<size_t>(data.num_valid_windows()) * T;
  ASSERT_EQ(dump.token.size(), num_tokens);
  ASSERT_EQ(dump.expert.size(), num_tokens * num_switch);
  for (size_t i = 0; i < num_tokens; ++i) {
    ASSERT_EQ(dump.position[i], static_cast<int64_t>(i));
    ASSERT_EQ(dump.token[i], static_cast<unsigned char>(text[dump.position[i]])) << "token " << i;
  }

  // The router's own counts, from forwards of the same batches.
  std::vector<double> choices(num_switch * E, 0.0), kept(num_switch * E, 0.0);  // (S, E)
  std::vector<int32_t> inputs(static_cast<size_t>(micro_batch) * T), targets(inputs.size());
  for (int64_t batch = 0; batch < data.num_valid_batches(micro_batch); ++batch) {
    const int rows = data.fill_valid_batch(inputs.data(), targets.data(), batch, micro_batch);
    model.forward(inputs.data(), targets.data(), rows, T, routing);
    for (int s = 0; s < num_switch; ++s)
      for (int e = 0; e < E; ++e) {
        choices[s * E + e] += model.switch_layers()[s].stats().choices[e];
        kept[s * E + e] += model.switch_layers()[s].stats().kept[e];
      }
  }
  std::vector<double> dump_choices(num_switch * E, 0.0), dump_kept(num_switch * E, 0.0);
  for (size_t i = 0; i < num_tokens; ++i)
    for (int s = 0; s < num_switch; ++s) {
      const int e = dump.expert[i * num_switch + s];
      ASSERT_GE(e, 0);
      ASSERT_LT(e, E);
      dump_choices[s * E + e] += 1;
      dump_kept[s * E + e] += dump.kept[i * num_switch + s];
    }
  EXPECT_EQ(dump_choices, choices);
  EXPECT_EQ(dump_kept, kept);
  double total_kept = 0;
  for (double k : kept) total_kept += k;
  EXPECT_LT(total_kept, static_cast<double>(num_tokens * num_switch)) << "capacity 1.0 dropped none";
  int experts_used = 0;
  for (double c : choices) experts_used += c > 0 ? 1 : 0;
  EXPECT_GT(experts_used, num_switch) << "every token went to one expert per layer";
  fs::remove_all(dir);
}

TEST(RoutingDump, MoeEvalWritesOneRowPerToken) {
  const fs::path dir = scratch_dir("cli");
  const std::string text = sample_text();
  const std::string data_path = write_file(dir / "data.txt", text);
  const std::string model_path = (dir / "model.safetensors").string();
  const testing::Result train = testing::run(
      {kTrain, "--data-path", data_path, "--num-layers", "2", "--hidden-size", "16",
       "--num-attention-heads", "2", "--ffn-hidden-size", "32", "--num-experts", "4",
       "--moe-layer-freq", "2", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters",
       "3", "--threads", "1", "--export-safetensors", model_path},
      60.0);
  ASSERT_EQ(train.status, 0) << train;

  const std::string dump_path = (dir / "routing.csv").string();
  const testing::Result eval = testing::run({kEval, "--model", model_path, "--data-path", data_path,
                                             "--seq-length", "32", "--threads", "1",
                                             "--dump-routing", dump_path},
                                            60.0);
  ASSERT_EQ(eval.status, 0) << eval;
  const nlohmann::json result = nlohmann::json::parse(lines_of(eval.out).back());
  const int64_t tokens = result.at("tokens").get<int64_t>();
  EXPECT_EQ(tokens, (static_cast<int64_t>(text.size()) - 1) / 32 * 32);
  EXPECT_TRUE(std::isfinite(result.at("loss").get<double>()));

  std::ifstream in(dump_path);
  std::stringstream content;
  content << in.rdbuf();
  const std::vector<std::string> rows = lines_of(content.str());
  ASSERT_EQ(rows.size(), static_cast<size_t>(tokens) + 1);
  EXPECT_EQ(rows[0], "position,token,layer1_expert,layer1_kept");
  for (size_t r = 1; r < rows.size(); ++r) {
    const std::vector<std::string> fields = split_csv(rows[r]);
    ASSERT_EQ(fields.size(), 4u) << rows[r];
    const int64_t position = std::stoll(fields[0]);
    ASSERT_EQ(position, static_cast<int64_t>(r - 1));
    ASSERT_EQ(std::stoi(fields[1]), static_cast<unsigned char>(text[position])) << rows[r];
    const int expert = std::stoi(fields[2]);
    ASSERT_TRUE(expert >= 0 && expert < 4) << rows[r];
    ASSERT_TRUE(fields[3] == "0" || fields[3] == "1") << rows[r];
  }

  // A dump that cannot be written: one line on stderr, exit 1.
  const testing::Result bad = testing::run({kEval, "--model", model_path, "--data-path", data_path,
                                            "--seq-length", "32", "--dump-routing",
                                            (dir / "no_such_dir" / "routing.csv").string()},
                                           60.0);
  EXPECT_EQ(bad.status, 1) << bad;
  EXPECT_EQ(lines_of(bad.err).size(), 1u) << bad;
  EXPECT_NE(bad.err.find("--dump-routing"), std::string::npos) << bad;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace moe
