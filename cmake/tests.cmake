# How the tests share the cores under `ctest -j N` (scripts/test.sh passes the number of cores).
#
# The tests that keep every core busy by themselves (the gtest binaries' LibTorch threads, the fuzz
# corpus's parallel cases, the distributed ranks) say PROCESSORS 2, so that on 2 cores they run alone.
# The others, mostly chains of short tilt processes that spend their time starting LibTorch on one
# core, run side by side; their OpenMP threads sleep while idle (OMP_WAIT_POLICY=PASSIVE) rather than
# spin against the other test: two such tests at once without it took longer than one after the other.
# COST (seconds, as measured on 2 cores) makes ctest start the longest first.

# Call at the end of a directory's CMakeLists.txt (test properties belong to the directory that added
# the test): every test of the directory that does not ask for PROCESSORS gets the sleeping policy.
function(tilt_share_cores)
  get_property(tests DIRECTORY PROPERTY TESTS)
  foreach(test IN LISTS tests)
    get_test_property(${test} PROCESSORS processors)
    if(NOT processors)
      set_property(TEST ${test} APPEND PROPERTY ENVIRONMENT OMP_WAIT_POLICY=PASSIVE)
    endif()
  endforeach()
endfunction()
