// File: common/status_macros.h
//
// RETURN_IF_ERROR / ASSIGN_OR_RETURN for absl::Status and absl::StatusOr. Abseil 20220623 (the
// Debian 12 version) has no status_macros.h, so the project carries its own.
#ifndef RETNET_COMMON_STATUS_MACROS_H_
#define RETNET_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define RETNET_STATUS_CONCAT_INNER_(a, b) a##b
#define RETNET_STATUS_CONCAT_(a, b) RETNET_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if it is not OK.
#define RETURN_IF_ERROR(expr)                        \
  do {                                               \
    ::absl::Status retnet_status_ = (expr);          \
    if (!retnet_status_.ok()) return retnet_status_; \
  } while (false)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status, else assigns the value
// to `lhs` (which may be a declaration such as `auto x`).
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ASSIGN_OR_RETURN_IMPL_(RETNET_STATUS_CONCAT_(retnet_statusor_, __LINE__), lhs, rexpr)

#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                           \
  if (!statusor.ok()) return statusor.status();      \
  lhs = std::move(statusor).value()

#endif  // RETNET_COMMON_STATUS_MACROS_H_
