#include "model/checkpoint.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/durable_file.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "dist/watchdog.h"
#include "model/checkpoint_manifest.h"
#include "model/grad_sync.h"
#include "model/safetensors.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kFormat = "moe-trainer checkpoint";
constexpr int kVersion = 2;  // 2: manifest.json with checksums
constexpr const char* kComplete = "COMPLETE";
constexpr const char* kLatest = "latest";
constexpr const char* kMetadata = "metadata.json";
constexpr const char* kManifest = "manifest.json";

// The three tensors saved per parameter, by name prefix and where they live in a HostState.
struct Kind {
  const char* prefix;
  float* HostState::*member;
};
constexpr std::array<Kind, 3> kKinds{{{"param/", &HostState::params},
                                      {"exp_avg/", &HostState::exp_avg},
                                      {"exp_avg_sq/", &HostState::exp_avg_sq}}};

// An integer of hostile JSON as T: get<T>() would convert a float outside T's range (undefined
// behaviour) and wrap a large integer, so both are refused here.
template <typename T>
T integer_value(const json& value, const std::string& what) {
  if (!value.is_number_integer()) throw RuntimeError("\"" + what + "\" is not an integer");
  const bool in_range =
      value.is_number_unsigned()
          ? value.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max())
          : value.get<int64_t>() >= std::numeric_limits<T>::min() &&
                value.get<int64_t>() <= std::numeric_limits<T>::max();
  if (!in_range) throw RuntimeError("\"" + what + "\" is out of range: " + value.dump());
  return static_cast<T>(value.get<int64_t>());
}

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

