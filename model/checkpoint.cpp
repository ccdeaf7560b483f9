#include "model/checkpoint.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/grad_sync.h"
#include "model/safetensors.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kFormat = "moe-trainer checkpoint";
constexpr int kVersion = 1;
constexpr const char* kComplete = "COMPLETE";
constexpr const char* kLatest = "latest";
constexpr const char* kMetadata = "metadata.json";

// The three tensors saved per parameter, by name prefix and where they live in a HostState.
struct Kind {
  const char* prefix;
  float* HostState::*member;
};
constexpr std::array<Kind, 3> kKinds{{{"param/", &HostState::params},
                                      {"exp_avg/", &HostState::exp_avg},
                                      {"exp_avg_sq/", &HostState::exp_avg_sq}}};

std::string rank_file_name(int world_rank) {
  char name[32];
  std::snprintf(name, sizeof name, "rank_%05d.safetensors", world_rank);
  return name;
}

// The iteration of a directory named iter_XXXXXXX, or -1.
int64_t iteration_of(const std::string& name) {
  if (name.rfind("iter_", 0) != 0 || name.size() == 5) return -1;
  int64_t iteration = -1;
  const char* first = name.data() + 5;
  const char* last = name.data() + name.size();
  auto [end, ec] = std::from_chars(first, last, iteration);
  return ec == std::errc() && end == last ? iteration : -1;
}

bool is_complete(const fs::path& dir) { return fs::exists(dir / kComplete); }

// Complete checkpoints under `root`, newest first.
std::vector<std::pair<int64_t, fs::path>> complete_checkpoints(const fs::path& root) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  for (const auto& item : fs::directory_iterator(root, ec)) {
    const int64_t iteration = iteration_of(item.path().filename().string());
    if (iteration >= 0 && item.is_directory() && is_complete(item.path()))
      found.emplace_back(iteration, item.path());
  }
  std::sort(found.begin(), found.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  return found;
}

