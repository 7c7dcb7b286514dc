// Typed errors thrown by the C++ core. The bindings map each kind to one Python exception in
// one place (python/module.cc); C++ never aborts or prints.
#pragma once
#include <stdexcept>
#include <string>

namespace pyknn {

enum class ErrorKind { Value, Key, Format, IO, Runtime };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg, int os_errno = 0)
      : std::runtime_error(msg), kind_(kind), errno_(os_errno) {}
  ErrorKind kind() const { return kind_; }
  int os_errno() const { return errno_; }

 private:
  ErrorKind kind_;
  int errno_;
};

// Bad argument values: wrong dimension, NaN rows, reserved ids ... -> ValueError.
[[noreturn]] inline void throw_value(const std::string& msg) { throw Error(ErrorKind::Value, msg); }
// Unknown ids -> KeyError.
[[noreturn]] inline void throw_key(const std::string& msg) { throw Error(ErrorKind::Key, msg); }
// Truncated, corrupted or foreign index files -> pyknn.FormatError (a ValueError).
[[noreturn]] inline void throw_format(const std::string& msg) { throw Error(ErrorKind::Format, msg); }

}  // namespace pyknn
