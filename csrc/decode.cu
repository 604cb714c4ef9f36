// Decode attention: one new query token per sequence against its KV cache, split over the cache
// ("flash-decoding").
//
// Memory-bound by design: every cached key and value is read once per call (per query tile of 8
// heads), so the kernel is a pipe from HBM into tensor cores. One CTA serves one (batch row, KV
// head, query tile, split): the up to 8 query heads of the GQA group that share the KV head ride
// in the N dimension of an m16n8k16 mma, keys in M ("swap AB": the group fills N = 8 with no
// padding to 16 rows, and the output accumulator is 8 x D instead of 16 x D).
//   S^T [16 keys x 8 queries] = K [16 keys x D] . Q^T          (A = K rows, B = Q, both row-major)
//   O^T [D x 8 queries]      += V^T [D x 16 keys] . P^T       (A = V^T, B = P^T)
// Each of the 4 warps walks 16-key steps of the CTA's key range (interleaved), loading K and V
// straight from global memory into mma fragments with 16-byte loads: no shared memory and no
// barriers in the loop, latency hidden by several CTAs per SM each with 4 independent warps.
// Prefetch (register double buffering): at D <= 128 a warp issues the loads of its next step
// before it computes the current one, so two steps of K and V (2 x 64D bytes a warp: 32 / 64 KB
// a CTA at D = 64 / 128) are in flight, not one. At D = 256 one step already takes 128
// registers a lane (64 KB a CTA in flight) and a second would not fit the register file: its
// loads come right before each step's math, as without prefetch. ptxas (nvcc 13, no spills):
// D = 64 / 128 / 256 take 128 / 220 / 250 registers on sm_90a, so 4 / 2 / 2 CTAs an SM.
// Paged caches (a block table, as vLLM): a warp step's 16 keys start at a multiple of 16 and
// pages are powers of two >= 16 keys, so a step lies in one page: one page id a step, loaded
// (one broadcast 4-byte load) a step ahead of the K / V loads that need it, so the table adds
// no dependent latency. A page id outside [0, num_pages) is never read through; it makes the
// step's scores NaN, so the row's output is NaN.
// A reduction index may be permuted freely as long as both operands agree, and an output index
// as long as the store undoes it; the layouts below use that to make every load 16 contiguous
// bytes:
//   * S: for k-step 2c + e, logical d 2*tig + {0,1} / 2*tig + 8 + {0,1} is physical
//     d = 32c + 8*tig + 4e + {0,1} / + {2,3}; the thread's 16-byte chunk of a K row (and of Q)
//     is four mma registers.
//   * O^T: in m-tile t = 4h + j, logical row r (lane group g = r % 8, r / 8 in {0,1}) is physical
//     d = 64h + 8g + 2j + r / 8. A thread loads 16 bytes at 64h + 8g of four key rows
//     (2*tig + {0, 1, 8, 9}) and pairs halves of two rows with byte permutes into the A
//     fragments of V^T (two keys, one d).
//   * P^T: the S accumulator (row = key, columns = two queries) is the transpose of the B
//     fragment P^T needs (two keys, one query); movmatrix.trans turns one into the other.
// Online softmax in fp32 per query column: the column max is a 3-shuffle reduction over the 8
// lane groups; the sums stay per thread until the end. The 4 warps merge through shared memory;
// with one split the CTA writes the output, else a normalised fp32 partial and its log2-sum-exp
// go to a workspace that decode_combine_kernel reduces (only the splits a row's length reaches).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common.h"
#include "ops.h"

