#include "core/durable_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"

namespace moe {

std::string temporary_path_for(const std::string& path) { return path + ".tmp"; }

void sync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw RuntimeError("cannot open " + path + " to sync it: " + std::strerror(errno));
  const int status = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (status != 0) throw RuntimeError("fsync of " + path + " failed: " + std::strerror(error));
}

void write_file_durably(const std::string& path,
                        const std::function<void(const std::string& temp)>& write) {
  namespace fs = std::filesystem;
  const std::string temp = temporary_path_for(path);
  try {
    write(temp);
    sync_path(temp);
    std::error_code ec;
    fs::rename(temp, path, ec);
    if (ec) throw RuntimeError("cannot rename " + temp + " to " + path + ": " + ec.message());
    const fs::path parent = fs::path(path).parent_path();
    sync_path(parent.empty() ? std::string(".") : parent.string());
  } catch (...) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    throw;
  }
}

void write_text_durably(const std::string& path, const std::string& text) {
  write_file_durably(path, [&](const std::string& temp) {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw RuntimeError("cannot write " + temp);
  });
}

}  // namespace moe
