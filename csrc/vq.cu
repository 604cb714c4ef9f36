// VQ codebook search for small code dims (d <= 32: Emu3 d=4, LlamaGen d=8).
//
// At small d the N x K distance evaluation is a few FMAs per pair, so a tensor-core tile product
// buys nothing and the cost is the compare-and-select. Each thread keeps ROWS rows of z in
// registers, the block streams the codebook through shared memory in tiles of kVqSmallTileCodes
// codes (converted to fp32 and zero-padded to D), and every code read from shared memory (a
// broadcast, no bank conflicts) is reused for all ROWS rows. Distances use the exact form
// sum((z - e)^2) in fp32, so identical codes give identical distances and a strict `<` while
// scanning codes in increasing order keeps the lowest index on ties. Blocks along grid.y split the
// codebook so small N still fills the GPU; the caller reduces the per-split winners.
//
// Range: on entry part_dist[s * n + row] holds, for every split s, the row's scale s = 2^-m (a
// power of two the caller computes, unimm/kernels/vq.py: m = max(exponent of max|z_row|, smallest
// such exponent over the finite codes), under which the row and its nearest code are O(1)), and
// the thread evaluates sum((s z - s e)^2) = s^2 sum((z - e)^2): exact scaling, so the same picks as
// the unscaled fp32 form wherever that stays in range, for any finite magnitude. Only codes far
// larger than the nearest one can overflow, to +inf. A NaN scale (a row holding NaN / Inf) makes
// every distance of the row NaN; a code holding NaN / Inf gives NaN or +inf. Neither passes the
// strict `<` against the initial +inf, so such a row keeps best = +inf: the caller's index -1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common.h"
#include "convert.cuh"
#include "ops.h"

namespace unimm {
namespace {

constexpr int kThreads = 128;

// Rows per thread: enough to amortise each shared-memory code read, at most 64 fp32 registers of z.
__host__ __device__ constexpr int rows_per_thread(int padded_dim) { return padded_dim <= 8 ? 8 : 64 / padded_dim; }

// Everything a launch needs besides the template parameters; passed to the kernel by value.
struct SmallDimArgs {
  const void* z;
  int64_t z_row_stride;
  const void* codebook;
  int64_t codebook_row_stride;
  int64_t n;
  int64_t k;
  int d;
  int64_t codes_per_split;
  float* part_dist;
  int64_t* part_idx;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) vq_argmin_small_d_kernel(const SmallDimArgs args) {
  constexpr int ROWS = rows_per_thread(D);
  static_assert(D % 4 == 0, "padded code dim must be a multiple of 4 for float4 shared loads");
  __shared__ __align__(16) float tile[kVqSmallTileCodes * D];
  const T* __restrict__ z = static_cast<const T*>(args.z);
  const T* __restrict__ codebook = static_cast<const T*>(args.codebook);
  const int64_t n = args.n;
  const int d = args.d;

  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * (kThreads * ROWS) + threadIdx.x;
  const int64_t split_offset = static_cast<int64_t>(blockIdx.y) * n;
  float zr[ROWS][D];   // s * z
  float scale[ROWS];   // s: read from this split's own part_dist slots, written back at the end
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = first_row + static_cast<int64_t>(r) * kThreads;
    scale[r] = row < n ? args.part_dist[split_offset + row] : 0.0f;
#pragma unroll
    for (int j = 0; j < D; ++j) {
      zr[r][j] = (row < n && j < d) ? __fmul_rn(to_float(z[row * args.z_row_stride + j]), scale[r]) : 0.0f;
    }
  }

  const int64_t code_begin = static_cast<int64_t>(blockIdx.y) * args.codes_per_split;
  const int64_t code_end = min(args.k, code_begin + args.codes_per_split);
  float best[ROWS];
  int64_t best_idx[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    best[r] = INFINITY;
    best_idx[r] = code_begin;
  }

