// Dtype dispatch for kernels that read float32, bfloat16 or float16 inputs (other dtypes raise).
#pragma once

#include <ATen/Dispatch.h>

#define DSV3_DISPATCH_FLOAT_INPUTS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
