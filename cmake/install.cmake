# cmake --install: the headers, one static library per layer and a CMake package, so that another
# project does find_package(tilt REQUIRED) and target_link_libraries(app PRIVATE tilt::tilt).
include(CMakePackageConfigHelpers)

set(tilt_layer_targets)
foreach(layer IN LISTS TILT_LAYERS)
  list(APPEND tilt_layer_targets tilt_${layer})
endforeach()
install(TARGETS ${tilt_layer_targets} tilt EXPORT tiltTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/tilt DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(tilt_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/tilt)
install(EXPORT tiltTargets NAMESPACE tilt:: DESTINATION ${tilt_cmake_dir})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/tiltConfig.cmake.in
  ${PROJECT_BINARY_DIR}/tiltConfig.cmake INSTALL_DESTINATION ${tilt_cmake_dir})
# 0.x: a new minor version may change the API.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/tiltConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/tiltConfig.cmake ${PROJECT_BINARY_DIR}/tiltConfigVersion.cmake
  DESTINATION ${tilt_cmake_dir})