namespace unimm {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStepKeys = 16;  // keys per warp step: the mma's M
constexpr int kTileQueries = kDecodeQueryTile;  // query heads per CTA: the mma's N
static_assert(kDecodeSplitKeys == kWarps * kStepKeys, "a split holds whole CTA steps");
static_assert(kTileQueries == 8, "the mma's N is 8");
constexpr float kLog2e = 1.4426950408889634f;

struct DecodeArgs {
  const void* q;
  int64_t q_batch_stride, q_head_stride;
  const void* k;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  const void* v;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  const int32_t* lens;
  const int32_t* table;  // paged: [B, >= max_len / page_size] page ids, row stride table_stride; else null
  int64_t table_stride;
  int page_mask, page_shift, num_pages;  // paged: page_size - 1, log2(page_size), pages in the caches
  void* out;
  int64_t out_batch_stride, out_head_stride;
  float* part_out;  // [B, Hq, splits, D] fp32, each split's output normalised by its own sum
  float* part_lse;  // [B, Hq, splits] fp32, log2-sum-exp2 of the split's log2-scaled scores
  int max_len, q_heads, kv_heads, group, q_tiles, keys_per_split, splits;
  float scale;    // score scale (D^-1/2 by default)
  float softcap;  // > 0: scores become softcap * tanh(scale * s / softcap); 0: no cap
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

// The 8x8 16-bit matrix held one row per lane group (row lane / 4, columns 2 * (lane % 4) + {0,1})
// -> its transpose in the same layout.
__device__ __forceinline__ uint32_t transpose_8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// 16 bytes from global memory, or zeros when `ok` is false (keys past the length are never read:
// a cache may hold anything there, NaN included).
__device__ __forceinline__ uint4 load_16b(const void* ptr, bool ok) {
  uint4 value = make_uint4(0u, 0u, 0u, 0u);
  if (ok) value = __ldg(static_cast<const uint4*>(ptr));
  return value;
}

__device__ __forceinline__ float warp_max_over_groups(float x) {  // over the 8 lanes sharing lane % 4
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float warp_sum_over_groups(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

__device__ __forceinline__ int clamped_length(const DecodeArgs& a, int64_t b) {
  return min(max(a.lens[b], 0), a.max_len);  // lengths past the cache are clamped, never read past it
}

// One warp step's operands: K rows step + g and step + g + 8 (16-byte chunks 32c + 8*tig), V rows
// step + 2*tig + {0, 1, 8, 9} (chunks 64h + 8g); `bad`: the step's page id is out of range.
template <int D>
struct KvStep {
  uint4 k_lo[D / 32], k_hi[D / 32], v_rows[4][D / 64];
  bool bad;
};

// The page of key `key` of row b (paged caches; 0 for keys at or past `end`, which are not read).
__device__ __forceinline__ int page_of(const DecodeArgs& a, int64_t b, int key, int end) {
  return key < end ? __ldg(a.table + b * a.table_stride + (key >> a.page_shift)) : 0;
}

// Loads the step starting at key `step` (< end or not: keys at or past `end` load as zeros, never
// read). k_base / v_base: the KV head's cache of row b (contiguous) or of page 0 (paged).
template <typename T, int D, bool kPaged>
__device__ __forceinline__ void load_step(KvStep<D>& t, const DecodeArgs& a, const T* k_base, const T* v_base,
                                          int step, int page, int end, int g, int tig) {
  int64_t k_row0 = static_cast<int64_t>(step) * a.k_row_stride;
  int64_t v_row0 = static_cast<int64_t>(step) * a.v_row_stride;
  t.bad = false;
  if (kPaged) {
    t.bad = page < 0 || page >= a.num_pages;
    const int slot = step & a.page_mask;  // the step's 16 keys are slots slot .. slot + 15 of the page
    const int64_t p = t.bad ? 0 : page;
    k_row0 = p * a.k_batch_stride + static_cast<int64_t>(slot) * a.k_row_stride;
    v_row0 = p * a.v_batch_stride + static_cast<int64_t>(slot) * a.v_row_stride;
  }
  const int key_lo = step + g, key_hi = step + g + 8;
  const T* k_lo_row = k_base + k_row0 + static_cast<int64_t>(g) * a.k_row_stride + 8 * tig;
  const T* k_hi_row = k_lo_row + 8 * a.k_row_stride;
#pragma unroll
  for (int c = 0; c < D / 32; ++c) {
    t.k_lo[c] = load_16b(k_lo_row + 32 * c, key_lo < end && !t.bad);
    t.k_hi[c] = load_16b(k_hi_row + 32 * c, key_hi < end && !t.bad);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int offset = 2 * tig + (r & 1) + 8 * (r >> 1);
    const T* v_row = v_base + v_row0 + static_cast<int64_t>(offset) * a.v_row_stride + 8 * g;
#pragma unroll
    for (int h = 0; h < D / 64; ++h) t.v_rows[r][h] = load_16b(v_row + 64 * h, step + offset < end && !t.bad);
  }
}

// Per-thread online-softmax state of a warp: queries 2*tig and 2*tig + 1, and the O^T accumulator.
template <int D>
struct SoftmaxState {
  float row_max[2];  // log2 domain
  float row_sum[2];  // this thread's share of the sums
  float o[D / 16][4];
};

template <typename T, int D>
__device__ __forceinline__ void compute_step(SoftmaxState<D>& st, const KvStep<D>& t, const uint4 (&q_frag)[D / 32],
                                             const DecodeArgs& a, int step, int end, int g, int tig,
                                             float cap_in, float cap_out, float scale_log2) {
  using Mma = MmaType<T>;
  // s[0], s[1]: key g, queries 2*tig, 2*tig + 1; s[2], s[3]: key g + 8.
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int c = 0; c < D / 32; ++c) {
    Mma::mma(s, t.k_lo[c].x, t.k_hi[c].x, t.k_lo[c].y, t.k_hi[c].y, q_frag[c].x, q_frag[c].y);
    Mma::mma(s, t.k_lo[c].z, t.k_hi[c].z, t.k_lo[c].w, t.k_hi[c].w, q_frag[c].z, q_frag[c].w);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float x = a.softcap > 0.0f ? cap_out * tanhf(s[i] * cap_in) : s[i] * scale_log2;
    const int key = step + g + 8 * (i >> 1);
    s[i] = key < end ? (t.bad ? NAN : x) : -INFINITY;
  }

  // Online softmax per query column. Key `step` is always visible, so the new max is finite, but
  // for a bad page's NaN scores: then the NaN reaches p, the sums and the output.
  float p[4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float new_max = fmaxf(st.row_max[j], warp_max_over_groups(fmaxf(s[j], s[j + 2])));
    const float alpha = exp2f(st.row_max[j] - new_max);
    p[j] = exp2f(s[j] - new_max);
    p[j + 2] = exp2f(s[j + 2] - new_max);
    st.row_sum[j] = st.row_sum[j] * alpha + p[j] + p[j + 2];
    st.row_max[j] = new_max;
#pragma unroll
    for (int m = 0; m < D / 16; ++m) {
      st.o[m][j] *= alpha;  // o[m][0], o[m][2]: query 2*tig; o[m][1], o[m][3]: query 2*tig + 1
      st.o[m][j + 2] *= alpha;
    }
  }

  // P^T B fragments: keys 2*tig + {0,1} (b0) and 8 + 2*tig + {0,1} (b1) of query g.
  const uint32_t p_b0 = transpose_8x8(Mma::pack(p[0], p[1]));
  const uint32_t p_b1 = transpose_8x8(Mma::pack(p[2], p[3]));
#pragma unroll
  for (int h = 0; h < D / 64; ++h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t* r0 = reinterpret_cast<const uint32_t*>(&t.v_rows[0][h]);
      const uint32_t* r1 = reinterpret_cast<const uint32_t*>(&t.v_rows[1][h]);
      const uint32_t* r8 = reinterpret_cast<const uint32_t*>(&t.v_rows[2][h]);
      const uint32_t* r9 = reinterpret_cast<const uint32_t*>(&t.v_rows[3][h]);
      // rows g / g + 8 of m-tile 4h + j are d = 64h + 8g + 2j and that + 1: low / high halves
      Mma::mma(st.o[4 * h + j], __byte_perm(r0[j], r1[j], 0x5410), __byte_perm(r0[j], r1[j], 0x7632),
               __byte_perm(r8[j], r9[j], 0x5410), __byte_perm(r8[j], r9[j], 0x7632), p_b0, p_b1);
    }
  }
}

template <typename T, int D, bool kPaged>
__global__ void __launch_bounds__(kThreads, 2) decode_split_kernel(const DecodeArgs a) {
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64");
  constexpr int kKChunks = D / 32;  // 16-byte chunks of a K row (and of Q) per thread
  constexpr int kVChunks = D / 64;  // 16-byte chunks of a V row per thread
  constexpr int kMTiles = D / 16;   // m-tiles of O^T
  constexpr bool kPrefetch = D <= 128;  // two steps of K / V in registers (see the header)
  constexpr int kStride = kWarps * kStepKeys;  // a warp's steps are this many keys apart
  using Mma = MmaType<T>;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;    // lane group: a row of the mma fragments
  const int tig = lane & 3;   // thread in group: a column pair
  const int q_tile = blockIdx.x % a.q_tiles;
  const int bh = blockIdx.x / a.q_tiles;
  const int kv_head = bh % a.kv_heads;
  const int64_t b = bh / a.kv_heads;
  const int split = blockIdx.y;
  const int queries = min(kTileQueries, a.group - q_tile * kTileQueries);
  const int head0 = kv_head * a.group + q_tile * kTileQueries;  // first query head of the tile

  const int len = clamped_length(a, b);
  const int begin = split * a.keys_per_split;
  const int end = min(len, begin + a.keys_per_split);
  if (begin >= end) {
    // Splits past the row's length hold nothing; decode_combine_kernel reads only the others.
    // A row of length 0 with a single split writes its zero output here.
    if (a.splits == 1) {
      T* out = static_cast<T*>(a.out) + b * a.out_batch_stride;
      for (int i = threadIdx.x; i < queries * D; i += kThreads) {
        out[(head0 + i / D) * a.out_head_stride + i % D] = Mma::from_float(0.0f);
      }
    }
    return;
  }

  // Q as B fragments: query g of the tile, physical d = 32c + 8*tig + [0, 8).
  uint4 q_frag[kKChunks];
  {
    const bool ok = g < queries;
    const char* q_row = static_cast<const char*>(a.q) +
                        (b * a.q_batch_stride + static_cast<int64_t>(head0 + (ok ? g : 0)) * a.q_head_stride) *
                            static_cast<int64_t>(sizeof(T));
#pragma unroll
    for (int c = 0; c < kKChunks; ++c) q_frag[c] = load_16b(q_row + (32 * c + 8 * tig) * sizeof(T), ok);
  }

  const T* k_base = static_cast<const T*>(a.k) + kv_head * a.k_head_stride + (kPaged ? 0 : b * a.k_batch_stride);
  const T* v_base = static_cast<const T*>(a.v) + kv_head * a.v_head_stride + (kPaged ? 0 : b * a.v_batch_stride);
  const float cap_in = a.softcap > 0.0f ? a.scale / a.softcap : 0.0f;
  const float cap_out = a.softcap * kLog2e;
  const float scale_log2 = a.scale * kLog2e;

  SoftmaxState<D> st;
  st.row_max[0] = st.row_max[1] = -INFINITY;
  st.row_sum[0] = st.row_sum[1] = 0.0f;
#pragma unroll
  for (int t = 0; t < kMTiles; ++t) st.o[t][0] = st.o[t][1] = st.o[t][2] = st.o[t][3] = 0.0f;

  // `ahead`: the next step to load, `page`: its page id (read a step before its loads need it).
  int ahead = begin + warp * kStepKeys;
  int page = kPaged ? page_of(a, b, ahead, end) : 0;
  KvStep<D> cur;
  if (kPrefetch) {
    load_step<T, D, kPaged>(cur, a, k_base, v_base, ahead, page, end, g, tig);
    ahead += kStride;
    if (kPaged) page = page_of(a, b, ahead, end);
  }
  for (int step = begin + warp * kStepKeys; step < end; step += kStride) {
    KvStep<D> next;
    load_step<T, D, kPaged>(kPrefetch ? next : cur, a, k_base, v_base, ahead, page, end, g, tig);
    ahead += kStride;
    if (kPaged) page = page_of(a, b, ahead, end);
    compute_step<T, D>(st, cur, q_frag, a, step, end, g, tig, cap_in, cap_out, scale_log2);
    if (kPrefetch) cur = next;
  }

  // Merge the warps: each stores its max, its sum and its unnormalised output per query.
  __shared__ float warp_max[kWarps][kTileQueries];
  __shared__ float warp_sum[kWarps][kTileQueries];
  __shared__ __align__(16) float warp_out[kWarps][kTileQueries][D];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const float total = warp_sum_over_groups(st.row_sum[j]);
    if (g == 0) {
      warp_max[warp][2 * tig + j] = st.row_max[j];
      warp_sum[warp][2 * tig + j] = total;
    }
  }
#pragma unroll
  for (int h = 0; h < kVChunks; ++h) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int d = 64 * h + 8 * g + 2 * j;
      const float* acc = st.o[4 * h + j];
      *reinterpret_cast<float2*>(&warp_out[warp][2 * tig][d]) = make_float2(acc[0], acc[2]);
      *reinterpret_cast<float2*>(&warp_out[warp][2 * tig + 1][d]) = make_float2(acc[1], acc[3]);
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < queries * D; i += kThreads) {
    const int qi = i / D, d = i % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w][qi]);  // finite: warp 0 saw key `begin`
    float total = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float weight = exp2f(warp_max[w][qi] - m);  // 0 for a warp that had no step
      total += weight * warp_sum[w][qi];
      value += weight * warp_out[w][qi][d];
    }
    value /= total;
    const int64_t head = head0 + qi;
    if (a.splits == 1) {
      static_cast<T*>(a.out)[b * a.out_batch_stride + head * a.out_head_stride + d] = Mma::from_float(value);
    } else {
      const int64_t part = (b * a.q_heads + head) * a.splits + split;
      a.part_out[part * D + d] = value;
      if (d == 0) a.part_lse[part] = m + log2f(total);
    }
  }
}

