#include "model/checkpoint_manifest.h"

#include <xxhash.h>

#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"

namespace moe {
namespace {

using nlohmann::json;

constexpr const char* kFormat = "moe-trainer manifest";
constexpr int kVersion = 1;

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos && name[0] != '.' &&
         name.find('\0') == std::string::npos;
}

bool is_hex_digest(const std::string& text) {
  if (text.size() != 16) return false;
  for (char c : text)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

}  // namespace

FileDigest digest_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RuntimeError("cannot read " + path);
  std::unique_ptr<XXH64_state_t, decltype(&XXH64_freeState)> state(XXH64_createState(),
                                                                   &XXH64_freeState);
  if (!state || XXH64_reset(state.get(), 0) == XXH_ERROR)
    throw RuntimeError("cannot start a checksum of " + path);
  std::vector<char> chunk(1 << 20);
  FileDigest digest;
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    const std::streamsize got = in.gcount();
    if (got <= 0) break;
    XXH64_update(state.get(), chunk.data(), static_cast<size_t>(got));
    digest.bytes += static_cast<uint64_t>(got);
  }
  if (in.bad()) throw RuntimeError("read error in " + path);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016" PRIx64, static_cast<uint64_t>(XXH64_digest(state.get())));
  digest.xxh64 = hex;
  return digest;
}

std::string checkpoint_manifest_json(const CheckpointManifest& manifest) {
  json files = json::object();
  for (const auto& [name, digest] : manifest.files)
    files[name] = {{"bytes", digest.bytes}, {"xxh64", digest.xxh64}};
  return json{{"format", kFormat},
              {"version", kVersion},
              {"iteration", manifest.iteration},
              {"hash", "xxh64"},
              {"files", files}}
             .dump(2) +
         "\n";
}

CheckpointManifest parse_checkpoint_manifest(const std::string& json_text,
                                             const std::string& name_for_errors) {
  CheckpointManifest manifest;
  try {
    const json doc = json::parse(json_text);
    if (!doc.is_object() || doc.at("format") != kFormat || doc.at("version") != kVersion ||
        doc.at("hash") != "xxh64")
      throw RuntimeError("not a version " + std::to_string(kVersion) + " xxh64 manifest");
    if (!doc.at("iteration").is_number_integer())
      throw RuntimeError("\"iteration\" is not an integer");
    manifest.iteration = doc.at("iteration").get<int64_t>();
    if (manifest.iteration < 0) throw RuntimeError("negative iteration");
    const json& files = doc.at("files");
    if (!files.is_object() || files.empty()) throw RuntimeError("\"files\" lists no file");
    for (const auto& [name, entry] : files.items()) {
      if (!is_plain_file_name(name)) throw RuntimeError("bad file name \"" + name + "\"");
      FileDigest digest;
      if (!entry.at("bytes").is_number_unsigned())  // get<uint64_t> would wrap a negative
        throw RuntimeError("bad size for " + name + ": " + entry.at("bytes").dump());
      digest.bytes = entry.at("bytes").get<uint64_t>();
      digest.xxh64 = entry.at("xxh64").get<std::string>();
      if (!is_hex_digest(digest.xxh64))
        throw RuntimeError("bad xxh64 digest for " + name + ": \"" + digest.xxh64 + "\"");
      manifest.files[name] = digest;
    }
  } catch (const std::exception& e) {  // ours, or JSON syntax, a missing key, a wrong type
    // A name or digest quoted from the file may hold a newline: an error is one line.
    std::string what = e.what();
    for (char& c : what)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    throw RuntimeError(name_for_errors + ": " + what);
  }
  return manifest;
}

}  // namespace moe
