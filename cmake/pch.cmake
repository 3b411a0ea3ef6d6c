# Precompiled LibTorch headers. <ATen/ATen.h> alone costs ~8 s of parsing in every translation unit that
# includes it (about 110 of tilt's 126), most of a cold build on 2 cores; precompiled once, a unit loads it in
# ~1 s. GCC accepts a precompiled header only where the flags that reach its contents match (-fopenmp
# defines _OPENMP, which ATen reads), so there are two: one for the library's layers (compiled with OpenMP)
# and one for everything else. Sources that include no LibTorch header, or take flags of their own, are
# compiled as before. -DTILT_PCH=OFF turns it off (a compiler without precompiled headers, or checking that
# each source includes what it uses).
option(TILT_PCH "Precompile <ATen/ATen.h> for the sources that include LibTorch" ON)

# The donor of group `group` (openmp or plain): an object library of one source that owns the precompiled
# header the group's targets reuse.
function(tilt_pch_donor group)
  set(donor tilt_pch_${group})
  if(TARGET ${donor})
    return()
  endif()
  add_library(${donor} OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch_anchor.cpp)
  target_link_libraries(${donor} PRIVATE ${TORCH_LIBRARIES})
  if(group STREQUAL "openmp")
    target_link_libraries(${donor} PRIVATE OpenMP::OpenMP_CXX)
  endif()
  target_precompile_headers(${donor} PRIVATE <ATen/ATen.h>)
endfunction()

# tilt_precompile(<group> targets...): each target reuses its group's precompiled header, for those of its
# sources that include a LibTorch header and have no compile options of their own.
function(tilt_precompile group)
  if(NOT TILT_PCH)
    return()
  endif()
  tilt_pch_donor(${group})
  foreach(target IN LISTS ARGN)
    if(NOT TARGET ${target})
      continue()
    endif()
    get_target_property(type ${target} TYPE)
    if(NOT type MATCHES "^(EXECUTABLE|STATIC_LIBRARY|SHARED_LIBRARY|OBJECT_LIBRARY)$")
      continue()
    endif()
    get_target_property(dir ${target} SOURCE_DIR)
    get_target_property(sources ${target} SOURCES)
    foreach(source IN LISTS sources)
      if(IS_ABSOLUTE "${source}")
        set(path "${source}")
      else()
        set(path "${dir}/${source}")
      endif()
      # (a relative path would be taken from this directory, not the target's)
      get_source_file_property(own "${path}" TARGET_DIRECTORY ${target} COMPILE_OPTIONS)
      set(uses_torch OFF)
      if(EXISTS "${path}")
        file(STRINGS "${path}" torch_includes REGEX "^#include <(ATen|torch|c10)/")
        if(torch_includes)
          set(uses_torch ON)
        endif()
      endif()
      if(NOT uses_torch OR own)
        set_source_files_properties("${path}" TARGET_DIRECTORY ${target} PROPERTIES SKIP_PRECOMPILE_HEADERS ON)
      endif()
    endforeach()
    target_precompile_headers(${target} REUSE_FROM tilt_pch_${group})
  endforeach()
endfunction()
