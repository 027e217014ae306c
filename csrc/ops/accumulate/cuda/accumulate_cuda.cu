// CUDA kernels of accumulate. Sums are float64 and added with atomicAdd (many images of one class add
// into one row), so results can differ from run to run in the last bits. Labels are checked by the
// counts kernel, reported one call late (common/cuda/label_error.h).
#include "../../../common/checks.h"
#include "../../../common/cuda/label_error.h"

// Only c10/cuda headers: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers,
// which a minimal CUDA toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace selectivity {
namespace {

// Counts images per class; also the one place that checks labels (every image visited once).
__global__ void count_kernel(const int64_t* labels, int64_t B, int64_t K, unsigned long long* counts,
                             LabelError* err) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < B; b += (int64_t)gridDim.x * blockDim.x) {
    const int64_t label = labels[b];
    if (label < 0 || label >= K) {
      report_bad_label(err, label, K);
      continue;
    }
    atomicAdd(counts + label, 1ULL);  // int64 two's complement: adding 1 as unsigned is the same
  }
}

// 16 bytes of act as one load: 8 fp16/bf16 or 4 fp32 values (the widest load a thread issues).
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(scalar_t);
  scalar_t val[N];
};

template <typename scalar_t>
bool aligned16(const ActView& v) {
  return reinterpret_cast<uintptr_t>(v.act.const_data_ptr<scalar_t>()) % 16 == 0;
}

// channels_last / [B, U], the layout training uses: block (32 lanes x 8 pixel rows); each lane
// reads 16 bytes of adjacent units per pixel, so one warp load covers 512 contiguous bytes. The
// pixels of an image may be split over blockIdx.z; shared memory sums the rows, one atomicAdd per
// unit and split. Needs U, sB and sP multiples of the pack and a 16-byte-aligned act.
constexpr int kLanes = 32, kPixelRows = 8;
constexpr int64_t kPixelsPerSplit = kPixelRows * 64;  // enough loads per thread to hide latency

template <typename scalar_t>
__global__ void accumulate_units_inner_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                              double* sums, int64_t U, int64_t P, int64_t K, int64_t sB,
                                              int64_t sP, int64_t pixels_per_split) {
  constexpr int N = Pack<scalar_t>::N;
  __shared__ double partial[kPixelRows][kLanes * N];
  const int64_t b = blockIdx.x;
  const int64_t label = labels[b];
  if (label < 0 || label >= K) return;  // uniform for the block; count_kernel reports it
  const int64_t u0 = (blockIdx.y * (int64_t)kLanes + threadIdx.x) * N;
  const int64_t p_end = min(P, (blockIdx.z + 1) * pixels_per_split);
  double acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.0;
  if (u0 < U) {  // U % N == 0, so the whole pack is inside
    const scalar_t* xb = x + b * sB + u0;
    int64_t p = blockIdx.z * pixels_per_split + threadIdx.y;
    for (; p + 3 * kPixelRows < p_end; p += 4 * kPixelRows) {  // four loads in flight
      Pack<scalar_t> v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = *reinterpret_cast<const Pack<scalar_t>*>(xb + (p + j * kPixelRows) * sP);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += static_cast<double>(static_cast<float>(v[j].val[i]));
    }
    for (; p < p_end; p += kPixelRows) {
      const Pack<scalar_t> v = *reinterpret_cast<const Pack<scalar_t>*>(xb + p * sP);
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] += static_cast<double>(static_cast<float>(v.val[i]));
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) partial[threadIdx.y][threadIdx.x * N + i] = acc[i];
  __syncthreads();
  for (int col = threadIdx.y * kLanes + threadIdx.x; col < kLanes * N; col += kLanes * kPixelRows) {
    const int64_t u = blockIdx.y * (int64_t)kLanes * N + col;
    if (u >= U) continue;
    double total = 0.0;
#pragma unroll
    for (int r = 0; r < kPixelRows; ++r) total += partial[r][col];
    atomicAdd(sums + label * U + u, total / static_cast<double>(P));
  }
}

template <typename scalar_t>
bool launch_units_inner(const ActView& v, const int64_t* labels, double* sums, int64_t K, cudaStream_t stream) {
  constexpr int N = Pack<scalar_t>::N;
  const int64_t ublocks = (v.U + kLanes * N - 1) / (kLanes * N);
  const int64_t splits = (v.P + kPixelsPerSplit - 1) / kPixelsPerSplit;
  const bool packs = v.U % N == 0 && v.sB % N == 0 && (v.P == 1 || v.sP % N == 0) && aligned16<scalar_t>(v);
  if (!packs || ublocks > 65535 || splits > 65535) return false;
  const dim3 grid(static_cast<unsigned>(v.B), static_cast<unsigned>(ublocks), static_cast<unsigned>(splits));
  accumulate_units_inner_kernel<scalar_t><<<grid, dim3(kLanes, kPixelRows), 0, stream>>>(
      v.act.const_data_ptr<scalar_t>(), labels, sums, v.U, v.P, K, v.sB, v.sP, kPixelsPerSplit);
  return true;
}

