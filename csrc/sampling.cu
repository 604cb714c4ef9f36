// sample_tokens: guidance, temperature, top-k, top-p and the inverse-CDF draw in one kernel, one
// CTA per output row, or, when rows are few, the same passes as a sequence of launches over several
// CTAs per row (below, "several CTAs per row"). Every rule is the one spelled out in
// unimm/kernels/reference/sampling.py; unimm/kernels/sampling.py describes the passes and why they
// are shaped this way.
//
// A row is never written back: each pass re-reads the cond (and uncond) logits of the vocab block
// and recomputes z = (g - max g) * inv_t from the guided logit g on the fly. An fp32 scratch copy
// would move as many bytes as the bf16 cond + uncond pair it replaces (more without guidance) and
// add a write.
//
// Subtracting the row max before the temperature keeps z in [-inf, 0] with its max exactly 0, so
// neither huge logits nor a tiny temperature overflow (z = -inf only where the weight is 0). NaN
// guided logits are not candidates: load() clears their bit in the valid mask, so every pass skips
// them as it skips elements outside the block; a row with no candidate gets token -1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "convert.cuh"
#include "ops.h"

namespace unimm {
namespace {

using u64 = unsigned long long;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 8;   // consecutive elements per thread and load: 16 B of fp16/bf16, 32 B of fp32
constexpr int kBins = 256;  // histogram bins of one selection pass
constexpr int kBinsPerLane = kBins / 32;
constexpr int kMaxKeyStages = 4;  // 8 bits per stage resolve any 32-bit key interval
constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint32_t kNegInfKey = 0x007fffffu;  // order_key(-inf): the smallest key of a non-NaN value
constexpr uint32_t kPosInfKey = 0xff800000u;  // order_key(+inf): the largest
constexpr float kFixedPointScale = static_cast<float>(1ull << kSamplingFixedPointBits);
constexpr float kMassWindow = 32.0f;  // tokens more than this below the max weigh 0 (exp(-28.4) * 2^40 < 1/2)

static_assert(kBins == 32 * kBinsPerLane, "one warp scans the bins");
static_assert(kSamplingFixedPointBits == 40, "kMassWindow assumes 40 fixed-point bits");

// kChunk consecutive elements from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load_vector(const T* p, float out[kChunk]) {
  static_assert(sizeof(T) == 2, "16-bit types: one 16-byte load");
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) out[j] = to_float(values[j]);
}
template <>
__device__ __forceinline__ void load_vector<float>(const float* p, float out[kChunk]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// Keys that order floats as unsigned integers: key(a) < key(b) iff a < b. -0 is mapped to +0 so
// equal values have equal keys.
__device__ __forceinline__ uint32_t order_key(float z) {
  uint32_t bits = __float_as_uint(z);
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Integer weight of a token: round(p * 2^40), p = 1 at the row max m, else exp(z - m) (m = 0 for
// the tempered z of this kernel: p = exp(z)).
__device__ __forceinline__ u64 fixed_mass(float z, float m) {
  const float p = z == m ? 1.0f : expf(__fsub_rn(z, m));
  return __float2ull_rn(__fmul_rn(p, kFixedPointScale));
}

struct SampleArgs {
  const void* logits;
  int64_t row_stride;     // elements between rows
  int64_t uncond_offset;  // elements from an output row's cond row to its uncond row (guidance)
  int64_t lo;             // the vocab block is [lo, lo + n)
  int64_t n;
  bool cfg;
  bool greedy;
  float cfg_scale;
  float inv_temperature;
  int64_t top_k;  // active when < n
  double top_p;   // active when < 1
  const float* uniforms;
  int64_t* tokens;
};

// The guided values g, or the tempered values z = g == max ? 0 : (g - max) * inv_t once the max is
// set, of one output row, chunk by chunk. Chunk c holds the elements
// [first + c * kChunk, first + (c + 1) * kChunk); first is lo rounded down to a chunk boundary
// when rows are 16-byte aligned, so whole chunks inside the block load as vectors.
template <typename T, bool kAligned>
class RowReader {
 public:
  __device__ RowReader(const SampleArgs& args, int64_t out_row)
      : cond_(static_cast<const T*>(args.logits) + out_row * args.row_stride),
        uncond_(cond_ + args.uncond_offset),
        lo_(args.lo),
        hi_(args.lo + args.n),
        first_(kAligned ? args.lo & ~static_cast<int64_t>(kChunk - 1) : args.lo),
        cfg_(args.cfg),
        cfg_scale_(args.cfg_scale),
        inv_temperature_(args.inv_temperature),
        max_(0.0f) {}

  // The row's largest candidate g, for the tempered loads.
  __device__ void set_max(float m) { max_ = m; }

  // The tempered value of a guided logit g <= max (not NaN): in [-inf, 0], 0 exactly at the max.
  __device__ float temper(float g) const {
    return g == max_ ? 0.0f : __fmul_rn(__fsub_rn(g, max_), inv_temperature_);
  }

  __device__ int64_t num_chunks() const { return (hi_ - first_ + kChunk - 1) / kChunk; }

  // Index of element j of chunk c relative to lo.
  __device__ int64_t index(int64_t chunk, int j) const { return first_ + chunk * kChunk + j - lo_; }

  // Fills z for chunk c (kTempered: tempered values, else the guided logits); returns the mask of
  // its candidates: elements that lie in [lo, hi) and whose guided logit is not NaN.
  template <bool kTempered = true>
  __device__ unsigned load(int64_t chunk, float z[kChunk]) const {
    const int64_t start = first_ + chunk * kChunk;
    float c[kChunk];
    float u[kChunk];
    unsigned valid = 0;
    if (kAligned && start >= lo_ && start + kChunk <= hi_) {
      load_vector(cond_ + start, c);
      if (cfg_) load_vector(uncond_ + start, u);
      valid = (1u << kChunk) - 1;
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const int64_t i = start + j;
        const bool inside = i >= lo_ && i < hi_;
        c[j] = inside ? to_float(cond_[i]) : 0.0f;
        u[j] = inside && cfg_ ? to_float(uncond_[i]) : 0.0f;
        valid |= inside ? 1u << j : 0u;
      }
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      // Each operation rounded on its own (no FMA contraction), as the reference's torch ops.
      const float g = !cfg_ || c[j] == u[j] ? c[j] : __fadd_rn(u[j], __fmul_rn(cfg_scale_, __fsub_rn(c[j], u[j])));
      if (isnan(g)) valid &= ~(1u << j);
      z[j] = kTempered ? temper(g) : g;
    }
    return valid;
  }

 private:
  const T* cond_;
  const T* uncond_;
  int64_t lo_;
  int64_t hi_;
  int64_t first_;
  bool cfg_;
  float cfg_scale_;
  float inv_temperature_;
  float max_;
};

// ---- block-wide helpers ----------------------------------------------------------------------

template <typename V, typename Op>
__device__ __forceinline__ V warp_reduce(V value, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// Every thread gets op over all threads' values, combined in one fixed order (deterministic).
template <typename V, typename Op>
__device__ V block_reduce(V value, Op op, V* scratch) {
  value = warp_reduce(value, op);
  __syncthreads();  // the previous user of scratch is done
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < kWarps; ++w) value = op(value, scratch[w]);
  return value;
}

// Exclusive prefix sum over threads in thread order; `total` gets the sum of all.
__device__ u64 block_exclusive_scan(u64 value, u64* scratch, u64& total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  u64 inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const u64 other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  u64 before = 0;
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    const u64 sum = scratch[w];
    if (w < warp) before += sum;
    total += sum;
  }
  return before + inclusive - value;
}

// ---- selection --------------------------------------------------------------------------------

// Per-bin token count and total integer weight. Shared-memory atomics are native for 32 bits
// only (64-bit adds are compare-and-swap loops), so a weight is added as two 32-bit halves and the
// low half's carries go to the high half: the totals are exact and independent of thread order.
struct Histogram {
  unsigned count[kBins];
  unsigned mass_lo[kBins];
  unsigned mass_hi[kBins];

  __device__ void clear() {
    for (int i = threadIdx.x; i < kBins; i += kThreads) count[i] = mass_lo[i] = mass_hi[i] = 0;
  }
  __device__ void add(int bin, u64 mass) {
    atomicAdd(&count[bin], 1u);
    if (mass != 0) {
      const unsigned low = static_cast<unsigned>(mass);
      const unsigned old = atomicAdd(&mass_lo[bin], low);
      const unsigned high = static_cast<unsigned>(mass >> 32) + (old + low < old ? 1u : 0u);
      if (high != 0) atomicAdd(&mass_hi[bin], high);
    }
  }
  __device__ u64 mass(int bin) const { return (static_cast<u64>(mass_hi[bin]) << 32) + mass_lo[bin]; }
};

// First-stage bins: linear in value between base and base + 256 / scale, so tokens spread over the
// bins (bins of key bits would gather a row's logits into a few exponents, and the atomics of a
// warp into a few addresses). Non-decreasing in z, so each bin holds one interval of keys.
struct ValueBins {
  float base;
  float scale;  // 0: every value in bin 0

  __device__ int operator()(float z) const {
    if (!(scale > 0.0f)) return 0;
    const float x = __fmul_rn(__fsub_rn(z, base), scale);
    if (!(x > 0.0f)) return 0;
    return x >= static_cast<float>(kBins - 1) ? kBins - 1 : static_cast<int>(x);
  }

  // The smallest key whose value lands in a bin >= `bin`; kPosInfKey + 1 when none does.
  __device__ u64 first_key_at_least(int bin) const {
    if ((*this)(key_value(kNegInfKey)) >= bin) return kNegInfKey;
    if ((*this)(key_value(kPosInfKey)) < bin) return static_cast<u64>(kPosInfKey) + 1;
    uint32_t below = kNegInfKey;  // bin(below) < bin <= bin(at)
    uint32_t at = kPosInfKey;
    while (at - below > 1) {
      const uint32_t mid = below + (at - below) / 2;
      if ((*this)(key_value(mid)) >= bin) {
        at = mid;
      } else {
        below = mid;
      }
    }
    return at;
  }
};

__device__ ValueBins value_bins(float low, float high) {
  const float range = __fsub_rn(high, low);
  return ValueBins{low, range > 0.0f && isfinite(range) ? __fdiv_rn(static_cast<float>(kBins), range) : 0.0f};
}

// The state of one selection, shared by the block between passes.
struct SelectState {
  uint32_t low_key;   // the boundary lies in keys [low_key, high_key]
  uint32_t high_key;
  u64 above;          // weight of the participants with keys above high_key
  u64 target;
  u64 bin_weight;     // of the last chosen bin
  unsigned bin_count;
  int bin;
  int resolved;       // the survivors are exactly the keys >= low_key
};

struct Shared {
  Histogram hist;
  SelectState select;
  u64 scratch64[kWarps];
  uint32_t scratch32[kWarps];
  float scratchf[kWarps];
  int64_t found;
  u64 before;  // several CTAs per row: the weight of the splits before this CTA's
  bool last;   // several CTAs per row: this CTA arrived last
};

// Warp 0: of the bins taken from the highest down, the first at which the weight so far (starting
// at state.above) reaches state.target; stores it with the weight above it. Counts are the weights
// when `by_mass` is false.
__device__ void pick_bin(Shared& sh, bool by_mass) {
  const int lane = threadIdx.x % 32;
  const u64 above = sh.select.above;
  const u64 target = sh.select.target;
  u64 weights[kBinsPerLane];
  u64 lane_sum = 0;
#pragma unroll
  for (int i = 0; i < kBinsPerLane; ++i) {
    const int bin = kBins - 1 - (lane * kBinsPerLane + i);
    weights[i] = by_mass ? sh.hist.mass(bin) : sh.hist.count[bin];
    lane_sum += weights[i];
  }
  u64 inclusive = lane_sum;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const u64 other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  const unsigned reached = __ballot_sync(kFullMask, above + inclusive >= target);
  // The target is always reached (each chosen bin carries it); the last lane is a safe default.
  const int owner = reached != 0 ? __ffs(reached) - 1 : 31;
  if (lane == owner) {
    u64 running = above + inclusive - lane_sum;
    int chosen = kBinsPerLane - 1;
    u64 chosen_above = 0;
    u64 chosen_weight = 0;
    bool done = false;
#pragma unroll
    for (int i = 0; i < kBinsPerLane; ++i) {  // unrolled: weights stays in registers
      if (!done && (running + weights[i] >= target || i == kBinsPerLane - 1)) {
        done = true;
        chosen = i;
        chosen_above = running;
        chosen_weight = weights[i];
      }
      running += weights[i];
    }
    const int bin = kBins - 1 - (lane * kBinsPerLane + chosen);
    sh.select.bin = bin;
    sh.select.above = chosen_above;
    sh.select.bin_weight = chosen_weight;
    sh.select.bin_count = sh.hist.count[bin];
  }
  __syncwarp();
}

// Smallest nucleus weight: clamp(ceil(top_p * total), 1, total), the product in float64.
__device__ u64 nucleus_need(double top_p, u64 total) {
  const double want = ceil(__dmul_rn(top_p, __ull2double_rn(total)));
  const u64 need = want < 1.0 ? 1ull : __double2ull_rz(want);
  return need < total ? need : total;
}

struct Selection {
  uint32_t threshold;  // the survivors are the participants with keys >= threshold
  u64 weight;          // their total weight
};

// The chunks [begin, end) of a row that one CTA reads: the whole row, or one split of it.
struct ChunkRange {
  int64_t begin;
  int64_t end;
};

__device__ ChunkRange split_range(int64_t num_chunks, int split, int splits) {
  const int64_t per = (num_chunks + splits - 1) / splits;
  const int64_t begin = min(num_chunks, split * per);
  return ChunkRange{begin, min(num_chunks, begin + per)};
}

// Adds the participants of one selection stage in `range` to sh.hist: keys in [low_key, high_key]
// and >= floor_key, and positive weight when kByMass. Stage 0 bins by value, later stages by the
// 8-bit digit of the key's offset in the interval at `shift`.
template <typename T, bool kAligned, bool kByMass>
__device__ void fill_histogram(const RowReader<T, kAligned>& row, Shared& sh, ChunkRange range, float m, int stage,
                               uint32_t low_key, uint32_t high_key, int shift, uint32_t floor_key,
                               const ValueBins bins) {
  sh.hist.clear();
  __syncthreads();
  for (int64_t chunk = range.begin + threadIdx.x; chunk < range.end; chunk += kThreads) {
    float z[kChunk];
    const unsigned valid = row.load(chunk, z);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const uint32_t key = order_key(z[j]);
      if (!(valid >> j & 1u) || key < floor_key || key < low_key || key > high_key) continue;
      const u64 mass = kByMass ? fixed_mass(z[j], m) : 0;
      if (kByMass && mass == 0) continue;
      sh.hist.add(stage == 0 ? bins(z[j]) : static_cast<int>((key - low_key) >> shift), mass);
    }
  }
  __syncthreads();
}

