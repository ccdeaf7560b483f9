// manifest.json of a checkpoint: every file of it with its size and xxHash64, written by rank 0
// after every rank's file is durably on disk, and before the COMPLETE marker. A resumed run
// checks the files against it, so a damaged checkpoint (a flipped bit, a truncated copy) is
// refused instead of loaded.
//
//   {"format": "moe-trainer manifest", "version": 1, "iteration": 10, "hash": "xxh64",
//    "files": {"metadata.json": {"bytes": 1234, "xxh64": "0123456789abcdef"}, ...}}
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace moe {

struct FileDigest {
  uint64_t bytes = 0;
  std::string xxh64;  // 16 lower-case hex digits
  bool operator==(const FileDigest&) const = default;
};

struct CheckpointManifest {
  int64_t iteration = 0;
  std::map<std::string, FileDigest> files;  // file name inside the checkpoint -> digest
};

// Size and xxHash64 of a file; RuntimeError naming it when it cannot be read.
FileDigest digest_file(const std::string& path);

std::string checkpoint_manifest_json(const CheckpointManifest& manifest);

// RuntimeError starting with `name_for_errors` on anything malformed: bad JSON, wrong format,
// a missing field, a file name that is not a plain name, a digest that is not 16 hex digits.
CheckpointManifest parse_checkpoint_manifest(const std::string& json_text,
                                             const std::string& name_for_errors);

}  // namespace moe
