// Files that are either wholly there or not there at all, even across a crash or a power cut:
// write to a temporary name, fsync it, rename it over the final name, fsync the directory.
#pragma once

#include <functional>
#include <string>

namespace moe {

// "path.tmp": where a durable write puts its bytes before the rename.
std::string temporary_path_for(const std::string& path);

// Calls write(temp) to fill the temporary file, then makes it `path` durably.
// RuntimeError naming the file on any failure; the temporary file is removed then.
void write_file_durably(const std::string& path,
                        const std::function<void(const std::string& temp)>& write);
void write_text_durably(const std::string& path, const std::string& text);

// fsync of a file or of a directory (so that a rename inside it survives a crash).
void sync_path(const std::string& path);

}  // namespace moe
