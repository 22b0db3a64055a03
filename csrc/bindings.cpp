// Python bindings: raw device pointers and streams travel as integers; torch stays on the Python side.
#include <pybind11/pybind11.h>

#include "smoke.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dcign_fast CUDA kernels (raw pointers + stream, no libtorch)";
  m.def("axpb", &dcign::axpb, py::arg("x"), py::arg("y"), py::arg("n"), py::arg("a"), py::arg("b"),
        py::arg("stream"), "y = a * x + b on float32 device buffers (smoke test kernel)");
  m.def("device_count", &dcign::device_count, "Number of CUDA devices (raises without a driver)");
  m.def("runtime_version", &dcign::runtime_version, "CUDA runtime version linked into the module");
}
