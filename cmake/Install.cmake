# `cmake --install build --prefix P` gives P/lib (static libraries),
# P/include/fsdpsim/{backends,sim,fsdp,scenarios}/ (headers) and
# P/lib/cmake/fsdpsim/ (package config), so another project can
#   find_package(fsdpsim REQUIRED)   # with CMAKE_PREFIX_PATH=P
#   target_link_libraries(app PRIVATE fsdpsim::fsdp fsdpsim::sim fsdpsim::testing)
# examples/ is such a project; the ctest case Example.InstallBuildAndTest builds it.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(FSDPSIM_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/fsdpsim")

# Every library defined under `dir` and its subdirectories, in `out`.
function(fsdpsim_libraries_under dir out)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  set(found "")
  foreach(target IN LISTS targets)
    get_target_property(type ${target} TYPE)
    if(type MATCHES "^(STATIC|SHARED|INTERFACE)_LIBRARY$")
      list(APPEND found ${target})
    endif()
  endforeach()
  foreach(sub IN LISTS subdirs)
    fsdpsim_libraries_under(${sub} sub_found)
    list(APPEND found ${sub_found})
  endforeach()
  set(${out} ${found} PARENT_SCOPE)
endfunction()

# The libraries of backends/ (interface, gloo/), sim/ (and testing/), fsdp/,
# scenarios/, whatever their folders add later; fsdpsim_X is fsdpsim::X.
set(_fsdpsim_exported_targets "")
foreach(dir backends sim fsdp scenarios)
  fsdpsim_libraries_under(${PROJECT_SOURCE_DIR}/${dir} _libraries)
  list(APPEND _fsdpsim_exported_targets ${_libraries})
endforeach()
foreach(target IN LISTS _fsdpsim_exported_targets)
  string(REGEX REPLACE "^fsdpsim_" "" _name ${target})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${_name})
endforeach()
message(STATUS "fsdpsim: installs ${_fsdpsim_exported_targets}")

# Include directories travel in the targets (backends' INSTALL_INTERFACE).
install(TARGETS ${_fsdpsim_exported_targets} EXPORT fsdpsimTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
# Every header of the exported folders (sim/testing/ and backends/gloo/ too).
install(DIRECTORY backends sim fsdp scenarios
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/fsdpsim
        FILES_MATCHING PATTERN "*.h")
install(EXPORT fsdpsimTargets NAMESPACE fsdpsim:: DESTINATION ${FSDPSIM_INSTALL_CMAKEDIR})

# The package config records FSDPSIM_TORCH_ROOT, the absolute path of the
# pinned wheel that cmake/Torch.cmake resolved, and defines fsdpsim::torch
# from it with the same cmake/TorchTargets.cmake as this build.
configure_package_config_file(cmake/fsdpsimConfig.cmake.in "${PROJECT_BINARY_DIR}/fsdpsimConfig.cmake"
                              INSTALL_DESTINATION ${FSDPSIM_INSTALL_CMAKEDIR})
write_basic_package_version_file("${PROJECT_BINARY_DIR}/fsdpsimConfigVersion.cmake"
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES "${PROJECT_BINARY_DIR}/fsdpsimConfig.cmake" "${PROJECT_BINARY_DIR}/fsdpsimConfigVersion.cmake"
        DESTINATION ${FSDPSIM_INSTALL_CMAKEDIR})
install(FILES cmake/TorchTargets.cmake DESTINATION ${FSDPSIM_INSTALL_CMAKEDIR} RENAME fsdpsimTorchTargets.cmake)
