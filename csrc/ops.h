// Host entry points of every kernel family, bound to Python in bindings.cpp.
#pragma once

#include <cstdint>

namespace unimm {

// ---- vq.cu ---------------------------------------------------------------------------------
// Nearest code by squared L2 for code dims d <= 32, split over the codebook: split s scans codes
// [s * codes_per_split, min(k, (s + 1) * codes_per_split)) and writes, for each of the n rows, its
// best squared distance to part_dist[s * n + row] (fp32) and the lowest index reaching it to
// part_idx[s * n + row] (int64).
constexpr int kVqSmallMaxDim = 32;
constexpr int kVqSmallTileCodes = 256;
int vq_small_d_rows_per_block(int64_t d);
void vq_argmin_small_d(std::uintptr_t z, int64_t z_row_stride, std::uintptr_t codebook, int64_t codebook_row_stride,
                       int64_t n, int64_t k, int64_t d, int64_t codes_per_split, int64_t splits,
                       std::uintptr_t part_dist, std::uintptr_t part_idx, int dtype, int device,
                       std::uintptr_t stream);

}  // namespace unimm
