// pybind11 module unimm._C: build facts and the host entry points of every kernel family.
// Reached from Python only through unimm/_ext.py.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "common.h"
#include "ops.h"

namespace py = pybind11;

namespace {

#ifndef UNIMM_CUDA_ARCHS
#define UNIMM_CUDA_ARCHS "unknown"
#endif
#ifndef UNIMM_NVCC_VERSION
#define UNIMM_NVCC_VERSION "unknown"
#endif

py::dict build_info() {
  py::dict info;
  info["cuda_archs"] = UNIMM_CUDA_ARCHS;    // CMake CUDA_ARCHITECTURES, comma-separated
  info["nvcc_version"] = UNIMM_NVCC_VERSION;
  info["cudart_version"] = CUDART_VERSION;  // the statically linked runtime, e.g. 13000
  return info;
}

// Number of GPUs the CUDA runtime sees; 0 (not an error) without a driver or device.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error so later calls start clean
    return 0;
  }
  return count;
}

// Installed driver's CUDA version (e.g. 13000), 0 when no driver is installed.
int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "unimm CUDA kernels (raw-pointer bindings; use unimm.kernels instead)";
  m.def("build_info", &build_info, "Facts fixed when unimm._C was compiled.");
  m.def("device_count", &device_count);
  m.def("driver_version", &driver_version);

  m.attr("VQ_SMALL_MAX_DIM") = unimm::kVqSmallMaxDim;
  m.attr("VQ_SMALL_TILE_CODES") = unimm::kVqSmallTileCodes;
  m.def("vq_small_d_rows_per_block", &unimm::vq_small_d_rows_per_block, py::arg("d"));
  m.def("vq_argmin_small_d", &unimm::vq_argmin_small_d, py::arg("z"), py::arg("z_row_stride"), py::arg("codebook"),
        py::arg("codebook_row_stride"), py::arg("n"), py::arg("k"), py::arg("d"), py::arg("codes_per_split"),
        py::arg("splits"), py::arg("part_dist"), py::arg("part_idx"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.attr("DECODE_QUERY_TILE") = unimm::kDecodeQueryTile;
  m.attr("DECODE_SPLIT_KEYS") = unimm::kDecodeSplitKeys;
  m.attr("DECODE_MAX_SPLITS") = unimm::kDecodeMaxSplits;
  m.def("decode_attention", &unimm::decode_attention, py::arg("q"), py::arg("q_batch_stride"),
        py::arg("q_head_stride"), py::arg("k_cache"), py::arg("k_batch_stride"), py::arg("k_row_stride"),
        py::arg("k_head_stride"), py::arg("v_cache"), py::arg("v_batch_stride"), py::arg("v_row_stride"),
        py::arg("v_head_stride"), py::arg("cache_lens"), py::arg("block_table"), py::arg("table_stride"),
        py::arg("page_size"), py::arg("num_pages"), py::arg("out"), py::arg("out_batch_stride"),
        py::arg("out_head_stride"), py::arg("part_out"), py::arg("part_lse"), py::arg("batch"), py::arg("q_heads"),
        py::arg("kv_heads"), py::arg("head_dim"), py::arg("max_len"), py::arg("keys_per_split"), py::arg("splits"),
        py::arg("scale"), py::arg("softcap"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention_occupancy", &unimm::decode_attention_occupancy, py::arg("head_dim"), py::arg("dtype"),
        py::arg("paged"), py::arg("device"));

  m.attr("SAMPLING_FIXED_POINT_BITS") = unimm::kSamplingFixedPointBits;
  m.attr("SAMPLING_MAX_BLOCK") = unimm::kSamplingMaxBlock;
  m.attr("SAMPLING_ROW_STATE_BYTES") = unimm::kSamplingRowStateBytes;
  m.def("sample_tokens", &unimm::sample_tokens, py::arg("logits"), py::arg("row_stride"), py::arg("rows_out"),
        py::arg("lo"), py::arg("n"), py::arg("cfg"), py::arg("cfg_scale"), py::arg("greedy"),
        py::arg("inv_temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("uniforms"), py::arg("tokens"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), py::arg("splits") = 1, py::arg("workspace") = 0,
        py::call_guard<py::gil_scoped_release>());
}
