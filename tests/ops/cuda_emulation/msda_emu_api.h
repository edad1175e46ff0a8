// The emulator's control functions, exported by every emulated library
// (include once, after msda_emu.h, in the library's single translation unit).
#pragma once

#include "msda_emu.h"

// Device properties reported by cudaDeviceGetAttribute.
extern "C" __attribute__((visibility("default"))) void msda_emu_set_device(int sm_count, int max_shared_optin_bytes) {
  msda_emu::set_device(sm_count, max_shared_optin_bytes);
}

// CPU seconds one launch may take before it fails with cudaErrorLaunchTimeout.
extern "C" __attribute__((visibility("default"))) void msda_emu_set_time_limit(double seconds) {
  msda_emu::set_time_limit(seconds);
}

// Seed of the block and thread scheduling order.
extern "C" __attribute__((visibility("default"))) void msda_emu_set_seed(uint64_t seed) { msda_emu::set_seed(seed); }

// Messages of the latest failing call ("" when it succeeded).
extern "C" __attribute__((visibility("default"))) const char* msda_emu_last_error_message() {
  return msda_emu::g_message.c_str();
}

// One line per launch since the last call: "<kernel> grid=(x,y,z) block=(x,y,z) shared=<bytes>".
extern "C" __attribute__((visibility("default"))) const char* msda_emu_take_launch_log() {
  static std::string taken;
  taken.swap(msda_emu::g_launch_log);
  msda_emu::g_launch_log.clear();
  return taken.c_str();
}

// Clears the errors (a kernel fault is sticky, as on a GPU).
extern "C" __attribute__((visibility("default"))) void msda_emu_reset_errors() { msda_emu::reset_errors(); }

// float4 / float2 atomicAdds run since the last call (only the sm_90 build makes any).
extern "C" __attribute__((visibility("default"))) uint64_t msda_emu_take_vector_atomics() {
  const uint64_t count = msda_emu::g_vector_atomics;
  msda_emu::g_vector_atomics = 0;
  return count;
}