// Writes path.tmp and renames it over `path`: a reader sees the old file or the new one.
void write_text_atomically(const fs::path& path, const std::string& text) {
  const fs::path temp = path.string() + ".tmp";
  {
    std::ofstream out(temp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw RuntimeError("cannot write " + temp.string());
  }
  std::error_code ec;
  fs::rename(temp, path, ec);
  if (ec)
    throw RuntimeError("cannot rename " + temp.string() + " to " + path.string() + ": " +
                       ec.message());
}

// Runs `step` on every rank and agrees on the outcome, so that one rank's failure (a full
// disk) is an error on every rank instead of a hang in the next collective. The failing rank
// rethrows its own error; the others name it.
void on_every_rank(Communicator& world, const std::string& what,
                   const std::function<void()>& step) {
  std::exception_ptr error;
  try {
    step();
  } catch (...) {
    error = std::current_exception();
  }
  int failed_rank_plus_one = error ? world.rank() + 1 : 0;
  world.allreduce_max(&failed_rank_plus_one, 1);
  if (error) std::rethrow_exception(error);
  if (failed_rank_plus_one > 0)
    throw RuntimeError(what + " failed on rank " + std::to_string(failed_rank_plus_one - 1));
}

void remove_checkpoint(const fs::path& dir) {
  std::error_code ec;
  fs::remove(dir / kComplete, ec);  // first, so that a half-removed directory is never loaded
  fs::remove_all(dir, ec);
  if (ec) throw RuntimeError("cannot remove old checkpoint " + dir.string() + ": " + ec.message());
}

json shard_json(const ShardSpec& s) {
  return {{"dim", s.dim}, {"blocks", s.blocks}, {"part", s.part}, {"parts", s.parts}};
}

// The product of a shape, for element counts.
size_t numel_of(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

// Whether a shard spec read from a file describes `shape` as a piece of `full_shape`, so that
// full_index() stays inside the full tensor.
bool consistent(const ShardSpec& s, const std::vector<int64_t>& shape,
                const std::vector<int64_t>& full_shape) {
  if (shape.size() != full_shape.size()) return false;
  for (int64_t d : full_shape)
    if (d < 0) return false;
  std::vector<int64_t> expected = full_shape;
  if (s.dim >= 0 && s.parts > 1) {
    if (s.dim >= static_cast<int>(full_shape.size()) || s.blocks < 1 || s.part < 0 ||
        s.part >= s.parts || full_shape[s.dim] % (static_cast<int64_t>(s.blocks) * s.parts) != 0)
      return false;
    expected[s.dim] /= s.parts;
  }
  return expected == shape;
}

}  // namespace

std::string checkpoint_name(int64_t iteration) {
  char name[32];
  std::snprintf(name, sizeof name, "iter_%07lld", static_cast<long long>(iteration));
  return name;
}

void save_checkpoint(const std::string& save_dir, const CheckpointInfo& info,
                     const ParamLayout& layout, const ParallelDims& dims, const HostState& state,
                     Communicator& world, int keep_checkpoints) {
  const fs::path root(save_dir);
  const fs::path dir = root / checkpoint_name(info.iteration);
  const bool is_root = world.rank() == 0;

  // Rank 0 starts from an empty directory (an earlier save of this iteration is replaced).
  on_every_rank(world, "preparing checkpoint " + dir.string(), [&] {
    if (!is_root) return;
    if (fs::exists(dir)) remove_checkpoint(dir);
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec)
      throw RuntimeError("cannot create checkpoint directory " + dir.string() + ": " +
                         ec.message());
  });

  // Every rank: its local tensors, and what a differently laid out run needs to place them.
  const std::string file = rank_file_name(dims.world_rank);
  json tensors = json::object();
  for (const ParamEntry& entry : layout.entries())
    tensors[entry.name] = {{"full_shape", entry.full_shape},
                           {"shard", shard_json(entry.shard)},
                           {"expert", entry.is_expert}};
  const json rank_dims = {{"world", dims.world},
                          {"tp", dims.tp},
                          {"dp", dims.dp},
                          {"ep", dims.ep},
                          {"world_rank", dims.world_rank},
                          {"tp_rank", dims.tp_rank},
                          {"dp_rank", dims.dp_rank},
                          {"ep_rank", dims.ep_rank},
                          {"edp_rank", dims.edp_rank}};
  std::map<std::string, std::string> metadata = info.config.to_metadata();
  metadata["checkpoint"] =
      json{{"iteration", info.iteration}, {"dims", rank_dims}, {"tensors", tensors}}.dump();
  on_every_rank(world, "writing checkpoint " + dir.string(), [&] {
    std::vector<TensorView> views;
    for (const Kind& kind : kKinds)
      for (const ParamEntry& entry : layout.entries())
        views.push_back({kind.prefix + entry.name, entry.shape, state.*kind.member + entry.offset});
    write_safetensors((dir / file).string(), metadata, views);
  });

  // Rank 0, once every file is on disk: metadata.json, the COMPLETE marker, latest, pruning.
  json rank_json = rank_dims;
  for (const char* key : {"world", "tp", "dp", "ep"}) rank_json.erase(key);  // in "layout"
  rank_json["file"] = file;
  const std::string packed = rank_json.dump();
  const auto pieces = world.gather_bytes(packed.data(), packed.size(), 0);
  on_every_rank(world, "completing checkpoint " + dir.string(), [&] {
    if (!is_root) return;
    json ranks = json::array();
    for (const auto& piece : pieces) ranks.push_back(json::parse(piece.begin(), piece.end()));
    json model = json::object();
    for (const auto& [key, value] : info.config.to_metadata()) model[key] = std::stoll(value);
    const json meta = {
        {"format", kFormat},
        {"version", kVersion},
        {"iteration", info.iteration},
        {"optimizer_steps", info.optimizer_steps},
        {"model", model},
        {"layout", {{"world", dims.world}, {"tp", dims.tp}, {"dp", dims.dp}, {"ep", dims.ep}}},
        {"training", info.training},
        {"ranks", ranks}};
    write_text_atomically(dir / kMetadata, meta.dump(2) + "\n");
    write_text_atomically(dir / kComplete, "");
    write_text_atomically(root / kLatest, std::to_string(info.iteration) + "\n");
    // Keep this one and the newest keep - 1 others: never the one `latest` names, even when
    // the directory holds later iterations of an older run.
    if (keep_checkpoints > 0) {
      int kept = 1;  // this one
      for (const auto& [iteration, path] : complete_checkpoints(root)) {
        if (iteration == info.iteration) continue;
        if (kept < keep_checkpoints)
          ++kept;
        else
          remove_checkpoint(path);
      }
    }
  });
}

