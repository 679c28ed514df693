// Baseline variant of the per-row kernels (the compiler's default instruction set).
#define SPO_ISA isa_generic
#define SPO_ISA_NAME "generic"
#include "row_kernels.h"
