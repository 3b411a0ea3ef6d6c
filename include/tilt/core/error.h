// Errors that tilt reports to its users.
#pragma once

#include <stdexcept>
#include <string>

namespace tilt {

/// Every error tilt raises on bad input or a failed run. The message names the problem
/// (the config key, the file, the iteration) and is meant to be printed as it is.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

/// Training produced a non-finite value (NaN or Inf). Nothing already written was touched.
class NonFiniteError : public Error {
 public:
  using Error::Error;
};

}  // namespace tilt
