# CUDA for the fused retention kernels (model/cuda/), included from the top-level CMakeLists.txt
# (a language must be enabled in the directory common to every target that links it).
#
#   RETNET_CUDA_KERNELS  nvcc was found: model/cuda/retention_kernels.cu is compiled into the
#                        static library retnet_cuda_kernels (no torch headers), and the host-only
#                        self-test retnet-cuda-selftest is built. CI (CPU LibTorch + CUDA 13 nvcc)
#                        gets this, so the kernels are compiled on every build there.
#   RETNET_CUDA          the fast path is linked into retnet_model (model/cuda/retention_cuda.cc,
#                        RETNET_WITH_CUDA=1). Defaults to ON exactly when the LibTorch found has
#                        CUDA; requires nvcc.
set(RETNET_TORCH_HAS_CUDA OFF)
if(TARGET torch_cuda OR TARGET c10_cuda OR TORCH_CUDA_LIBRARIES)
  set(RETNET_TORCH_HAS_CUDA ON)
endif()
option(RETNET_CUDA "Fused CUDA kernels, CUDA graphs in retnet_model (needs a CUDA LibTorch)"
       ${RETNET_TORCH_HAS_CUDA})
if(RETNET_CUDA AND NOT RETNET_TORCH_HAS_CUDA)
  message(FATAL_ERROR "RETNET_CUDA=ON but the LibTorch found (${Torch_DIR}) has no CUDA")
endif()

# nvcc is often not on PATH (/usr/local/cuda/bin); CUDACXX is what CMake's detection honours.
if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS /usr/local/cuda/bin/nvcc)
  set(ENV{CUDACXX} /usr/local/cuda/bin/nvcc)
endif()
# The kernels' architectures: RETNET_CUDA_ARCHITECTURES, else TORCH_CUDA_ARCH_LIST (variable or
# environment, e.g. "8.0;8.6;9.0+PTX" -> 80-real;86-real;90), else 90 (H100/H200). A CUDA
# LibTorch sets CMAKE_CUDA_ARCHITECTURES to OFF, so that variable is not a guide.
set(_retnet_archs "")
set(_torch_archs "${TORCH_CUDA_ARCH_LIST}")
if(NOT _torch_archs)
  set(_torch_archs "$ENV{TORCH_CUDA_ARCH_LIST}")
endif()
string(REPLACE " " ";" _torch_archs "${_torch_archs}")
foreach(_a IN LISTS _torch_archs)
  string(REGEX MATCH "^([0-9]+)\\.([0-9]+)(\\+PTX)?$" _m "${_a}")
  if(_m)
    if(CMAKE_MATCH_3)
      list(APPEND _retnet_archs "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
    else()
      list(APPEND _retnet_archs "${CMAKE_MATCH_1}${CMAKE_MATCH_2}-real")
    endif()
  endif()
endforeach()
if(NOT _retnet_archs)
  set(_retnet_archs 90)
endif()
set(RETNET_CUDA_ARCHITECTURES "${_retnet_archs}" CACHE STRING "GPU architectures of model/cuda kernels")
if(NOT CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "OFF")
  set(CMAKE_CUDA_ARCHITECTURES ${RETNET_CUDA_ARCHITECTURES})
endif()
include(CheckLanguage)
check_language(CUDA)
set(RETNET_CUDA_KERNELS OFF)
if(CMAKE_CUDA_COMPILER)
  enable_language(CUDA)
  find_package(CUDAToolkit QUIET)
  if(TARGET CUDA::cudart)
    set(RETNET_CUDA_KERNELS ON)
    if(CCACHE_PROGRAM)
      set(CMAKE_CUDA_COMPILER_LAUNCHER ${CCACHE_PROGRAM})
    endif()
  endif()
endif()
if(RETNET_CUDA AND NOT RETNET_CUDA_KERNELS)
  message(FATAL_ERROR "RETNET_CUDA=ON needs nvcc and the CUDA runtime (set CUDACXX)")
endif()
message(STATUS "retnet: CUDA kernels ${RETNET_CUDA_KERNELS} (nvcc: ${CMAKE_CUDA_COMPILER}), "
               "fast path in retnet_model ${RETNET_CUDA} (LibTorch CUDA: ${RETNET_TORCH_HAS_CUDA})")