std::string find_checkpoint(const std::string& load_dir) {
  const fs::path root(load_dir);
  auto require_complete = [](const fs::path& dir) {
    if (!fs::is_directory(dir))
      throw RuntimeError("checkpoint " + dir.string() + " does not exist");
    if (!is_complete(dir))
      throw RuntimeError("checkpoint " + dir.string() +
                         " is incomplete (no COMPLETE marker: its save was interrupted)");
    return dir.string();
  };
  if (!fs::is_directory(root))
    throw RuntimeError("checkpoint directory " + load_dir + " does not exist");
  if (fs::exists(root / kMetadata))
    return require_complete(root);  // one checkpoint, named directly

  if (fs::exists(root / kLatest)) {
    std::ifstream in(root / kLatest);
    int64_t iteration = -1;
    if (!(in >> iteration) || iteration < 0)
      throw RuntimeError((root / kLatest).string() + " does not hold an iteration number");
    return require_complete(root / checkpoint_name(iteration));
  }
  const auto found = complete_checkpoints(root);
  if (found.empty())
    throw RuntimeError("checkpoint directory " + load_dir + " holds no complete checkpoint");
  return found.front().second.string();
}

CheckpointInfo read_checkpoint_info(const std::string& checkpoint_dir) {
  const std::string path = (fs::path(checkpoint_dir) / kMetadata).string();
  std::ifstream in(path);
  if (!in) throw RuntimeError("cannot read " + path);
  CheckpointInfo info;
  try {
    const json meta = json::parse(in);
    if (meta.at("format") != kFormat || meta.at("version") != kVersion)
      throw RuntimeError("not a version " + std::to_string(kVersion) + " checkpoint");
    info.iteration = meta.at("iteration").get<int64_t>();
    info.optimizer_steps = meta.at("optimizer_steps").get<int64_t>();
    std::map<std::string, std::string> model;
    for (const auto& [key, value] : meta.at("model").items())
      model[key] = std::to_string(value.get<int64_t>());
    info.config = ModelConfig::from_metadata(model, path);
    const json& layout = meta.at("layout");
    info.world = layout.at("world").get<int>();
    info.tp = layout.at("tp").get<int>();
    info.dp = layout.at("dp").get<int>();
    info.ep = layout.at("ep").get<int>();
    info.training = meta.at("training").get<std::map<std::string, std::string>>();
    for (const json& rank : meta.at("ranks")) {
      SavedRank saved;
      saved.file = rank.at("file").get<std::string>();
      saved.world_rank = rank.at("world_rank").get<int>();
      saved.tp_rank = rank.at("tp_rank").get<int>();
      saved.dp_rank = rank.at("dp_rank").get<int>();
      saved.ep_rank = rank.at("ep_rank").get<int>();
      saved.edp_rank = rank.at("edp_rank").get<int>();
      // A file name is a plain name inside the checkpoint, never a path out of it.
      if (saved.file.empty() || saved.file.find('/') != std::string::npos || saved.file[0] == '.')
        throw RuntimeError("bad rank file name \"" + saved.file + "\"");
      info.ranks.push_back(std::move(saved));
    }
    if (info.world < 1 || info.tp < 1 || info.ep < 1 || info.dp * info.tp != info.world ||
        static_cast<int>(info.ranks.size()) != info.world)
      throw RuntimeError("inconsistent layout (world " + std::to_string(info.world) + ", tp " +
                         std::to_string(info.tp) + ", dp " + std::to_string(info.dp) + ", " +
                         std::to_string(info.ranks.size()) + " rank files)");
  } catch (const RuntimeError& e) {
    const std::string what = e.what();
    throw RuntimeError(what.rfind(path, 0) == 0 ? what : path + ": " + what);
  } catch (const std::exception& e) {  // JSON syntax, a missing key, a wrong type
    throw RuntimeError(path + ": " + e.what());
  }
  return info;
}

