// The one source of the targets that own tilt's precompiled LibTorch header (cmake/pch.cmake).
int tilt_pch_anchor() { return 0; }