  for (int64_t tile_begin = code_begin; tile_begin < code_end; tile_begin += kVqSmallTileCodes) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kVqSmallTileCodes), code_end - tile_begin));
    __syncthreads();  // every thread is done reading the previous tile
    for (int i = threadIdx.x; i < kVqSmallTileCodes * D; i += kThreads) {
      const int code = i / D;
      const int j = i % D;
      tile[i] = (code < count && j < d)
                    ? to_float(codebook[(tile_begin + code) * args.codebook_row_stride + j])
                    : 0.0f;
    }
    __syncthreads();
    for (int code = 0; code < count; ++code) {
      float e[D];
#pragma unroll
      for (int j = 0; j < D; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(&tile[code * D + j]);
        e[j] = v.x;
        e[j + 1] = v.y;
        e[j + 2] = v.z;
        e[j + 3] = v.w;
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        float dist = 0.0f;
#pragma unroll
        for (int j = 0; j < D; ++j) {
          const float diff = fmaf(-scale[r], e[j], zr[r][j]);  // s z - s e, s e exact: one rounding
          dist = fmaf(diff, diff, dist);
        }
        if (dist < best[r]) {
          best[r] = dist;
          best_idx[r] = tile_begin + code;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t row = first_row + static_cast<int64_t>(r) * kThreads;
    if (row < n) {
      args.part_dist[split_offset + row] = best[r];
      args.part_idx[split_offset + row] = best_idx[r];
    }
  }
}

int padded_dim(int64_t d) { return d <= 4 ? 4 : d <= 8 ? 8 : d <= 16 ? 16 : 32; }

template <typename T, int D>
void launch(const SmallDimArgs& args, int64_t splits, cudaStream_t stream) {
  constexpr int rows_per_block = kThreads * rows_per_thread(D);
  const dim3 grid(static_cast<unsigned>((args.n + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(splits));
  vq_argmin_small_d_kernel<T, D><<<grid, kThreads, 0, stream>>>(args);
  check_launch("vq_argmin_small_d_kernel");
}

template <typename T>
void launch_for_dim(const SmallDimArgs& args, int64_t splits, cudaStream_t stream) {
  switch (padded_dim(args.d)) {
    case 4:
      return launch<T, 4>(args, splits, stream);
    case 8:
      return launch<T, 8>(args, splits, stream);
    case 16:
      return launch<T, 16>(args, splits, stream);
    default:
      return launch<T, 32>(args, splits, stream);
  }
}

}  // namespace

int vq_small_d_rows_per_block(int64_t d) {
  require(d >= 1 && d <= kVqSmallMaxDim, "vq_small_d_rows_per_block: d must be in [1, 32]");
  return kThreads * rows_per_thread(padded_dim(d));
}

void vq_argmin_small_d(std::uintptr_t z, int64_t z_row_stride, std::uintptr_t codebook, int64_t codebook_row_stride,
                       int64_t n, int64_t k, int64_t d, int64_t codes_per_split, int64_t splits,
                       std::uintptr_t part_dist, std::uintptr_t part_idx, int dtype, int device,
                       std::uintptr_t stream) {
  require(d >= 1 && d <= kVqSmallMaxDim, "vq_argmin_small_d: d must be in [1, 32]");
  require(n >= 1 && k >= 1, "vq_argmin_small_d: n and k must be positive");
  require(splits >= 1 && splits <= 65535, "vq_argmin_small_d: splits must be in [1, 65535]");
  require(codes_per_split >= 1 && (splits - 1) * codes_per_split < k && splits * codes_per_split >= k,
          "vq_argmin_small_d: every split must hold at least one code and the splits must cover k");
  require(z_row_stride >= d && codebook_row_stride >= d, "vq_argmin_small_d: row strides must be >= d");
  require((n + vq_small_d_rows_per_block(d) - 1) / vq_small_d_rows_per_block(d) <= 0x7fffffff,
          "vq_argmin_small_d: too many rows");
  const SmallDimArgs args{reinterpret_cast<const void*>(z), z_row_stride, reinterpret_cast<const void*>(codebook),
                          codebook_row_stride, n, k, static_cast<int>(d), codes_per_split,
                          reinterpret_cast<float*>(part_dist), reinterpret_cast<int64_t*>(part_idx)};
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch_for_dim<float>(args, splits, s);
    case DType::Float16:
      return launch_for_dim<__half>(args, splits, s);
    case DType::BFloat16:
      return launch_for_dim<__nv_bfloat16>(args, splits, s);
  }
  require(false, "vq_argmin_small_d: unknown dtype code " + std::to_string(dtype));
}

}  // namespace unimm