__device__ int digit_shift(uint32_t low_key, uint32_t high_key) {
  const uint32_t span = high_key - low_key;
  return span < kBins ? 0 : 32 - __clz(span) - 8;
}

// Warp 0, once sh.hist holds the whole row's histogram of a stage: sets the target (stage 0),
// picks the bin holding the boundary and narrows sh.select to its key interval, resolved when the
// bin is wholly kept (a single key, a single token, or with counts exactly the target reached) or
// after the last stage.
template <bool kByMass>
__device__ void finish_stage(Shared& sh, int stage, uint32_t low_key, uint32_t high_key, int shift, int64_t top_k,
                             double top_p, const ValueBins bins) {
  if (stage == 0) {
    if (threadIdx.x == 0) sh.select.above = 0;
    if (kByMass) {
      u64 total = 0;
#pragma unroll
      for (int i = 0; i < kBinsPerLane; ++i) total += sh.hist.mass(threadIdx.x * kBinsPerLane + i);
      total = warp_reduce(total, [](u64 a, u64 b) { return a + b; });
      if (threadIdx.x == 0) sh.select.target = nucleus_need(top_p, total);
    } else if (threadIdx.x == 0) {
      sh.select.target = static_cast<u64>(top_k);
    }
    __syncwarp();
  }
  pick_bin(sh, kByMass);
  if (threadIdx.x == 0) {
    SelectState& s = sh.select;
    u64 low;
    u64 high;
    if (stage == 0) {
      low = bins.first_key_at_least(s.bin);
      high = bins.first_key_at_least(s.bin + 1) - 1;
    } else {
      low = low_key + (static_cast<u64>(s.bin) << shift);
      high = min(static_cast<u64>(high_key), low + (1ull << shift) - 1);
    }
    s.low_key = static_cast<uint32_t>(low);
    s.high_key = static_cast<uint32_t>(high);
    s.resolved = low == high || s.bin_count == 1 || (!kByMass && s.above + s.bin_weight == s.target) ||
                 stage == kMaxKeyStages;
  }
}