void check_resumable(const CheckpointInfo& info, const ModelConfig& config,
                     const std::map<std::string, std::string>& training,
                     const std::string& checkpoint_dir) {
  auto require_same = [&](const std::string& key, const std::string& saved,
                          const std::string& mine) {
    if (saved != mine)
      throw UsageError("checkpoint " + checkpoint_dir + " was saved with " + key + " " + saved +
                       ", this run has " + mine);
  };
  const auto saved_config = info.config.to_metadata();
  for (const auto& [key, value] : config.to_metadata())
    require_same(key, saved_config.at(key), value);
  for (const auto& [key, value] : training) {
    const auto it = info.training.find(key);
    require_same(key, it == info.training.end() ? "(none)" : it->second, value);
  }
}

namespace {

void load_rank(const std::string& checkpoint_dir, const CheckpointInfo& info,
               const ParamLayout& layout, const ParallelDims& dims, const HostState& state) {
  const fs::path dir(checkpoint_dir);
  const std::string who = "rank " + std::to_string(dims.world_rank);

  // The saving layout: this rank's own file holds exactly its tensors.
  if (info.world == dims.world && info.tp == dims.tp && info.ep == dims.ep) {
    SafetensorsFile file((dir / info.ranks.at(dims.world_rank).file).string());
    for (const Kind& kind : kKinds) {
      float* out = state.*kind.member;
      if (out == nullptr) continue;
      for (const ParamEntry& entry : layout.entries()) {
        const std::vector<float>& values = file.expect(kind.prefix + entry.name, entry.shape);
        std::copy(values.begin(), values.end(), out + entry.offset);
      }
    }
    return;
  }

  // Another layout: assemble the full tensors this rank holds shards of, then cut its shards.
  // Every element comes from the one saved rank that held its canonical copy, which keeps the
  // result independent of the order of the files.
  struct Staged {
    const ParamEntry* entry;
    std::array<std::vector<float>, kKinds.size()> full;  // (product(full_shape)) per kind
    std::vector<char> filled;                            // (product(full_shape))
  };
  std::map<std::string, Staged> staged;
  for (const ParamEntry& entry : layout.entries()) {
    Staged& s = staged[entry.name];
    s.entry = &entry;
    const size_t full_numel = numel_of(entry.full_shape);
    for (size_t k = 0; k < kKinds.size(); ++k)
      if (state.*kKinds[k].member != nullptr) s.full[k].assign(full_numel, 0.0f);
    s.filled.assign(full_numel, 0);
  }

  // A saved rank's canonical copies (holds_canonical_copy): dense tensors on dp_rank 0, its
  // ep_rank's experts on tp_rank 0 of the first expert-data-parallel replica. Skip files that
  // hold none of the ones this rank needs.
  const int E = info.config.num_experts;
  const int my_first = layout.first_expert(), my_last = my_first + layout.num_local_experts();
  auto may_hold_needed = [&](const SavedRank& r) {
    if (r.dp_rank == 0) return true;
    if (E == 0 || r.tp_rank != 0 || r.edp_rank != 0) return false;
    const int first = r.ep_rank * (E / info.ep), last = first + E / info.ep;
    return first < my_last && my_first < last;
  };

  for (const SavedRank& rank : info.ranks) {
    if (!may_hold_needed(rank)) continue;
    const std::string path = (dir / rank.file).string();
    SafetensorsFile file(path);
    json tensors;
    try {
      tensors = json::parse(file.metadata_value("checkpoint")).at("tensors");
    } catch (const nlohmann::json::exception& e) {
      throw RuntimeError(path + ": bad \"checkpoint\" metadata: " + e.what());
    }
    ParallelDims saved_dims;
    saved_dims.tp_rank = rank.tp_rank;
    saved_dims.dp_rank = rank.dp_rank;
    saved_dims.ep_rank = rank.ep_rank;
    saved_dims.edp_rank = rank.edp_rank;
    for (const auto& [name, spec] : tensors.items()) {
      auto it = staged.find(name);
      if (it == staged.end()) continue;
      Staged& s = it->second;
      ParamEntry saved = *s.entry;  // the saving rank's view of the same tensor
      try {
        saved.full_shape = spec.at("full_shape").get<std::vector<int64_t>>();
        const json& shard = spec.at("shard");
        saved.shard = {shard.at("dim").get<int>(), shard.at("blocks").get<int>(),
                       shard.at("part").get<int>(), shard.at("parts").get<int>()};
        saved.is_expert = spec.at("expert").get<bool>();
      } catch (const nlohmann::json::exception& e) {
        throw RuntimeError(path + ": bad metadata for " + name + ": " + e.what());
      }
      if (!holds_canonical_copy(saved, saved_dims)) continue;
      if (saved.full_shape != s.entry->full_shape)
        throw RuntimeError(path + ": " + name + " has full shape " +
                           shape_string(saved.full_shape) + ", the model needs " +
                           shape_string(s.entry->full_shape));
      saved.shape = file.at("param/" + name).shape;
      if (!consistent(saved.shard, saved.shape, saved.full_shape))
        throw RuntimeError(path + ": " + name + ": shape " + shape_string(saved.shape) +
                           " does not match its shard spec and full shape " +
                           shape_string(saved.full_shape));
      const size_t numel = numel_of(saved.shape);
      for (size_t k = 0; k < kKinds.size(); ++k) {
        if (state.*kKinds[k].member == nullptr) continue;  // not wanted (moe-eval)
        const std::vector<float>& values = file.expect(kKinds[k].prefix + name, saved.shape);
        for (size_t i = 0; i < numel; ++i) s.full[k][saved.full_index(i)] = values[i];
      }
      for (size_t i = 0; i < numel; ++i) s.filled[saved.full_index(i)] = 1;
    }
  }

  for (const auto& [name, s] : staged) {
    const ParamEntry& entry = *s.entry;
    for (size_t i = 0; i < entry.numel; ++i)
      if (!s.filled[entry.full_index(i)])
        throw RuntimeError("checkpoint " + checkpoint_dir + " lacks part of " + name +
                           " (needed by " + who + ")");
    for (size_t k = 0; k < kKinds.size(); ++k) {
      float* out = state.*kKinds[k].member;
      if (out == nullptr) continue;
      for (size_t i = 0; i < entry.numel; ++i)
        out[entry.offset + i] = s.full[k][entry.full_index(i)];
    }
  }
}

}  // namespace

void load_checkpoint(const std::string& checkpoint_dir, const CheckpointInfo& info,
                     const ParamLayout& layout, const ParallelDims& dims, const HostState& state,
                     Communicator& world) {
  on_every_rank(world, "loading checkpoint " + checkpoint_dir,
                [&] { load_rank(checkpoint_dir, info, layout, dims, state); });
}

}  // namespace moe
