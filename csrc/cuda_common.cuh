// fastkd: host-side helpers shared by the CUDA sources (include after common.h).
#pragma once

// The CPU-only torch wheels ship the c10/cuda headers without the CMake-generated
// c10/cuda/impl/cuda_cmake_macros.h; scripts/nvcc_check.sh compiles against them. With a CUDA torch
// the file exists and this changes nothing.
#if defined(__has_include)
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>) && !defined(C10_CUDA_NO_CMAKE_CONFIGURE_FILE)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#endif

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "cuda_device.cuh"