// Finds the largest key t such that the participants with keys >= t weigh at least the target
// (kByMass: integer weights and target nucleus_need(top_p, total weight); else counts and target
// top_k). Participants: keys >= floor_key, and positive weight when kByMass. One pass with value
// bins, then up to kMaxKeyStages passes with 8-bit digits of the key's offset in the chosen
// interval; a pass ends the search early when its chosen bin is wholly kept.
template <typename T, bool kAligned, bool kByMass>
__device__ Selection select_threshold(const RowReader<T, kAligned>& row, Shared& sh, float m, uint32_t floor_key,
                                      int64_t top_k, double top_p, const ValueBins bins) {
  const ChunkRange whole{0, row.num_chunks()};
  for (int stage = 0; stage <= kMaxKeyStages; ++stage) {
    const uint32_t low_key = stage == 0 ? kNegInfKey : sh.select.low_key;
    const uint32_t high_key = stage == 0 ? kPosInfKey : sh.select.high_key;
    const int shift = digit_shift(low_key, high_key);
    fill_histogram<T, kAligned, kByMass>(row, sh, whole, m, stage, low_key, high_key, shift, floor_key, bins);
    if (threadIdx.x < 32) finish_stage<kByMass>(sh, stage, low_key, high_key, shift, top_k, top_p, bins);
    __syncthreads();
    if (sh.select.resolved) break;
  }
  // Keys below floor_key in the chosen interval belong to non-participants: they stay out.
  return Selection{max(sh.select.low_key, floor_key), sh.select.above + sh.select.bin_weight};
}

