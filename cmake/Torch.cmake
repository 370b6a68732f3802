# LibTorch from the pinned torch wheel in the project venv (.ci/setup.sh).
#
# The one place that decides where LibTorch is: the venv's Python answers
# torch.utils.cmake_prefix_path. We do NOT call find_package(Torch) on it: the
# wheel is a CUDA build, and its TorchConfig/Caffe2Config (a) require a CUDA
# toolkit and pick up whatever one the machine has (/usr/local/cuda 13.0 here,
# none on a fresh CI machine: configure fails), and (b) find c10/torch with
# find_library's system paths first, so on a machine with Debian's
# libtorch-dev they silently link /usr/lib/.../libc10.so (1.13). Every target
# of this project runs on the CPU, so fsdpsim::torch links only the wheel's
# CPU libraries (libtorch_cpu.so, libc10.so) by full path. At run time those
# load libcudart/libcupti from the nvidia-* wheels through their own RPATH;
# no CUDA toolkit is needed to build or run.
#
# Gloo: ProcessGroupGloo.hpp includes <gloo/...>, which the wheel does not
# ship (Gloo is compiled into libtorch_cpu.so). Those headers come from
# Debian's libgloo-dev, for backends/gloo/gloo_process_group.cpp only; that file
# static_asserts the class layout it relies on (see there).

set(FSDPSIM_PYTHON "${PROJECT_SOURCE_DIR}/.venv/bin/python" CACHE FILEPATH
    "Python of the venv holding the pinned torch wheel (.ci/setup.sh makes it)")

file(STRINGS "${PROJECT_SOURCE_DIR}/.ci/python-requirements.txt" _pin REGEX "^torch==")
string(REPLACE "torch==" "" FSDPSIM_TORCH_PIN "${_pin}")

if(NOT EXISTS "${FSDPSIM_PYTHON}")
  message(FATAL_ERROR "fsdpsim: ${FSDPSIM_PYTHON} does not exist. Run `bash .ci/setup.sh` (it creates "
                      "the venv with torch==${FSDPSIM_TORCH_PIN}) or pass -DFSDPSIM_PYTHON=/path/to/python.")
endif()
execute_process(
  COMMAND "${FSDPSIM_PYTHON}" -c
          "import importlib.metadata as m, torch.utils; print(m.version('torch')); print(torch.utils.cmake_prefix_path)"
  OUTPUT_VARIABLE _torch_answer ERROR_VARIABLE _torch_error RESULT_VARIABLE _torch_result
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_result EQUAL 0)
  message(FATAL_ERROR "fsdpsim: ${FSDPSIM_PYTHON} cannot import torch (run `bash .ci/setup.sh`):\n${_torch_error}")
endif()
string(REPLACE "\n" ";" _torch_answer "${_torch_answer}")
list(GET _torch_answer 0 FSDPSIM_TORCH_VERSION)
list(GET _torch_answer 1 _torch_cmake_prefix)
if(NOT FSDPSIM_TORCH_VERSION STREQUAL FSDPSIM_TORCH_PIN)
  message(FATAL_ERROR "fsdpsim: ${FSDPSIM_PYTHON} has torch ${FSDPSIM_TORCH_VERSION}, the pin is "
                      "${FSDPSIM_TORCH_PIN} (.ci/python-requirements.txt); run `bash .ci/setup.sh`.")
endif()
# cmake_prefix_path is <torch>/share/cmake.
get_filename_component(FSDPSIM_TORCH_ROOT "${_torch_cmake_prefix}/../.." ABSOLUTE)
# torchrun of the same wheel (tests start our Gloo ranks under it).
get_filename_component(_venv_bin "${FSDPSIM_PYTHON}" DIRECTORY)
set(FSDPSIM_TORCHRUN "${_venv_bin}/torchrun")
message(STATUS "fsdpsim: LibTorch ${FSDPSIM_TORCH_VERSION} (CPU libraries) from ${FSDPSIM_TORCH_ROOT}")

# fsdpsim::torch and the imported libraries: the same file the installed
# package config includes (cmake/Install.cmake), so both define them alike.
include(${CMAKE_CURRENT_LIST_DIR}/TorchTargets.cmake)