// channels_last / [B, U] when 16-byte packs do not fit (odd U, sliced or unaligned act): block
// (32 units x 8 pixel rows), one element a load.
template <typename scalar_t>
__global__ void accumulate_units_inner_scalar_kernel(const scalar_t* __restrict__ x,
                                                     const int64_t* __restrict__ labels, double* sums, int64_t U,
                                                     int64_t P, int64_t K, int64_t sB, int64_t sP) {
  __shared__ double partial[kPixelRows][kLanes];
  const int64_t b = blockIdx.x;
  const int64_t label = labels[b];
  if (label < 0 || label >= K) return;
  const int64_t nublk = (U + kLanes - 1) / kLanes;
  for (int64_t ublk = blockIdx.y; ublk < nublk; ublk += gridDim.y) {
    const int64_t u = ublk * kLanes + threadIdx.x;
    double acc = 0.0;
    if (u < U) {
      const scalar_t* xb = x + b * sB + u;
      for (int64_t p = threadIdx.y; p < P; p += kPixelRows) acc += static_cast<double>(static_cast<float>(xb[p * sP]));
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && u < U) {
      double s = 0.0;
      for (int r = 0; r < kPixelRows; ++r) s += partial[r][threadIdx.x];
      atomicAdd(sums + label * U + u, s / static_cast<double>(P));
    }
    __syncthreads();
  }
}

// Contiguous NCHW with small maps (P <= 256, e.g. ResNet-50's 14x14 and 7x7): the block's planes
// are one contiguous run of memory, copied to shared memory with 16-byte loads; then T threads
// sum each plane (T = 1, 2 or 4 so that 128 / T planes of P values fit in 8192 elements).
// Per-plane warp reductions, the fallback below, issue 2-byte loads and leave most lanes idle.
constexpr int kTileThreads = 128, kTileElements = 8192;

template <typename scalar_t, int T>
__global__ void accumulate_tile_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                       double* sums, int64_t B, int64_t U, int64_t P, int64_t K) {
  constexpr int N = Pack<scalar_t>::N, kPlanes = kTileThreads / T;
  extern __shared__ __align__(16) unsigned char tile_bytes[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(tile_bytes);
  const int64_t first = blockIdx.x * (int64_t)kPlanes;
  const int64_t planes = min((int64_t)kPlanes, B * U - first);
  const int64_t n = planes * P;
  const scalar_t* src = x + first * P;  // 16-byte aligned: kPlanes * P * sizeof is a multiple of 16
  const int64_t packs = n / N;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < packs; i += kTileThreads)
    reinterpret_cast<Pack<scalar_t>*>(tile)[i] = reinterpret_cast<const Pack<scalar_t>*>(src)[i];
  for (int64_t i = packs * N + threadIdx.x; i < n; i += kTileThreads) tile[i] = src[i];
  __syncthreads();
  const int64_t plane = threadIdx.x / T;
  const int lane = threadIdx.x % T;
  double acc = 0.0;
  if (plane < planes) {
    const scalar_t* t = tile + plane * P;
    for (int64_t p = lane; p < P; p += T) acc += static_cast<double>(static_cast<float>(t[p]));
  }
#pragma unroll
  for (int offset = T / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset, T);
  if (lane != 0 || plane >= planes) return;
  const int64_t g = first + plane, b = g / U, u = g % U;
  const int64_t label = labels[b];
  if (label >= 0 && label < K) atomicAdd(sums + label * U + u, acc / static_cast<double>(P));
}

template <typename scalar_t, int T>
void launch_tile(const ActView& v, const int64_t* labels, double* sums, int64_t K, cudaStream_t stream) {
  constexpr int kPlanes = kTileThreads / T;
  const int64_t blocks = (v.B * v.U + kPlanes - 1) / kPlanes;
  const size_t bytes = static_cast<size_t>(kPlanes * v.P) * sizeof(scalar_t);
  accumulate_tile_kernel<scalar_t, T><<<blocks, kTileThreads, bytes, stream>>>(
      v.act.const_data_ptr<scalar_t>(), labels, sums, v.B, v.U, v.P, K);
}