// The survivors' (key >= threshold) total weight in `range`, in every thread.
template <typename T, bool kAligned>
__device__ u64 survivor_weight(const RowReader<T, kAligned>& row, Shared& sh, ChunkRange range, float m,
                               uint32_t threshold) {
  u64 mass = 0;
  for (int64_t chunk = range.begin + threadIdx.x; chunk < range.end; chunk += kThreads) {
    float z[kChunk];
    const unsigned valid = row.load(chunk, z);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if ((valid >> j & 1u) && order_key(z[j]) >= threshold) mass += fixed_mass(z[j], m);
    }
  }
  return block_reduce(mass, [](u64 a, u64 b) { return a + b; }, sh.scratch64);
}

// Inverse CDF: the first survivor (key >= threshold) of `range` in index order whose running
// weight (from the range's start) exceeds target; tiles of kThreads chunks, a block scan per tile,
// stopping at the tile that holds it. -1 when the range's survivors weigh at most target.
template <typename T, bool kAligned>
__device__ int64_t draw(const RowReader<T, kAligned>& row, Shared& sh, ChunkRange range, float m, uint32_t threshold,
                        u64 target) {
  if (threadIdx.x == 0) sh.found = -1;
  u64 base = 0;
  for (int64_t tile = range.begin; tile < range.end; tile += kThreads) {
    const int64_t chunk = tile + threadIdx.x;
    u64 weights[kChunk];
    u64 sum = 0;
    float z[kChunk];
    const unsigned valid = chunk < range.end ? row.load(chunk, z) : 0u;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      weights[j] = (valid >> j & 1u) && order_key(z[j]) >= threshold ? fixed_mass(z[j], m) : 0;
      sum += weights[j];
    }
    u64 tile_total;
    const u64 before = base + block_exclusive_scan(sum, sh.scratch64, tile_total);
    if (before <= target && target - before < sum) {
      u64 running = before;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        running += weights[j];
        if (running > target) {
          sh.found = row.index(chunk, j);
          break;
        }
      }
    }
    __syncthreads();
    if (sh.found >= 0) break;
    base += tile_total;
  }
  return sh.found;
}