// One block of D threads per (batch row, query head): the splits the row's length reaches,
// weighted by 2^(lse - max lse).
template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeArgs a) {
  __shared__ float weights[kDecodeMaxSplits];
  __shared__ float inv_total;
  const int64_t row = blockIdx.x;  // b * q_heads + head
  const int64_t b = row / a.q_heads;
  const int64_t head = row % a.q_heads;
  const int d = threadIdx.x;
  const int len = clamped_length(a, b);
  const int active = (len + a.keys_per_split - 1) / a.keys_per_split;
  const float* lse = a.part_lse + row * a.splits;

  if (threadIdx.x < 32) {  // one warp: max and sum over at most kDecodeMaxSplits values
    float m = -INFINITY;
    for (int s = threadIdx.x; s < active; s += 32) m = fmaxf(m, lse[s]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float total = 0.0f;
    for (int s = threadIdx.x; s < active; s += 32) {
      weights[s] = exp2f(lse[s] - m);
      total += weights[s];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (threadIdx.x == 0) inv_total = active > 0 ? 1.0f / total : 0.0f;  // length 0: output 0
  }
  __syncthreads();
  const float* part = a.part_out + row * a.splits * D + d;
  float value = 0.0f;
  for (int s = 0; s < active; ++s) value += weights[s] * part[static_cast<int64_t>(s) * D];
  static_cast<T*>(a.out)[b * a.out_batch_stride + head * a.out_head_stride + d] =
      MmaType<T>::from_float(value * inv_total);
}

template <typename T, int D, bool kPaged>
void launch(const DecodeArgs& a, int64_t rows_kv, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows_kv * a.q_tiles), static_cast<unsigned>(a.splits));
  decode_split_kernel<T, D, kPaged><<<grid, kThreads, 0, stream>>>(a);
  check_launch("decode_split_kernel");
  if (a.splits > 1) {
    const int64_t rows = rows_kv / a.kv_heads * a.q_heads;
    decode_combine_kernel<T, D><<<static_cast<unsigned>(rows), D, 0, stream>>>(a);
    check_launch("decode_combine_kernel");
  }
}