template <typename scalar_t>
bool launch_tiles(const ActView& v, const int64_t* labels, double* sums, int64_t K, cudaStream_t stream) {
  const bool flat = v.sP == 1 && v.sU == v.P && v.sB == v.U * v.P && aligned16<scalar_t>(v);
  if (!flat || v.P * (kTileThreads / 4) > kTileElements) return false;
  if (v.P * kTileThreads <= kTileElements) {
    launch_tile<scalar_t, 1>(v, labels, sums, K, stream);
  } else if (v.P * (kTileThreads / 2) <= kTileElements) {
    launch_tile<scalar_t, 2>(v, labels, sums, K, stream);
  } else {
    launch_tile<scalar_t, 4>(v, labels, sums, K, stream);
  }
  return true;
}

// NCHW: a group of G lanes (a power of two <= 32, about P) reduces one contiguous (image, unit)
// plane with warp shuffles; consecutive groups take consecutive units, so a warp reads a run of
// adjacent planes.
template <typename scalar_t, int G>
__global__ void accumulate_planes_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                                         double* sums, int64_t B, int64_t U, int64_t P, int64_t K, int64_t sB,
                                         int64_t sU) {
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t g = tid / G;
  const int lane = threadIdx.x % G;
  const bool active = g < B * U;  // inactive lanes still join the shuffles below
  const int64_t b = active ? g / U : 0, u = active ? g % U : 0;
  const int64_t label = active ? labels[b] : -1;
  const bool ok = active && label >= 0 && label < K;
  double acc = 0.0;
  if (ok) {
    const scalar_t* xp = x + b * sB + u * sU;
    for (int64_t p = lane; p < P; p += G) acc += static_cast<double>(static_cast<float>(xp[p]));
  }
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset, G);
  if (ok && lane == 0) atomicAdd(sums + label * U + u, acc / static_cast<double>(P));
}

template <typename scalar_t, int G>
void launch_planes(const ActView& v, const int64_t* labels, double* sums, int64_t K, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (v.B * v.U * G + kThreads - 1) / kThreads;
  accumulate_planes_kernel<scalar_t, G><<<blocks, kThreads, 0, stream>>>(
      v.act.const_data_ptr<scalar_t>(), labels, sums, v.B, v.U, v.P, K, v.sB, v.sU);
}

void accumulate_cuda(const at::Tensor& act, const at::Tensor& labels, const at::Tensor& sums,
                     const at::Tensor& counts) {
  const ActView v = check_accumulate_args(act, labels, sums, counts);
  const c10::cuda::CUDAGuard guard(act.device());
  raise_pending_label_error();
  if (v.B == 0) return;
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.const_data_ptr<int64_t>();
  const int64_t K = sums.size(0);
  double* s = sums.mutable_data_ptr<double>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  count_kernel<<<std::min<int64_t>((v.B + 255) / 256, 1024), 256, 0, stream>>>(
      l, v.B, K, reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>()), label_error_flag());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (v.U == 0) return;

  SELECTIVITY_DISPATCH_ACT_TYPES(v.act.scalar_type(), "selectivity_accumulate_cuda", [&] {
    if (v.units_inner) {
      if (!launch_units_inner<scalar_t>(v, l, s, K, stream)) {
        const int64_t nublk = (v.U + kLanes - 1) / kLanes;
        const dim3 grid(static_cast<unsigned>(v.B), static_cast<unsigned>(std::min<int64_t>(nublk, 65535)));
        accumulate_units_inner_scalar_kernel<scalar_t><<<grid, dim3(kLanes, kPixelRows), 0, stream>>>(
            v.act.const_data_ptr<scalar_t>(), l, s, v.U, v.P, K, v.sB, v.sP);
      }
    } else if (launch_tiles<scalar_t>(v, l, s, K, stream)) {
      // contiguous NCHW, small maps
    } else if (v.P >= 32) {
      launch_planes<scalar_t, 32>(v, l, s, K, stream);
    } else if (v.P >= 16) {
      launch_planes<scalar_t, 16>(v, l, s, K, stream);
    } else if (v.P >= 8) {
      launch_planes<scalar_t, 8>(v, l, s, K, stream);
    } else if (v.P >= 4) {
      launch_planes<scalar_t, 4>(v, l, s, K, stream);
    } else if (v.P >= 2) {
      launch_planes<scalar_t, 2>(v, l, s, K, stream);
    } else {
      launch_planes<scalar_t, 1>(v, l, s, K, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(selectivity, CUDA, m) {
  m.impl("accumulate", &accumulate_cuda);
}

}  // namespace selectivity