// Pass 1, on the guided logits g of `range`: the max (as a key; 0 when there is no candidate), the
// smallest finite value, and for greedy rows the best (key, lowest index) packed so that one
// unsigned max finds it (0: no candidate). Block-reduced into every thread (best only when greedy).
struct Extremes {
  uint32_t max_key;
  float min_finite;
  u64 best;
};

template <typename T, bool kAligned>
__device__ Extremes row_extremes(const RowReader<T, kAligned>& row, Shared& sh, ChunkRange range, bool greedy) {
  Extremes e{0, INFINITY, 0};
  for (int64_t chunk = range.begin + threadIdx.x; chunk < range.end; chunk += kThreads) {
    float z[kChunk];
    const unsigned valid = row.template load<false>(chunk, z);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (!(valid >> j & 1u)) continue;
      const uint32_t key = order_key(z[j]);
      e.max_key = max(e.max_key, key);
      if (isfinite(z[j])) e.min_finite = fminf(e.min_finite, z[j]);
      const u64 packed = (static_cast<u64>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(row.index(chunk, j)));
      e.best = max(e.best, packed);
    }
  }
  if (greedy) {
    e.best = block_reduce(e.best, [](u64 a, u64 b) { return max(a, b); }, sh.scratch64);
    return e;
  }
  e.max_key = block_reduce(e.max_key, [](uint32_t a, uint32_t b) { return max(a, b); }, sh.scratch32);
  e.min_finite = block_reduce(e.min_finite, [](float a, float b) { return fminf(a, b); }, sh.scratchf);
  return e;
}

__device__ int64_t greedy_token(const SampleArgs& args, u64 best) {
  return best == 0 ? -1 : args.lo + (0xffffffffu - static_cast<uint32_t>(best));
}

// The draw's target: min(floor(u * total), total - 1), the product in float64.
__device__ u64 draw_target(float uniform, u64 total) {
  const u64 target = __double2ull_rz(__dmul_rn(static_cast<double>(uniform), __ull2double_rn(total)));
  return target < total ? target : total - 1;
}

// The low end of the first top-k stage's value bins: the tempered smallest finite logit.
template <typename T, bool kAligned>
__device__ float tempered_low(const RowReader<T, kAligned>& row, float min_finite) {
  return isfinite(min_finite) ? row.temper(min_finite) : 0.0f;
}

// First-stage value bins of a selection: top-k over [low, 0]; top-p over the window where weights
// are non-zero.
template <bool kByMass>
__device__ ValueBins selection_bins(float low) {
  return kByMass ? value_bins(-kMassWindow, 0.0f) : value_bins(low, 0.0f);
}

// ---- one CTA per row ----------------------------------------------------------------------------