struct Launch {
  const DecodeArgs& args;
  int64_t rows_kv;
  cudaStream_t stream;
  template <typename T, int D, bool kPaged>
  void operator()() const { launch<T, D, kPaged>(args, rows_kv, stream); }
};

// Split-kernel CTAs one SM holds at once (registers, static shared memory, threads).
struct Occupancy {
  int* blocks;
  template <typename T, int D, bool kPaged>
  void operator()() const {
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, decode_split_kernel<T, D, kPaged>, kThreads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  }
};

// Calls f.template operator()<T, D, kPaged>() for the runtime (dtype, head_dim, paged); the
// caller has checked dtype and head_dim.
template <typename F>
void dispatch(DType dtype, int64_t head_dim, bool paged, F&& f) {
  auto by_dim = [&](auto type_tag, auto paged_tag) {
    using T = decltype(type_tag);
    constexpr bool kPaged = decltype(paged_tag)::value;
    if (head_dim == 64) return f.template operator()<T, 64, kPaged>();
    if (head_dim == 128) return f.template operator()<T, 128, kPaged>();
    return f.template operator()<T, 256, kPaged>();
  };
  auto by_paged = [&](auto type_tag) {
    return paged ? by_dim(type_tag, std::true_type{}) : by_dim(type_tag, std::false_type{});
  };
  return dtype == DType::Float16 ? by_paged(__half{}) : by_paged(__nv_bfloat16{});
}

