// Per-dtype element arithmetic of the fused epilogue, on raw bits so that the loops around it
// vectorize (the conversions are c10's own bit-arithmetic ones, which are branch-free).
//
// Stock `relu(out + identity)` in float16/bfloat16 computes the add in float32, rounds it to the
// dtype, and then takes relu of the ROUNDED value (clamp_min: NaN and -0 pass through). A negative
// sum that rounds to -0 therefore stays -0; taking relu before rounding would give +0. So: y is the
// rounded sum, replaced by +0 where the sum was negative and did not round to -0.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace selectivity {
namespace epilogue_cpu {

template <typename T>
struct Elem;  // Bits: storage; Acc: add and mean precision (float32, float64 for float64);
             // round: Acc -> Bits once; relu: round, then relu of the rounded value

template <>
struct Elem<float> {
  using Bits = float;
  using Acc = float;
  static float load(float v) { return v; }
  static float round(float s) { return s; }
  static float relu(float s) { return s < 0.f ? 0.f : s; }
  static float value(float y) { return y; }
};

template <>
struct Elem<double> {
  using Bits = double;
  using Acc = double;
  static double load(double v) { return v; }
  static double round(double s) { return s; }
  static double relu(double s) { return s < 0.0 ? 0.0 : s; }
  static double value(double y) { return y; }
};

template <>
struct Elem<c10::Half> {
  using Bits = uint16_t;
  using Acc = float;
  static float load(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static uint16_t round(float s) { return c10::detail::fp16_ieee_from_fp32_value(s); }
  static uint16_t relu(float s) {
    const uint16_t r = round(s);
    return (s < 0.f && r != 0x8000u) ? uint16_t(0) : r;
  }
  static float value(uint16_t y) { return c10::detail::fp16_ieee_to_fp32_value(y); }
};

template <>
struct Elem<c10::BFloat16> {
  using Bits = uint16_t;
  using Acc = float;
  static float load(uint16_t v) {
    const uint32_t w = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &w, sizeof f);
    return f;
  }
  static uint16_t round(float s) { return c10::detail::round_to_nearest_even(s); }
  static uint16_t relu(float s) {
    const uint16_t r = round(s);
    return (s < 0.f && r != 0x8000u) ? uint16_t(0) : r;
  }
  static float value(uint16_t y) { return load(y); }
};

}  // namespace epilogue_cpu
}  // namespace selectivity
