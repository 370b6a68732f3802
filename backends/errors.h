#pragma once
// Typed errors of the comm layer. Every message carries its context (rank,
// group, sequence number, op, shapes) so one line tells what went wrong where.
//
// Thread-safety: immutable values; error_text() may run on any thread.

#include <exception>
#include <stdexcept>
#include <string>

namespace fsdpsim {

/// Any failure of a collective or of the comm layer.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Ranks of one group called different collectives under the same sequence
/// number (op, dtype, shape, reduce op or root differ).
class CollectiveMismatchError : public CommError {
 public:
  using CommError::CommError;
};

/// Not every rank arrived at a collective within the group's timeout.
class CollectiveTimeoutError : public CommError {
 public:
  using CommError::CommError;
};

/// The world was aborted (another rank failed); blocked ranks wake with this.
class WorldAbortedError : public CommError {
 public:
  using CommError::CommError;
};

/// what() of the exception in `error` ("" for none, "unknown exception" for
/// one that is no std::exception).
inline std::string error_text(const std::exception_ptr& error) {
  if (!error) return {};
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

}  // namespace fsdpsim
