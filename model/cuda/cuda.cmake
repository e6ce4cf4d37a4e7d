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
if(NOT CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES 90)  # H200 (sm_90); torch itself follows TORCH_CUDA_ARCH_LIST
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
