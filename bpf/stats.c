/* Capture decision counters (map capture_stats), read by the agent.
 *
 * Helpers that call map methods live in .c files, not in common.h: BCC
 * rewrites `map.lookup()` and friends only in the main compilation unit,
 * which is the concatenation of the bpf/ C files the loader hands it.
 */
#include "common.h"

static __always_inline void count(__u32 idx)
{
    __u64 *v = capture_stats.lookup(&idx);
    if (v)
        *v += 1;
}
