// Every C entry point of nn/csrc runs its body through `guarded`: no C++ exception crosses into
// Rust; a failure returns 1 with its message (first line, no C++ backtrace) in `error`.

#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>

namespace parti {

inline void write_error(char* error, size_t capacity, const std::string& message) {
  if (error == nullptr || capacity == 0) {
    return;
  }
  size_t length = std::min(message.size(), capacity - 1);
  std::memcpy(error, message.data(), length);
  error[length] = '\0';
}

// c10::Error's what() carries a C++ backtrace after the first line; the first line is the
// message a user can act on.
inline std::string first_line(const char* what) {
  std::string message(what == nullptr ? "" : what);
  auto end = message.find('\n');
  return end == std::string::npos ? message : message.substr(0, end);
}

template <typename F>
int guarded(char* error, size_t capacity, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_error(error, capacity, first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    write_error(error, capacity, first_line(e.what()));
  } catch (...) {
    write_error(error, capacity, "unknown C++ exception");
  }
  return 1;
}

} // namespace parti