bool aligned_16(std::uintptr_t ptr) { return ptr % 16 == 0; }

}  // namespace

void decode_attention(std::uintptr_t q, int64_t q_batch_stride, int64_t q_head_stride, std::uintptr_t k_cache,
                      int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride, std::uintptr_t v_cache,
                      int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride, std::uintptr_t cache_lens,
                      std::uintptr_t block_table, int64_t table_stride, int64_t page_size, int64_t num_pages,
                      std::uintptr_t out, int64_t out_batch_stride, int64_t out_head_stride,
                      std::uintptr_t part_out, std::uintptr_t part_lse, int64_t batch, int64_t q_heads,
                      int64_t kv_heads, int64_t head_dim, int64_t max_len, int64_t keys_per_split, int64_t splits,
                      double scale, double softcap, int dtype, int device, std::uintptr_t stream) {
  require(head_dim == 64 || head_dim == 128 || head_dim == 256, "decode_attention: head_dim must be 64, 128 or 256");
  require(dtype == static_cast<int>(DType::Float16) || dtype == static_cast<int>(DType::BFloat16),
          "decode_attention: dtype must be float16 or bfloat16, got code " + std::to_string(dtype));
  require(batch >= 1 && kv_heads >= 1 && q_heads >= kv_heads && q_heads % kv_heads == 0,
          "decode_attention: need batch >= 1 and q_heads a positive multiple of kv_heads");
  require(max_len >= 1 && max_len <= 0x7fffffff - keys_per_split, "decode_attention: max_len out of range");
  require(keys_per_split >= 1 && keys_per_split % kDecodeSplitKeys == 0,
          "decode_attention: keys_per_split must be a positive multiple of DECODE_SPLIT_KEYS");
  require(splits >= 1 && splits <= kDecodeMaxSplits && (splits - 1) * keys_per_split < max_len &&
              splits * keys_per_split >= max_len,
          "decode_attention: splits must be in [1, DECODE_MAX_SPLITS], each holding part of the cache");
  require(splits == 1 || (part_out != 0 && part_lse != 0), "decode_attention: splits > 1 needs the workspace");
  const bool paged = page_size != 0;
  // a warp step (16 keys from a multiple of 16) must lie in one page
  require(!paged || (page_size >= 16 && page_size <= 0x40000000 && (page_size & (page_size - 1)) == 0 &&
                     block_table != 0 && num_pages >= 0 && num_pages <= 0x7fffffff && max_len % page_size == 0),
          "decode_attention: paged caches need a block table, page_size a power of two >= 16 dividing max_len "
          "and num_pages in [0, 2^31)");
  const int64_t group = q_heads / kv_heads;
  const int64_t q_tiles = (group + kTileQueries - 1) / kTileQueries;
  require(batch * kv_heads * q_tiles <= 0x7fffffff && batch * q_heads <= 0x7fffffff,
          "decode_attention: too many (batch, head) rows");
  // 16-byte loads: every row start must be 16-byte aligned (strides in elements of 2 bytes)
  for (const int64_t stride : {q_batch_stride, q_head_stride, k_batch_stride, k_row_stride, k_head_stride,
                               v_batch_stride, v_row_stride, v_head_stride}) {
    require(stride % 8 == 0, "decode_attention: q / cache strides must be multiples of 8 elements");
  }
  require(aligned_16(q) && aligned_16(k_cache) && aligned_16(v_cache),
          "decode_attention: q and the caches must be 16-byte aligned");
  int page_shift = 0;
  while (paged && (int64_t{1} << page_shift) < page_size) ++page_shift;
  const DecodeArgs args{reinterpret_cast<const void*>(q), q_batch_stride, q_head_stride,
                        reinterpret_cast<const void*>(k_cache), k_batch_stride, k_row_stride, k_head_stride,
                        reinterpret_cast<const void*>(v_cache), v_batch_stride, v_row_stride, v_head_stride,
                        reinterpret_cast<const int32_t*>(cache_lens), reinterpret_cast<const int32_t*>(block_table),
                        table_stride, static_cast<int>(paged ? page_size - 1 : 0), page_shift,
                        static_cast<int>(num_pages), reinterpret_cast<void*>(out),
                        out_batch_stride, out_head_stride, reinterpret_cast<float*>(part_out),
                        reinterpret_cast<float*>(part_lse), static_cast<int>(max_len), static_cast<int>(q_heads),
                        static_cast<int>(kv_heads), static_cast<int>(group), static_cast<int>(q_tiles),
                        static_cast<int>(keys_per_split), static_cast<int>(splits), static_cast<float>(scale),
                        static_cast<float>(softcap)};
  DeviceGuard guard(device);
  dispatch(static_cast<DType>(dtype), head_dim, paged, Launch{args, batch * kv_heads, as_stream(stream)});
}

int decode_attention_occupancy(int64_t head_dim, int dtype, bool paged, int device) {
  require(head_dim == 64 || head_dim == 128 || head_dim == 256,
          "decode_attention_occupancy: head_dim must be 64, 128 or 256");
  require(dtype == static_cast<int>(DType::Float16) || dtype == static_cast<int>(DType::BFloat16),
          "decode_attention_occupancy: dtype must be float16 or bfloat16, got code " + std::to_string(dtype));
  DeviceGuard guard(device);
  int blocks = 0;
  dispatch(static_cast<DType>(dtype), head_dim, paged, Occupancy{&blocks});
  return blocks;
}

}  // namespace unimm