// kGreedy a template argument: the sampling instantiation then holds no per-thread argmax (with it,
// ptxas spilled at the 64-register cap of 1024 threads).
template <typename T, bool kAligned, bool kGreedy>
__global__ void __launch_bounds__(kThreads) sample_tokens_kernel(const SampleArgs args) {
  __shared__ Shared sh;
  const int64_t out_row = blockIdx.x;
  RowReader<T, kAligned> row(args, out_row);
  const ChunkRange whole{0, row.num_chunks()};

  const Extremes e = row_extremes(row, sh, whole, kGreedy);
  if (kGreedy) {
    if (threadIdx.x == 0) args.tokens[out_row] = greedy_token(args, e.best);
    return;
  }
  if (e.max_key == 0) {  // no candidate (every guided logit NaN): the same in every thread
    if (threadIdx.x == 0) args.tokens[out_row] = -1;
    return;
  }
  row.set_max(key_value(e.max_key));
  // From here on z is tempered: its max is m = 0, and min_finite maps to the low end of the values.
  const float m = 0.0f;
  uint32_t threshold = 0;  // survivors: keys >= threshold
  u64 survivor_mass = 0;
  bool mass_known = false;
  if (args.top_k < args.n) {
    threshold = select_threshold<T, kAligned, false>(row, sh, m, 0, args.top_k, 0.0,
                                                     selection_bins<false>(tempered_low(row, e.min_finite)))
                    .threshold;
  }
  if (args.top_p < 1.0) {
    const Selection nucleus =
        select_threshold<T, kAligned, true>(row, sh, m, threshold, 0, args.top_p, selection_bins<true>(0.0f));
    threshold = nucleus.threshold;
    survivor_mass = nucleus.weight;
    mass_known = true;
  }
  if (!mass_known) survivor_mass = survivor_weight(row, sh, whole, m, threshold);
  // The row max always survives with weight 2^40, so survivor_mass > 0.
  const int64_t found = draw(row, sh, whole, m, threshold, draw_target(args.uniforms[out_row], survivor_mass));
  if (threadIdx.x == 0) args.tokens[out_row] = args.lo + (found >= 0 ? found : 0);
}

// ---- several CTAs per row -----------------------------------------------------------------------
//
// When rows are few, each row's chunks are split over `splits` CTAs (grid [splits, rows_out]) and
// the passes of the one-CTA kernel become launches: the row max, each selection stage, the
// survivors' weight per split, the draw. A CTA adds its partial result to its row's state in global
// memory with integer atomics (max / min as keys, counts and weights as exact integer sums, so the
// totals do not depend on the order of arrival); the last CTA of a row to arrive (a counter behind
// a fence) finishes the pass exactly as the one-CTA kernel does (the same finish_stage) and clears
// the histogram for the next stage. Every later launch reads the finished state, so the rows get
// the same thresholds, weights and tokens as with one CTA. Stages a row has already resolved
// return at once; launches never depend on data (graph-capturable, no host synchronisation).

// A selection stage's histogram of the whole row, summed over the splits.
struct RowHistogram {
  unsigned count[kBins];
  u64 mass[kBins];
};

// One row's state between launches (zeroed before the first).
struct RowState {
  RowHistogram hist;
  SelectState select[2];    // top-k, top-p
  u64 best;                 // greedy: max of (key, ~index)
  uint32_t max_key;         // max over the row's candidates (0: none)
  uint32_t min_finite_not;  // ~order_key(smallest finite g), max-reduced (so zeroed state is "none yet")
  uint32_t arrived;         // CTAs done with the current launch
  uint32_t topk_threshold;  // the top-k survivors' smallest key (0: all)
  uint32_t threshold;       // the final survivors' smallest key
  int done;                 // the token is written (no candidate): later launches skip the row
};
static_assert(sizeof(RowState) <= kSamplingRowStateBytes, "RowState must fit its workspace slot");

struct SplitArgs {
  RowState* states;  // [rows_out], kSamplingRowStateBytes apart
  u64* partials;     // [rows_out, splits]: each split's survivor weight
  int splits;
};

__device__ RowState& row_state(const SplitArgs& split, int64_t out_row) {
  return *reinterpret_cast<RowState*>(reinterpret_cast<char*>(split.states) + out_row * kSamplingRowStateBytes);
}

// Called by every thread after its atomics on the row state: true in the CTA that arrives last,
// which then sees every other CTA's atomics (each fenced before its arrival). Resets the counter.
__device__ bool arrive_last(RowState& state, int splits, Shared& sh) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(&state.arrived, 1u) == static_cast<unsigned>(splits - 1);
    if (last) atomicExch(&state.arrived, 0u);
    sh.last = last;
  }
  __syncthreads();
  if (!sh.last) return false;
  __threadfence();
  return true;
}

template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) split_extremes_kernel(const SampleArgs args, const SplitArgs split) {
  __shared__ Shared sh;
  const int64_t out_row = blockIdx.y;
  RowState& state = row_state(split, out_row);
  RowReader<T, kAligned> row(args, out_row);
  const Extremes e = row_extremes(row, sh, split_range(row.num_chunks(), blockIdx.x, split.splits), args.greedy);
  if (threadIdx.x == 0) {
    if (args.greedy) {
      atomicMax(&state.best, e.best);
    } else {
      atomicMax(&state.max_key, e.max_key);
      atomicMax(&state.min_finite_not, ~order_key(e.min_finite));
    }
  }
  if (!arrive_last(state, split.splits, sh) || threadIdx.x != 0) return;
  if (args.greedy) {
    args.tokens[out_row] = greedy_token(args, __ldcg(&state.best));
  } else if (__ldcg(&state.max_key) == 0) {  // no candidate
    args.tokens[out_row] = -1;
    state.done = 1;
  }
}

