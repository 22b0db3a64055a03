// Python bindings: raw device pointers and streams travel as integers; torch stays on the Python side.
#include <pybind11/pybind11.h>

#include "latent_sampler.h"
#include "smoke.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcign_fast CUDA kernels (raw pointers + stream, no libtorch)";
  m.def("axpb", &dcign::axpb, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("a"), py::arg("b"),
        py::arg("stream"), "y = a * x + b on float32 device buffers (smoke test kernel)");
  m.def("device_count", &dcign::device_count, "Number of CUDA devices (raises without a driver)");
  m.def("runtime_version", &dcign::runtime_version, "CUDA runtime version linked into the module");

  // Latent sampler (argument meanings: csrc/latent_sampler.h).
  m.def("sampler_column_means", &dcign::sampler_column_means, py::arg("mu"), py::arg("logvar"), py::arg("B"),
        py::arg("D"), py::arg("mu_sb"), py::arg("mu_sd"), py::arg("lv_sb"), py::arg("lv_sd"), py::arg("means"),
        py::arg("dtype"), py::arg("stream"));
  m.def("sampler_forward", &dcign::sampler_forward, py::arg("mu"), py::arg("logvar"), py::arg("active"),
        py::arg("means"), py::arg("z"), py::arg("kl"), py::arg("B"), py::arg("D"), py::arg("mu_sb"), py::arg("mu_sd"),
        py::arg("lv_sb"), py::arg("lv_sd"), py::arg("clamp"), py::arg("seed"), py::arg("offset"), py::arg("dtype"),
        py::arg("stream"));
  m.def("sampler_backward", &dcign::sampler_backward, py::arg("mu"), py::arg("logvar"), py::arg("active"),
        py::arg("means"), py::arg("grad_z"), py::arg("grad_kl"), py::arg("grad_mu"), py::arg("grad_logvar"),
        py::arg("B"), py::arg("D"), py::arg("mu_sb"), py::arg("mu_sd"), py::arg("lv_sb"), py::arg("lv_sd"),
        py::arg("gz_sb"), py::arg("gz_sd"), py::arg("gkl_s"), py::arg("invariance"), py::arg("seed"),
        py::arg("offset"), py::arg("dtype"), py::arg("stream"));
}
