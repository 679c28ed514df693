// Run-time choice of the row-kernel variant (row_kernels_*.cpp): the best instruction set this CPU
// runs, or one pinned for tests.
#include <atomic>
#include <string>

#include "ops.h"

namespace spo_cpu {
namespace {

bool cpu_has(const std::string& isa) {
#if SPO_CPU_X86_VARIANTS
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == "generic";
}

const KernelTable* table_for(const std::string& isa) {
#if SPO_CPU_X86_VARIANTS
  if (isa == "avx512") return isa_avx512::table();
  if (isa == "avx2") return isa_avx2::table();
#endif
  return isa_generic::table();
}

const KernelTable* best_table() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_has(isa)) return table_for(isa);
  return isa_generic::table();
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable* kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

bool set_isa(const std::string& isa) {
  if (isa == "auto") {
    g_table.store(best_table(), std::memory_order_release);
    return true;
  }
  if (!cpu_has(isa)) return false;
  g_table.store(table_for(isa), std::memory_order_release);
  return true;
}

std::string isa() { return kernels()->isa; }

}  // namespace spo_cpu