// One stage of a selection (kByMass: top-p, else top-k) over the CTA's split.
template <typename T, bool kAligned, bool kByMass>
__global__ void __launch_bounds__(kThreads) split_select_kernel(const SampleArgs args, const SplitArgs split,
                                                                 int stage) {
  __shared__ Shared sh;
  const int64_t out_row = blockIdx.y;
  RowState& state = row_state(split, out_row);
  SelectState& select = state.select[kByMass];
  if (state.done || (stage > 0 && select.resolved)) return;
  RowReader<T, kAligned> row(args, out_row);
  row.set_max(key_value(state.max_key));
  const float m = 0.0f;
  const ValueBins bins = selection_bins<kByMass>(tempered_low(row, key_value(~state.min_finite_not)));
  const uint32_t floor_key = kByMass ? state.topk_threshold : 0u;
  const uint32_t low_key = stage == 0 ? kNegInfKey : select.low_key;
  const uint32_t high_key = stage == 0 ? kPosInfKey : select.high_key;
  const int shift = digit_shift(low_key, high_key);
  fill_histogram<T, kAligned, kByMass>(row, sh, split_range(row.num_chunks(), blockIdx.x, split.splits), m, stage,
                                       low_key, high_key, shift, floor_key, bins);
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    if (sh.hist.count[i] != 0) atomicAdd(&state.hist.count[i], sh.hist.count[i]);
    const u64 mass = sh.hist.mass(i);
    if (mass != 0) atomicAdd(&state.hist.mass[i], mass);
  }
  if (!arrive_last(state, split.splits, sh)) return;
  // The last CTA: the row's histogram into shared memory (clearing it for the next stage), then the
  // one-CTA kernel's finish.
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    const u64 mass = __ldcg(&state.hist.mass[i]);
    sh.hist.count[i] = __ldcg(&state.hist.count[i]);
    sh.hist.mass_lo[i] = static_cast<unsigned>(mass);
    sh.hist.mass_hi[i] = static_cast<unsigned>(mass >> 32);
    state.hist.count[i] = 0;
    state.hist.mass[i] = 0;
  }
  if (threadIdx.x == 0) sh.select = select;
  __syncthreads();
  if (threadIdx.x < 32) finish_stage<kByMass>(sh, stage, low_key, high_key, shift, args.top_k, args.top_p, bins);
  __syncthreads();
  if (threadIdx.x == 0) {
    select = sh.select;
    if (sh.select.resolved) {
      const uint32_t threshold = max(sh.select.low_key, floor_key);
      if (!kByMass) state.topk_threshold = threshold;
      state.threshold = threshold;
    }
  }
}

// Each split's survivor weight, for the draw.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) split_weight_kernel(const SampleArgs args, const SplitArgs split) {
  __shared__ Shared sh;
  const int64_t out_row = blockIdx.y;
  const RowState& state = row_state(split, out_row);
  if (state.done) return;
  RowReader<T, kAligned> row(args, out_row);
  row.set_max(key_value(state.max_key));
  const u64 mass = survivor_weight(row, sh, split_range(row.num_chunks(), blockIdx.x, split.splits), 0.0f,
                                   state.threshold);
  if (threadIdx.x == 0) split.partials[out_row * split.splits + blockIdx.x] = mass;
}

// The draw: every CTA scans the splits' weights for the row total and the weight before its own
// split; only the split holding the target draws in it.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads) split_draw_kernel(const SampleArgs args, const SplitArgs split) {
  __shared__ Shared sh;
  const int64_t out_row = blockIdx.y;
  const RowState& state = row_state(split, out_row);
  if (state.done) return;
  const u64* partials = split.partials + out_row * split.splits;
  const u64 mine = threadIdx.x < split.splits ? partials[threadIdx.x] : 0;
  u64 total;
  const u64 before = block_exclusive_scan(mine, sh.scratch64, total);
  if (threadIdx.x == blockIdx.x) sh.before = before;
  __syncthreads();
  // The row max always survives with weight 2^40, so total > 0.
  const u64 target = draw_target(args.uniforms[out_row], total);
  const u64 own = partials[blockIdx.x];
  if (target < sh.before || target - sh.before >= own) return;  // the same in every thread
  RowReader<T, kAligned> row(args, out_row);
  row.set_max(key_value(state.max_key));
  const int64_t found = draw(row, sh, split_range(row.num_chunks(), blockIdx.x, split.splits), 0.0f,
                             state.threshold, target - sh.before);
  if (threadIdx.x == 0) args.tokens[out_row] = args.lo + (found >= 0 ? found : 0);
}

