# Every dependency comes from Debian packages (scripts/setup.sh installs them).
find_package(Torch REQUIRED)            # libtorch-dev: LibTorch 1.13 with c10d + ProcessGroupGloo
find_package(Boost 1.74 REQUIRED COMPONENTS fiber context)
find_package(GTest REQUIRED)            # libgtest-dev / libgmock-dev
find_package(nlohmann_json 3 REQUIRED)
find_package(benchmark QUIET)
find_package(Threads REQUIRED)

# LibTorch's CMake config appends its flags to CMAKE_CXX_FLAGS; keep its
# imported libraries behind one interface target.
add_library(fsdpsim_torch INTERFACE)
target_link_libraries(fsdpsim_torch INTERFACE ${TORCH_LIBRARIES} Threads::Threads)
target_include_directories(fsdpsim_torch INTERFACE ${TORCH_INCLUDE_DIRS})

function(fsdpsim_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
endfunction()
