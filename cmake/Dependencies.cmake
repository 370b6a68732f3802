# Debian packages (.ci/setup.sh installs them) and the pinned torch wheel.
find_package(Threads REQUIRED)
include(cmake/Torch.cmake)              # LibTorch 2.x from .venv (torch==<pin>), CPU libraries
find_package(Boost 1.74 REQUIRED COMPONENTS fiber context)
find_package(GTest REQUIRED)            # libgtest-dev / libgmock-dev
find_package(nlohmann_json 3 REQUIRED)
find_package(benchmark QUIET)
find_package(CLI11 2.1 REQUIRED CONFIG) # libcli11-dev (header-only): the fsdpsim command line

# {fmt} header-only from the torch wheel. The wheel's include directory (an
# -isystem of every target through fsdpsim::torch) ships fmt 12 headers, which
# shadow Debian's /usr/include/fmt (libfmt-dev 9) in every translation unit:
# linking Debian's libfmt would pair 12's headers with 9's compiled code. So
# nothing links a libfmt; targets that use fmt compile it inline
# (FMT_HEADER_ONLY) from the wheel's headers, and tools/format_util.h checks
# the version it got.
add_library(fsdpsim_fmt INTERFACE)
target_compile_definitions(fsdpsim_fmt INTERFACE FMT_HEADER_ONLY)
target_link_libraries(fsdpsim_fmt INTERFACE fsdpsim::torch)

function(fsdpsim_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()
