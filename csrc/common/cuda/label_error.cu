// The bad-label flag of common/cuda/label_error.h.
#include "label_error.h"

#include "../checks.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mutex>

namespace selectivity {

// Mapped pinned memory has one address on the host and on every device
// (unified virtual addressing), and is read by the host without a copy or a sync.
LabelError* label_error_flag() {
  static LabelError* flag = [] {
    LabelError* f = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&f), sizeof(LabelError),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    f->label = kNoError;
    f->K = 0;
    return f;
  }();
  return flag;
}

void raise_pending_label_error() {
  static std::mutex mutex;
  volatile LabelError* f = label_error_flag();
  if (f->label == kNoError) return;  // the common case: one read of host memory
  std::lock_guard<std::mutex> lock(mutex);
  const int64_t label = f->label, K = f->K;
  if (label == kNoError) return;
  f->label = kNoError;
  throw_label_error(label, K,
                    "; found on CUDA by an earlier call of a selectivity op, which skipped the images with "
                    "that label: the accumulated state is incomplete, rebuild it");
}

}  // namespace selectivity
