/* The extra sessions portmux-client keeps to the other nodes of a cluster (SPEC §7): the
 * --server session's HelloResponse (and any session's "nodes" Notice) lists the live
 * nodes' advertise addresses, the answering node first; the client keeps one tunnel
 * session to every listed node but the one its --server session reached, with the same
 * options and the same backoff as that one, and drops a node no longer listed. Without a
 * cluster (no list, or only the --server node) nothing happens. */
#ifndef PORTMUX_CLIENT_NODES_H
#define PORTMUX_CLIENT_NODES_H

#include <stdbool.h>
#include <stddef.h>

struct event_base;
struct evdns_base;
struct json_t;
struct nodeset;
struct tclient_opts;

/* base_opts: the --server session's options; each node's session copies them with its
 * own host and port (and its host as the certificate name unless server_name is given:
 * an explicit --server-name applies to every node). Strings are borrowed and must outlive
 * the set. no_reconnect: a lost node session is not retried. */
struct nodeset *nodeset_new(struct event_base *base, struct evdns_base *dns,
                            const struct tclient_opts *base_opts, const char *server_name,
                            bool no_reconnect);
/* A node list from the --server session (primary: its first entry is the node it reached,
 * which gets no extra session) or from a node's session. Borrowed; applied from the loop,
 * not from inside the caller. A list that is not an array means "no cluster". */
void nodeset_update(struct nodeset *ns, struct json_t *nodes, bool primary);
/* The --server session ended: the node it had reached gets a node session of its own
 * while it is listed, so that a --server reconnect that a load balancer sends elsewhere
 * does not leave that node without this client. */
void nodeset_primary_lost(struct nodeset *ns);
/* Node sessions that are up now. 0 for NULL. */
size_t nodeset_up(const struct nodeset *ns);
/* fn is called (from the loop) when the last node session that was up ends. */
void nodeset_set_on_all_down(struct nodeset *ns, void (*fn)(void *arg), void *arg);
/* Closes every node session. NULL-safe. */
void nodeset_free(struct nodeset *ns);

#endif