template <typename T, bool kAligned>
void launch_split(const SampleArgs& args, const SplitArgs& split, int64_t rows_out, cudaStream_t stream) {
  check_cuda(cudaMemsetAsync(split.states, 0, rows_out * kSamplingRowStateBytes, stream), "sample_tokens memset");
  const dim3 grid(static_cast<unsigned>(split.splits), static_cast<unsigned>(rows_out));
  split_extremes_kernel<T, kAligned><<<grid, kThreads, 0, stream>>>(args, split);
  check_launch("split_extremes_kernel");
  if (args.greedy) return;
  for (int stage = 0; args.top_k < args.n && stage <= kMaxKeyStages; ++stage) {
    split_select_kernel<T, kAligned, false><<<grid, kThreads, 0, stream>>>(args, split, stage);
    check_launch("split_select_kernel");
  }
  for (int stage = 0; args.top_p < 1.0 && stage <= kMaxKeyStages; ++stage) {
    split_select_kernel<T, kAligned, true><<<grid, kThreads, 0, stream>>>(args, split, stage);
    check_launch("split_select_kernel");
  }
  split_weight_kernel<T, kAligned><<<grid, kThreads, 0, stream>>>(args, split);
  check_launch("split_weight_kernel");
  split_draw_kernel<T, kAligned><<<grid, kThreads, 0, stream>>>(args, split);
  check_launch("split_draw_kernel");
}

template <typename T>
void launch(const SampleArgs& args, const SplitArgs& split, int64_t rows_out, bool aligned, cudaStream_t stream) {
  if (split.splits > 1) {
    return aligned ? launch_split<T, true>(args, split, rows_out, stream)
                   : launch_split<T, false>(args, split, rows_out, stream);
  }
  const dim3 grid(static_cast<unsigned>(rows_out));
  if (aligned) {
    (args.greedy ? sample_tokens_kernel<T, true, true> : sample_tokens_kernel<T, true, false>)<<<grid, kThreads, 0,
                                                                                                stream>>>(args);
  } else {
    (args.greedy ? sample_tokens_kernel<T, false, true> : sample_tokens_kernel<T, false, false>)<<<grid, kThreads, 0,
                                                                                                  stream>>>(args);
  }
  check_launch("sample_tokens_kernel");
}

}  // namespace

void sample_tokens(std::uintptr_t logits, int64_t row_stride, int64_t rows_out, int64_t lo, int64_t n, bool cfg,
                   double cfg_scale, bool greedy, double inv_temperature, int64_t top_k, double top_p,
                   std::uintptr_t uniforms, std::uintptr_t tokens, int dtype, int device, std::uintptr_t stream,
                   int64_t splits, std::uintptr_t workspace) {
  require(rows_out >= 1 && rows_out <= 0x7fffffff, "sample_tokens: rows_out must be in [1, 2^31)");
  require(n >= 1 && n <= kSamplingMaxBlock, "sample_tokens: the vocab block must hold 1 to 2^23 tokens");
  require(lo >= 0 && row_stride >= 0, "sample_tokens: lo and row_stride must be non-negative");
  require(logits != 0 && tokens != 0, "sample_tokens: null logits or tokens");
  require(greedy || uniforms != 0, "sample_tokens: sampling needs uniforms");
  require(greedy || (inv_temperature > 0.0 && inv_temperature <= 3.4028234663852886e38),
          "sample_tokens: inv_temperature must be a positive finite fp32 value");
  require(top_k >= 1, "sample_tokens: top_k must be >= 1");
  require(top_p > 0.0 && top_p <= 1.0, "sample_tokens: top_p must be in (0, 1]");
  require(splits >= 1 && splits <= kThreads, "sample_tokens: splits must be in [1, 1024]");
  require(splits == 1 || (rows_out <= 65535 && workspace != 0 && workspace % 16 == 0),
          "sample_tokens: splits > 1 needs a 16-byte aligned workspace and at most 65535 rows");
  const int elem_bytes = static_cast<DType>(dtype) == DType::Float32 ? 4 : 2;
  const SampleArgs args{reinterpret_cast<const void*>(logits),
                        row_stride,
                        cfg ? rows_out * row_stride : 0,
                        lo,
                        n,
                        cfg,
                        greedy,
                        static_cast<float>(cfg_scale),
                        greedy ? 1.0f : static_cast<float>(inv_temperature),
                        top_k,
                        top_p,
                        reinterpret_cast<const float*>(uniforms),
                        reinterpret_cast<int64_t*>(tokens)};
  const SplitArgs split{reinterpret_cast<RowState*>(workspace),
                        reinterpret_cast<u64*>(workspace + rows_out * kSamplingRowStateBytes),
                        static_cast<int>(splits)};
  // Vector loads need every row to start on a 16-byte boundary.
  const bool aligned = logits % 16 == 0 && (row_stride * elem_bytes) % 16 == 0;
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32:
      return launch<float>(args, split, rows_out, aligned, s);
    case DType::Float16:
      return launch<__half>(args, split, rows_out, aligned, s);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(args, split, rows_out, aligned, s);
  }
  require(false, "sample_tokens: unknown dtype code " + std::to_string(dtype));
}

}  // namespace unimm
