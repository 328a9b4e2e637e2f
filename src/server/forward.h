/* Direct mode: an accepted public connection is joined to target_ip:target_port. */
#ifndef PORTMUX_FORWARD_H
#define PORTMUX_FORWARD_H

#include <event2/util.h>

struct mapping;

/* Connects to the mapping's target and relays both ways until both sides are done.
 * Takes ownership of fd; accounts the connection on m with mapping_conn_begin/end. */
void forward_start(struct mapping *m, evutil_socket_t fd);

#endif
