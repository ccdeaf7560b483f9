// Sharded training checkpoints: every rank writes the tensors it holds, and a run on any
// layout (tp, dp, ep changed or not) resumes from them.
//
// On disk, for `--save DIR` at iteration 10 of a 4-rank run:
//
//   DIR/latest                        "10": the newest complete checkpoint (written last, by
//   rename) DIR/iter_0000010/metadata.json    iteration, optimizer steps, model config, layout,
//   file list,
//                                     the training options a resumed run must match
//   DIR/iter_0000010/rank_00000.safetensors ... rank_00003.safetensors
//                                     each rank's local tensors "param/<name>", "exp_avg/<name>",
//                                     "exp_avg_sq/<name>" with their local shapes; __metadata__
//                                     "checkpoint" is JSON: the rank's dims and, per tensor, its
//                                     full_shape, shard spec and whether it is an expert
//   DIR/iter_0000010/manifest.json    size and xxHash64 of every file above (checkpoint_manifest.h)
//   DIR/iter_0000010/COMPLETE         written by rank 0 after every rank finished: a directory
//                                     without it is never loaded
//
// Every file is written under a temporary name, fsynced and renamed, and the directory fsynced,
// so a crash at any moment leaves each file whole or absent; a damaged or incomplete newest
// checkpoint is refused with one line and the previous one is used (choose_checkpoint).
//
// Only parameters, the AdamW moments and the step counts are saved: the data position and
// every random draw (data shuffle, router jitter) are pure functions of the seed and the
// iteration (DESIGN.md, Router and Data), so they need no state.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "dist/parallel_dims.h"
#include "model/config.h"
#include "model/parameters.h"

namespace moe {

// The rank files of a saved checkpoint, with the coordinates of the rank that wrote each.
struct SavedRank {
  std::string file;  // relative to the checkpoint directory
  int world_rank = 0, tp_rank = 0, dp_rank = 0, ep_rank = 0, edp_rank = 0;
};

// metadata.json of one checkpoint.
struct CheckpointInfo {
  int64_t iteration = 0;        // the last completed iteration; a resumed run starts after it
  int64_t optimizer_steps = 0;  // AdamW updates so far (fewer than iteration after skips)
  ModelConfig config;
  int world = 1, tp = 1, dp = 1, ep = 1;  // the saving run's layout
  // Training options a resumed run must match (seed, global batch, ...), as "key": "value";
  // the trainer decides which, this file only stores and compares them.
  std::map<std::string, std::string> training;
  std::vector<SavedRank> ranks;  // (world), in world-rank order
};

// One rank's training state on the host, each of layout.total_floats() floats. The moments may
// be null when loading (moe-eval wants the weights only); saving needs all three.
struct HostState {
  float* params = nullptr;
  float* exp_avg = nullptr;     // AdamW m
  float* exp_avg_sq = nullptr;  // AdamW v
};

// "iter_0000010".
std::string checkpoint_name(int64_t iteration);

// Writes save_dir/iter_XXXXXXX (collective over `world`: every rank writes its own file), marks
// it COMPLETE, points save_dir/latest at it, then keeps it and the newest keep_checkpoints - 1
// other complete checkpoints (0 keeps every one). `info.ranks` is ignored: the file list is
// gathered here. Returns when the checkpoint is complete on disk; a failure on any rank is a
// RuntimeError on every rank.
void save_checkpoint(const std::string& save_dir, const CheckpointInfo& info,
                     const ParamLayout& layout, const ParallelDims& dims, const HostState& state,
                     Communicator& world, int keep_checkpoints);

// The checkpoint to resume from, and the newer ones passed over. For `load_dir` holding
// metadata.json: that checkpoint or an error. Otherwise the one load_dir/latest names, or when
// it is incomplete, missing or damaged, the newest older one that is complete and matches its
// manifest (every file's size and xxHash64; the ranks share the checksum work). Collective
// over `world`; every rank gets the same answer. RuntimeError when none is usable.
struct CheckpointChoice {
  std::string dir;
  std::vector<std::string> refused;  // "checkpoint DIR is damaged: ..." per newer one passed over
};
CheckpointChoice choose_checkpoint(const std::string& load_dir, Communicator& world);

// choose_checkpoint for one process (moe-eval); each refusal is a warning line on stderr.
std::string find_checkpoint(const std::string& load_dir);

// metadata.json of a checkpoint; RuntimeError naming the file on any problem.
CheckpointInfo read_checkpoint_info(const std::string& checkpoint_dir);
CheckpointInfo parse_checkpoint_info(const std::string& json_text,
                                     const std::string& name_for_errors);

// UsageError naming the checkpoint and the first field that differs: of the model config, or
// of the `training` options a resumed run must match.
void check_resumable(const CheckpointInfo& info, const ModelConfig& config,
                     const std::map<std::string, std::string>& training,
                     const std::string& checkpoint_dir);

// Fills this rank's `state` for `layout` from the checkpoint. On the saving layout each rank
// reads its own file (bit-identical continuation). On another one each rank assembles its
// shards from the saved ones: every saved element is mapped to its index in the full tensor
// and the ones this rank's shards hold are taken. For now a rank reads every file that holds
// a canonical copy of something it needs (all of them, in the worst case), not byte ranges.
// RuntimeError naming the file (and rank) when a tensor is missing, misshapen or incomplete.
// Collective over `world` only to agree on failure: an error on one rank is one on every rank.
void load_checkpoint(const std::string& checkpoint_dir, const CheckpointInfo& info,
                     const ParamLayout& layout, const ParallelDims& dims, const HostState& state,
                     Communicator& world);

}  // namespace moe
