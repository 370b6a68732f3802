# fsdpsim::torch: LibTorch's CPU libraries and headers from the pinned wheel
# at FSDPSIM_TORCH_ROOT (<site-packages>/torch). Included by cmake/Torch.cmake
# in the build, and by the installed fsdpsimConfig.cmake, which sets
# FSDPSIM_TORCH_ROOT to the absolute path the build resolved: an installed
# fsdpsim links that same wheel, so its venv must stay where it was.
# Imported (not a built target) so the exported libraries name it and each
# consumer defines it here, never from a path inside our source tree.

if(NOT TARGET fsdpsim::torch)
  foreach(_fsdpsim_lib torch_cpu c10)
    set(_fsdpsim_path "${FSDPSIM_TORCH_ROOT}/lib/lib${_fsdpsim_lib}.so")
    if(NOT EXISTS "${_fsdpsim_path}")
      message(FATAL_ERROR "fsdpsim: ${_fsdpsim_path} is missing; the torch wheel at ${FSDPSIM_TORCH_ROOT} is "
                          "incomplete or was moved")
    endif()
    add_library(fsdpsim::${_fsdpsim_lib} SHARED IMPORTED)
    set_target_properties(fsdpsim::${_fsdpsim_lib} PROPERTIES IMPORTED_LOCATION "${_fsdpsim_path}")
  endforeach()
  add_library(fsdpsim::torch INTERFACE IMPORTED)
  # --no-as-needed: libtorch_cpu registers its operators and backends in static
  # initialisers; it must stay loaded even where no symbol of it is named.
  target_link_libraries(fsdpsim::torch INTERFACE -Wl,--no-as-needed fsdpsim::torch_cpu fsdpsim::c10 -Wl,--as-needed
                        Threads::Threads)
  # Before any system directory, so a header the wheel has always wins over
  # Debian's /usr/include/{torch,c10,ATen} (tests/header_origin_test.sh checks
  # that no build step read one of those).
  target_include_directories(fsdpsim::torch SYSTEM INTERFACE "${FSDPSIM_TORCH_ROOT}/include"
                             "${FSDPSIM_TORCH_ROOT}/include/torch/csrc/api/include")
  # What the wheel's torch_cpu target exports (Caffe2Targets.cmake); the c10d
  # headers hide ProcessGroupGloo without USE_C10D_GLOO.
  target_compile_definitions(fsdpsim::torch INTERFACE USE_DISTRIBUTED USE_C10D_GLOO USE_RPC USE_TENSORPIPE)
endif()
