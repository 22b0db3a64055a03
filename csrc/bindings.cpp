// Python bindings: raw device pointers and streams travel as integers; torch stays on the Python side.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <utility>

#include "latent_sampler.h"
#include "phase_index.cuh"
#include "smoke.h"
#include "unpool_conv.h"

namespace py = pybind11;

// An activation tensor arrives from Python as (pointer, stride n, stride c, stride h, stride w).
namespace pybind11::detail {
template <>
struct type_caster<dcign::ActivationView> {
  PYBIND11_TYPE_CASTER(dcign::ActivationView, const_name("tuple[int, int, int, int, int]"));

  bool load(handle src, bool convert) {
    make_caster<std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>> fields;
    if (!fields.load(src, convert)) return false;
    const auto [ptr, sn, sc, sh, sw] = cast_op<std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>>(fields);
    value = {ptr, sn, sc, sh, sw};
    return true;
  }
};
}  // namespace pybind11::detail

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcign_fast CUDA kernels (raw pointers + stream, no libtorch)";
  m.def("axpb", &dcign::axpb, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("a"), py::arg("b"), py::arg("stream"),
        "y = a * x + b on float32 device buffers (smoke test kernel)");
  m.def("device_count", &dcign::device_count, "Number of CUDA devices (raises without a driver)");
  m.def("runtime_version", &dcign::runtime_version, "CUDA runtime version linked into the module");

  // Latent sampler (argument meanings: csrc/latent_sampler.h).
  m.def("sampler_column_means", &dcign::sampler_column_means, py::arg("mu"), py::arg("logvar"), py::arg("B"),
        py::arg("D"), py::arg("mu_sb"), py::arg("mu_sd"), py::arg("lv_sb"), py::arg("lv_sd"), py::arg("means"),
        py::arg("dtype"), py::arg("stream"));
  m.def("sampler_forward", &dcign::sampler_forward, py::arg("mu"), py::arg("logvar"), py::arg("active"),
        py::arg("means"), py::arg("z"), py::arg("kl"), py::arg("B"), py::arg("D"), py::arg("mu_sb"), py::arg("mu_sd"),
        py::arg("lv_sb"), py::arg("lv_sd"), py::arg("clamp"), py::arg("seed"), py::arg("offset"), py::arg("seed_ptr"),
        py::arg("offset_ptr"), py::arg("dtype"), py::arg("stream"));
  m.def("sampler_backward", &dcign::sampler_backward, py::arg("mu"), py::arg("logvar"), py::arg("active"),
        py::arg("means"), py::arg("grad_z"), py::arg("grad_kl"), py::arg("grad_mu"), py::arg("grad_logvar"),
        py::arg("B"), py::arg("D"), py::arg("mu_sb"), py::arg("mu_sd"), py::arg("lv_sb"), py::arg("lv_sd"),
        py::arg("gz_sb"), py::arg("gz_sd"), py::arg("gkl_s"), py::arg("invariance"), py::arg("seed"), py::arg("offset"),
        py::arg("seed_ptr"), py::arg("offset_ptr"), py::arg("dtype"), py::arg("stream"));

  // Unpool-conv, scale factor 2 (argument meanings: csrc/unpool_conv.h).
  m.def(
      "union_taps", [](int kernel, int padding) { return dcign::axis_union(kernel, padding).taps; }, py::arg("kernel"),
      py::arg("padding"), "Union taps of both phases of one axis (packed weight extent)");
  m.def("packed_channels", &dcign::packed_channels, py::arg("out_channels"),
        "Output channels of the packed weight: out_channels rounded up to whole 16-byte vectors");
  m.def("unpool_conv_pack_weight", &dcign::unpool_conv_pack_weight, py::arg("weight"), py::arg("wp"), py::arg("O"),
        py::arg("C"), py::arg("KH"), py::arg("KW"), py::arg("PH"), py::arg("PW"), py::arg("dtype"), py::arg("stream"));
  m.def("unpool_conv_forward", &dcign::unpool_conv_forward, py::arg("x"), py::arg("wp"), py::arg("bias"), py::arg("y"),
        py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("O"), py::arg("KH"), py::arg("KW"),
        py::arg("PH"), py::arg("PW"), py::arg("relu"), py::arg("dtype"), py::arg("tf32"), py::arg("stream"));
  m.def("unpool_conv_grad_input", &dcign::unpool_conv_grad_input, py::arg("g"), py::arg("wp"),
        py::arg("dx"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("O"), py::arg("KH"),
        py::arg("KW"), py::arg("PH"), py::arg("PW"), py::arg("dtype"), py::arg("tf32"), py::arg("stream"));
  m.def("unpool_conv_grad_weight", &dcign::unpool_conv_grad_weight, py::arg("x"), py::arg("g"),
        py::arg("ws"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("O"),
        py::arg("KH"), py::arg("KW"), py::arg("PH"), py::arg("PW"), py::arg("splits"), py::arg("chunk"),
        py::arg("dtype"), py::arg("tf32"), py::arg("stream"));
  for (const auto& [name, blocks] :
       {std::pair{"unpool_conv_grad_weight_blocks", &dcign::unpool_conv_grad_weight_blocks},
        std::pair{"unpool_conv_grad_weight_few_outputs_blocks", &dcign::unpool_conv_grad_weight_few_outputs_blocks}}) {
    m.def(name, blocks, py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("O"), py::arg("KH"),
          py::arg("KW"), py::arg("PH"), py::arg("PW"), "Blocks per split of that grad-weight launch for this shape");
  }
  m.def("unpool_conv_grad_weight_few_outputs", &dcign::unpool_conv_grad_weight_few_outputs, py::arg("x"), py::arg("g"),
        py::arg("ws"), py::arg("N"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("O"),
        py::arg("KH"), py::arg("KW"), py::arg("PH"), py::arg("PW"), py::arg("splits"), py::arg("chunk"),
        py::arg("dtype"), py::arg("tf32"), py::arg("stream"));
  m.def("unpool_conv_finalize_grad_weight", &dcign::unpool_conv_finalize_grad_weight, py::arg("ws"),
        py::arg("dw"), py::arg("O"), py::arg("C"), py::arg("KH"), py::arg("KW"), py::arg("PH"),
        py::arg("PW"), py::arg("splits"), py::arg("dtype"), py::arg("stream"));
}
