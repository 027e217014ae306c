// Bad labels on CUDA, reported without a device sync: a kernel that meets a label outside [0, K)
// skips that image and writes the label and K into a flag in mapped (zero-copy) pinned host memory;
// the host reads the flag at the start of every later CUDA call of a selectivity op and raises the
// same ValueError as the CPU path. So a bad label is reported one call late (or later: the flag is
// read without waiting for running kernels), and the batch that had it was accumulated without its
// out-of-range images. A device-side assert was the other choice; it would kill the CUDA context,
// which is worse for a training run than a late error.
#pragma once

#include <cstdint>

namespace selectivity {

constexpr int64_t kNoError = INT64_MIN;

struct LabelError {
  int64_t label;  // kNoError, or an out-of-range label seen by a kernel
  int64_t K;
};

// The process's one flag (mapped pinned memory has one address on the host and on every device).
LabelError* label_error_flag();

// Raises the ValueError of a label a kernel flagged since the last call, and clears the flag.
void raise_pending_label_error();

#ifdef __CUDACC__
// Called by a kernel thread that found `label` outside [0, K). Racing plain stores are fine: any one
// bad label makes the message. K is made visible to the host before the label, which the host polls.
__device__ inline void report_bad_label(LabelError* err, int64_t label, int64_t K) {
  err->K = K;
  __threadfence_system();
  err->label = label;
}
#endif

}  // namespace selectivity
