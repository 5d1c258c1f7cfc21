// the emulator stands in for the CUDA runtime (tests/cuda_emu/README.md)
#pragma once
#include "cuda_emu.h"
