// Host entry points of every kernel family, bound to Python in bindings.cpp.
#pragma once

#include <cstdint>

namespace unimm {

// ---- vq.cu ---------------------------------------------------------------------------------
// Nearest code by squared L2 for code dims d <= 32, split over the codebook: split s scans codes
// [s * codes_per_split, min(k, (s + 1) * codes_per_split)) and writes, for each of the n rows, its
// best scaled squared distance to part_dist[s * n + row] (fp32; +inf: no code at a finite
// distance) and the lowest index reaching it to part_idx[s * n + row] (int64). On entry
// part_dist[s * n + row] holds the row's power-of-two scale (the same for every s; NaN for a row
// holding NaN / Inf): see vq.cu.
constexpr int kVqSmallMaxDim = 32;
constexpr int kVqSmallTileCodes = 256;
int vq_small_d_rows_per_block(int64_t d);
void vq_argmin_small_d(std::uintptr_t z, int64_t z_row_stride, std::uintptr_t codebook, int64_t codebook_row_stride,
                       int64_t n, int64_t k, int64_t d, int64_t codes_per_split, int64_t splits,
                       std::uintptr_t part_dist, std::uintptr_t part_idx, int dtype, int device,
                       std::uintptr_t stream);

// ---- decode.cu -----------------------------------------------------------------------------
// Decode attention over a KV cache, split over the cache. q [B, Hq, D], caches [B, max_len, Hkv, D]
// (strides in elements; unit stride along D; 16-byte aligned rows), cache_lens int32 [B] (clamped
// to [0, max_len] in the kernel), out [B, Hq, D]; fp16 / bf16, D in {64, 128, 256}. Split s covers
// cache rows [s * keys_per_split, (s + 1) * keys_per_split); with splits > 1 the caller passes an
// fp32 workspace part_out [B, Hq, splits, D] and part_lse [B, Hq, splits] (contents ignored).
// Paged (page_size > 0, a power of two >= 16): caches [num_pages, page_size, Hkv, D] (the batch
// strides are page strides), key j of row b in slot j % page_size of page
// block_table[b * table_stride + j / page_size] (int32), max_len = max_pages * page_size; a page
// id outside [0, num_pages) is never read through and makes the row's output NaN. page_size 0:
// contiguous (block_table, table_stride and num_pages unused).
// decode_attention_occupancy: split-kernel CTAs one SM of `device` holds at once for that
// (head_dim, dtype, paged), from cudaOccupancyMaxActiveBlocksPerMultiprocessor.
constexpr int kDecodeQueryTile = 8;    // query heads of a GQA group per CTA
constexpr int kDecodeSplitKeys = 64;   // keys_per_split must be a multiple of this
constexpr int kDecodeMaxSplits = 256;
void decode_attention(std::uintptr_t q, int64_t q_batch_stride, int64_t q_head_stride, std::uintptr_t k_cache,
                      int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride, std::uintptr_t v_cache,
                      int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride, std::uintptr_t cache_lens,
                      std::uintptr_t block_table, int64_t table_stride, int64_t page_size, int64_t num_pages,
                      std::uintptr_t out, int64_t out_batch_stride, int64_t out_head_stride,
                      std::uintptr_t part_out, std::uintptr_t part_lse, int64_t batch, int64_t q_heads,
                      int64_t kv_heads, int64_t head_dim, int64_t max_len, int64_t keys_per_split, int64_t splits,
                      double scale, double softcap, int dtype, int device, std::uintptr_t stream);
int decode_attention_occupancy(int64_t head_dim, int dtype, bool paged, int device);

// ---- sampling.cu ---------------------------------------------------------------------------
// One token per output row (rules: unimm/kernels/reference/sampling.py). logits rows of row_stride
// elements, unit stride along the vocab; with cfg, output row r guides cond row r with uncond row
// r + rows_out. Vocab block [lo, lo + n). greedy: argmax (uniforms unused); else z = (guided -
// row max) * inv_temperature (an fp32 value), top_k active when < n, top_p when < 1, one fp32
// uniform in [0, 1) per output row. NaN guided logits are never picked. Writes int64 absolute ids
// to tokens [rows_out], -1 for a row whose block holds no non-NaN guided logit. splits > 1 spreads
// each row over that many CTAs (<= 1024), with a 16-byte aligned workspace of rows_out *
// (kSamplingRowStateBytes + 8 * splits) bytes (contents ignored).
constexpr int kSamplingFixedPointBits = 40;  // token weights are round(p * 2^40)
constexpr int64_t kSamplingMaxBlock = int64_t{1} << 23;
constexpr int64_t kSamplingRowStateBytes = 4096;
void sample_tokens(std::uintptr_t logits, int64_t row_stride, int64_t rows_out, int64_t lo, int64_t n, bool cfg,
                   double cfg_scale, bool greedy, double inv_temperature, int64_t top_k, double top_p,
                   std::uintptr_t uniforms, std::uintptr_t tokens, int dtype, int device, std::uintptr_t stream,
                   int64_t splits, std::uintptr_t workspace);

}  // namespace unimm
