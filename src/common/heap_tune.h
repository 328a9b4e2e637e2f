/* Allocator settings for a process whose heap holds relay buffers in flight. */
#ifndef PORTMUX_HEAP_TUNE_H
#define PORTMUX_HEAP_TUNE_H

/* Call once at start-up, before the event loop allocates. */
void heap_tune_for_relay(void);

#endif
