// (Private to src/io.) The archive header of model files (model_io.cpp), shared with the files of
// models that are not velocity fields (an Adjoint Sampling control, sampling_run.cpp).
#pragma once

namespace tilt::model_file {

inline constexpr const char* kFormat = "tilt-velocity";
inline constexpr int kVersion = 1;

}  // namespace tilt::model_file
