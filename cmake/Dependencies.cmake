# Debian packages (.ci/setup.sh installs them) and the pinned torch wheel.
find_package(Threads REQUIRED)
include(cmake/Torch.cmake)              # LibTorch 2.x from .venv (torch==<pin>), CPU libraries
find_package(Boost 1.74 REQUIRED COMPONENTS fiber context)
find_package(GTest REQUIRED)            # libgtest-dev / libgmock-dev
find_package(nlohmann_json 3 REQUIRED)
find_package(benchmark QUIET)

function(fsdpsim_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()
