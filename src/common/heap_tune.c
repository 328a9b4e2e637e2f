#include "heap_tune.h"

#include <stdlib.h> /* defines __GLIBC__ on glibc */

#ifdef __GLIBC__
#include <malloc.h>
#endif

/* Bulk relaying allocates and frees 64-128 KiB evbuffer chains all the time. With glibc's
 * defaults the top of the heap is handed back to the kernel whenever ~256 KiB of it is
 * free, and the next chains fault fresh zeroed pages in again (page faults and clearing
 * pages on every window; bench/RESULTS.md, "Measurements behind the code"). Keeping up to
 * 8 MiB of free heap (a few windows' worth) removes that churn and still bounds what an
 * idle process holds after a burst. A fixed mmap threshold keeps the
 * 128 KiB chains on the heap from the first one (the dynamic threshold only rises after
 * the first mmapped chain is freed) and stops glibc from moving the trim threshold. */
#define HEAP_TRIM_THRESHOLD (8 * 1024 * 1024)
#define HEAP_MMAP_THRESHOLD (1024 * 1024)

void heap_tune_for_relay(void)
{
#ifdef __GLIBC__
    (void)mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD);
    (void)mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD);
#endif
}
