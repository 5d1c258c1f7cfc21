# millipede_core_emu: millipede_core with src/backend/cuda compiled for the CPU emulator
# instead of by nvcc (README.md in this folder), and millipede-emu, the CLI linked with it.
file(GLOB MP_CUDA_EMU_INPUTS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/src/backend/cuda/*.cu)
set(MP_CUDA_EMU_SOURCES)
foreach(cu ${MP_CUDA_EMU_INPUTS})
  get_filename_component(name ${cu} NAME)
  file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR} ${cu})
  set(out ${PROJECT_BINARY_DIR}/cuda_emu/${name}.cpp)
  add_custom_command(OUTPUT ${out}
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/cuda_emu/translate.py ${cu} ${out} ${rel}
    DEPENDS ${cu} ${PROJECT_SOURCE_DIR}/tests/cuda_emu/translate.py
    COMMENT "cuda-emu: translating ${rel}" VERBATIM)
  list(APPEND MP_CUDA_EMU_SOURCES ${out})
endforeach()

add_library(millipede_core_emu STATIC ${MP_CUDA_EMU_SOURCES}
  ${PROJECT_SOURCE_DIR}/tests/cuda_emu/emu_runtime.cpp
  ${PROJECT_SOURCE_DIR}/tests/cuda_emu/emu_nccl.cpp)
# the emulator's cuda_runtime.h, cublas_v2.h, nccl.h and cub/ come before any real ones
target_include_directories(millipede_core_emu BEFORE PRIVATE
  ${PROJECT_SOURCE_DIR}/tests/cuda_emu/include ${PROJECT_SOURCE_DIR}/tests/cuda_emu)
target_include_directories(millipede_core_emu PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_compile_features(millipede_core_emu PRIVATE cxx_std_17)
# fibers switch stacks with _longjmp, which glibc's fortified longjmp would refuse
target_compile_options(millipede_core_emu PRIVATE -Wall -Wextra -g -U_FORTIFY_SOURCE)
target_compile_definitions(millipede_core_emu PUBLIC MP_HAVE_CUDA=1)
# comm_nccl.cu against the NCCL stand-in (include/nccl.h, emu_nccl.cpp: NCCL over MPI)
target_compile_definitions(millipede_core_emu PRIVATE MP_HAVE_NCCL=1)
target_link_libraries(millipede_core_emu PUBLIC millipede_objs)

add_executable(millipede-emu ${MP_MAIN_SOURCES})
target_include_directories(millipede-emu PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(millipede-emu PRIVATE millipede_core_emu)
# the layer benchmark's driver, run at a tiny shape by the tests (its numbers mean nothing here)
add_executable(bench_peer_cuda_emu ${PROJECT_SOURCE_DIR}/tools/bench/bench_peer_cuda.c)
target_include_directories(bench_peer_cuda_emu PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(bench_peer_cuda_emu PRIVATE millipede_core_emu)
message(STATUS "millipede: CUDA emulator build for the tests (millipede_core_emu)")