// Runs `step` on every rank and agrees on the outcome, so that one rank's failure (a full
// disk) is an error on every rank instead of a hang in the next collective. The failing rank
// rethrows its own error; the others name it.
void on_every_rank(Communicator& world, const std::string& what,
                   const std::function<void()>& step) {
  // The ranks that finish first wait here for the slowest one's file I/O.
  const WatchdogAllowance slow_file_systems(10.0);
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
    sync_path(root.string());  // the new directory's entry survives a crash
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
  // Written under a temporary name, synced, renamed: a crash leaves no half file behind.
  FileDigest digest;
  on_every_rank(world, "writing checkpoint " + dir.string(), [&] {
    std::vector<TensorView> views;
    for (const Kind& kind : kKinds)
      for (const ParamEntry& entry : layout.entries())
        views.push_back({kind.prefix + entry.name, entry.shape, state.*kind.member + entry.offset});
    write_file_durably((dir / file).string(), [&](const std::string& temp) {
      write_safetensors(temp, metadata, views);
    });
    digest = digest_file((dir / file).string());
  });

  // Rank 0, once every file is on disk: metadata.json, the COMPLETE marker, latest, pruning.
  json rank_json = rank_dims;
  for (const char* key : {"world", "tp", "dp", "ep"}) rank_json.erase(key);  // in "layout"
  rank_json["file"] = file;
  rank_json["digest"] = {{"bytes", digest.bytes}, {"xxh64", digest.xxh64}};
  const std::string packed = rank_json.dump();
  const auto pieces = world.gather_bytes(packed.data(), packed.size(), 0);
  on_every_rank(world, "completing checkpoint " + dir.string(), [&] {
    if (!is_root) return;
    json ranks = json::array();
    CheckpointManifest manifest;
    manifest.iteration = info.iteration;
    for (const auto& piece : pieces) {
      json rank = json::parse(piece.begin(), piece.end());
      manifest.files[rank.at("file").get<std::string>()] = {
          rank.at("digest").at("bytes").get<uint64_t>(),
          rank.at("digest").at("xxh64").get<std::string>()};
      rank.erase("digest");
      ranks.push_back(std::move(rank));
    }
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
    // Every rank file is on disk; the manifest covers them and metadata.json, and the COMPLETE
    // marker, written last, says the manifest is.
    write_text_durably((dir / kMetadata).string(), meta.dump(2) + "\n");
    manifest.files[kMetadata] = digest_file((dir / kMetadata).string());
    write_text_durably((dir / kManifest).string(), checkpoint_manifest_json(manifest));
    write_text_durably((dir / kComplete).string(), "");
    write_text_durably((root / kLatest).string(), std::to_string(info.iteration) + "\n");
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

namespace {

std::string read_whole_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RuntimeError("cannot read " + path.string());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw RuntimeError("read error in " + path.string());
  return text;
}

// The checkpoints to try for `load_dir`, best first: the one `latest` names, then the older
// complete-or-not iter_* directories, newest first (a directory named directly: only it).
std::vector<fs::path> candidate_checkpoints(const fs::path& root) {
  if (!fs::is_directory(root))
    throw RuntimeError("checkpoint directory " + root.string() + " does not exist");
  if (fs::exists(root / kMetadata)) return {root};
  int64_t latest = -1;
  if (std::ifstream in(root / kLatest); in && !(in >> latest)) latest = -1;
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  for (const auto& item : fs::directory_iterator(root, ec)) {
    const int64_t iteration = iteration_of(item.path().filename().string());
    if (iteration >= 0 && item.is_directory() && (latest < 0 || iteration <= latest))
      found.emplace_back(iteration, item.path());
  }
  std::sort(found.begin(), found.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<fs::path> candidates;
  if (latest >= 0 && (found.empty() || found.front().first != latest))
    candidates.push_back(root / checkpoint_name(latest));  // named but gone: said as such
  for (const auto& [iteration, path] : found) candidates.push_back(path);
  return candidates;
}

// Why this process finds `dir` unusable, or "": complete, a readable manifest, every file there
// with its size, and the checksums of the files with index % share_count == share_index.
std::string check_against_manifest(const fs::path& dir, int share_index, int share_count) {
  if (!fs::is_directory(dir)) return "does not exist";
  if (!is_complete(dir)) return "is incomplete (no COMPLETE marker: its save was interrupted)";
  CheckpointManifest manifest;
  try {
    manifest = parse_checkpoint_manifest(read_whole_file(dir / kManifest), kManifest);
  } catch (const RuntimeError& e) {
    return std::string("has no valid manifest (") + e.what() + ")";
  }
  if (!manifest.files.count(kMetadata)) return "has a manifest that does not list metadata.json";
  int index = 0;
  for (const auto& [name, expected] : manifest.files) {
    const fs::path path = dir / name;
    std::error_code ec;
    const auto bytes = fs::file_size(path, ec);
    if (ec) return "is damaged: " + name + " is missing";
    if (bytes != expected.bytes)
      return "is damaged: " + name + " has " + std::to_string(bytes) +
             " bytes, the manifest says " + std::to_string(expected.bytes);
    if (index++ % share_count != share_index) continue;
    try {
      if (digest_file(path.string()) != expected)
        return "is damaged: " + name + " does not match its xxh64 checksum in the manifest";
    } catch (const RuntimeError& e) {
      return std::string("is damaged: ") + e.what();
    }
  }
  return "";
}

}  // namespace

CheckpointChoice choose_checkpoint(const std::string& load_dir, Communicator& world) {
  const fs::path root(load_dir);
  const WatchdogAllowance checksums_take_time(10.0);
  CheckpointChoice choice;
  std::vector<fs::path> candidates;
  on_every_rank(world, "looking for checkpoints in " + load_dir,
                [&] { candidates = candidate_checkpoints(root); });
  // Every rank checks its share of the checksums; all agree on the verdict.
  for (const fs::path& dir : candidates) {
    std::string problem = check_against_manifest(dir, world.rank(), world.size());
    int bad_rank_plus_one = problem.empty() ? 0 : world.rank() + 1;
    world.allreduce_max(&bad_rank_plus_one, 1);
    if (bad_rank_plus_one == 0) {
      choice.dir = dir.string();
      return choice;
    }
    // Every rank reports the same reason: the one the highest failing rank found.
    uint64_t length = problem.size();
    world.broadcast(&length, sizeof length, bad_rank_plus_one - 1);
    problem.resize(length);
    world.broadcast(problem.data(), length, bad_rank_plus_one - 1);
    choice.refused.push_back("checkpoint " + dir.string() + " " + problem);
  }
  std::string why;
  for (const std::string& line : choice.refused) why += "; " + line;
  throw RuntimeError(candidates.size() == 1 && fs::exists(root / kMetadata)
                         ? choice.refused.front()
                         : "checkpoint directory " + load_dir + " holds no usable checkpoint" +
                               (why.empty() ? std::string() : why));
}

std::string find_checkpoint(const std::string& load_dir) {
  auto self = make_self_communicator();
  const CheckpointChoice choice = choose_checkpoint(load_dir, *self);
  for (const std::string& line : choice.refused)
    std::fprintf(stderr, "warning: %s; using %s\n", line.c_str(), choice.dir.c_str());
  return choice.dir;
}

CheckpointInfo parse_checkpoint_info(const std::string& json_text,
                                     const std::string& name_for_errors) {
  const std::string& path = name_for_errors;
  CheckpointInfo info;
  try {
    const json meta = json::parse(json_text);
    if (meta.at("format") != kFormat || meta.at("version") != kVersion)
      throw RuntimeError("not a version " + std::to_string(kVersion) + " checkpoint");
    info.iteration = integer_value<int64_t>(meta.at("iteration"), "iteration");
    info.optimizer_steps =
        integer_value<int64_t>(meta.at("optimizer_steps"), "optimizer_steps");
    std::map<std::string, std::string> model;
    for (const auto& [key, value] : meta.at("model").items())
      model[key] = std::to_string(integer_value<int>(value, key));
    info.config = ModelConfig::from_metadata(model, path);
    const json& layout = meta.at("layout");
    info.world = integer_value<int>(layout.at("world"), "world");
    info.tp = integer_value<int>(layout.at("tp"), "tp");
    info.dp = integer_value<int>(layout.at("dp"), "dp");
    info.ep = integer_value<int>(layout.at("ep"), "ep");
    info.training = meta.at("training").get<std::map<std::string, std::string>>();
    for (const json& rank : meta.at("ranks")) {
      SavedRank saved;
      saved.file = rank.at("file").get<std::string>();
      saved.world_rank = integer_value<int>(rank.at("world_rank"), "world_rank");
      saved.tp_rank = integer_value<int>(rank.at("tp_rank"), "tp_rank");
      saved.dp_rank = integer_value<int>(rank.at("dp_rank"), "dp_rank");
      saved.ep_rank = integer_value<int>(rank.at("ep_rank"), "ep_rank");
      saved.edp_rank = integer_value<int>(rank.at("edp_rank"), "edp_rank");
      // A file name is a plain name inside the checkpoint, never a path out of it.
      if (saved.file.empty() || saved.file.find('/') != std::string::npos || saved.file[0] == '.')
        throw RuntimeError("bad rank file name \"" + saved.file + "\"");
      info.ranks.push_back(std::move(saved));
    }
    if (info.iteration < 0 || info.optimizer_steps < 0 || info.optimizer_steps > info.iteration)
      throw RuntimeError("bad iteration " + std::to_string(info.iteration) + " with " +
                         std::to_string(info.optimizer_steps) + " optimizer steps");
    if (info.world < 1 || info.tp < 1 || info.ep < 1 || info.dp * info.tp != info.world ||
        static_cast<int>(info.ranks.size()) != info.world)
      throw RuntimeError("inconsistent layout (world " + std::to_string(info.world) + ", tp " +
                         std::to_string(info.tp) + ", dp " + std::to_string(info.dp) + ", " +
                         std::to_string(info.ranks.size()) + " rank files)");
  } catch (const std::exception& e) {  // ours, or JSON syntax, a missing key, a wrong type
    // A key or file name quoted from the file may hold a newline: an error is one line.
    std::string what = e.what();
    for (char& c : what)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    throw RuntimeError(what.rfind(path, 0) == 0 ? what : path + ": " + what);
  }
  return info;
}

CheckpointInfo read_checkpoint_info(const std::string& checkpoint_dir) {
  const fs::path path = fs::path(checkpoint_dir) / kMetadata;
  return parse_checkpoint_info(read_whole_file(path), path.string());
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
        saved.full_shape.clear();
        for (const json& extent : spec.at("full_shape"))
          saved.full_shape.push_back(integer_value<int64_t>(extent, "full_shape"));
        const json& shard = spec.at("shard");
        saved.shard = {integer_value<int>(shard.at("dim"), "dim"),
                       integer_value<int>(shard.at("blocks"), "blocks"),
                       integer_value<int>(shard.at("part"), "part"),
                       integer_value<int>(shard.at("parts"), "parts")};
        saved.is_expert = spec.at("expert").get<bool>();
      } catch (const nlohmann::json::exception& e) {
        throw RuntimeError(path + ": bad metadata for " + name + ": " + e.what());
      } catch (const RuntimeError& e) {
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
