/* portmux-client's live status: the session state, RTT, and every target the client
 * forwards to (with the public port when the server announced it), with active streams
 * and bytes each way; a summary line at exit.
 *
 * When stdout is a terminal (and TERM is not "dumb") the status is a block at the bottom
 * of the screen, redrawn in place once a second. The rows above it become the terminal's
 * scroll region (DECSTBM, as apt draws its progress bar), so log lines written to stderr
 * on the same terminal scroll above the block and never overwrite it. Otherwise nothing
 * is drawn and only the summary goes to stdout.
 *
 * Target names come from the server: they are shown with every byte outside printable
 * ASCII replaced, so a server cannot send escape sequences to the user's terminal. */
#ifndef PORTMUX_STATUS_H
#define PORTMUX_STATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct status;
struct status_target;

/* Longest target shown ("host:port", "[v6]:port"); longer ones are cut. */
#define STATUS_TARGET_MAX 270

struct status_opts {
    const char *server_host;   /* as given to --server; copied */
    uint16_t server_port;
    const char *name;          /* client name; copied */
    bool tls;
    int out_fd;                /* where the block and the summary go (normally 1) */
};

/* Creates the status; draws the block when out_fd is a terminal. NULL on failure. */
struct status *status_new(struct event_base *base, const struct status_opts *opts);
/* Removes the block (restoring the whole screen for scrolling) and frees. NULL-safe. */
void status_free(struct status *s);
/* Removes the block and writes the summary line: uptime, streams served, bytes each way. */
void status_finish(struct status *s);

/* Session state; every function is NULL-safe. */
void status_connecting(struct status *s);
void status_connected(struct status *s);
/* The session ended (the reason is shown until the next state). */
void status_lost(struct status *s, const char *reason);
/* A reconnect is due in seconds; attempt as in the "reconnecting in" log line. */
void status_retry(struct status *s, double seconds, int attempt);
void status_refused(struct status *s, const char *message);
void status_set_rtt(struct status *s, double rtt_ms);
/* What the server says about this client in its HelloResponse: where it is managed
 * ("config" or "api") and, since the server started, how often a silent session of this
 * name was taken over and how often a Hello with its name was refused because a live
 * session answered. source NULL = the server did not say (an older server). */
void status_set_client(struct status *s, const char *source, long long takeovers,
                       long long refused);

/* The mappings the server announced in its HelloResponse replace the previous ones
 * (shown at the next redraw). */
void status_mappings_clear(struct status *s);
void status_mapping_add(struct status *s, int public_port, const char *target);
/* A server's Notice (an authoritative list): status_mappings_reset forgets the announced
 * ports (freeing nothing: a dial in flight may hold a row), status_mapping_add the new
 * ones, then status_mappings_prune hides the rows no mapping names and no stream uses
 * (the exit summary still counts them; a dial or announcement shows one again). */
void status_mappings_reset(struct status *s);
void status_mappings_prune(struct status *s);

/* The target "host:port" the server asked for (found or added). Past a bound, every new
 * target shares one "other targets" row. NULL when s is NULL. The pointer stays valid
 * until status_free(). */
struct status_target *status_target_get(struct status *s, const char *target);
/* A stream to the target is connected and bridged. NULL-safe, like the three below. */
void status_target_opened(struct status_target *t);
/* Bytes moved: in = from the public side to the target, out = from the target back. */
void status_target_bytes(struct status_target *t, size_t in, size_t out);
void status_target_closed(struct status_target *t);
/* A dial failed (refused, timed out, not in --allow); why is kept for the display. */
void status_target_failed(struct status_target *t, const char *why);

/* Cluster nodes (SPEC §7): a row per extra node session the client keeps besides the one
 * to --server, "Node  ADDR  state, RTT". status_node_add returns NULL when s is NULL, out
 * of memory, or past STATUS_NODES_MAX rows; every other node function is NULL-safe. */
#define STATUS_NODES_MAX 32
struct status_node;
struct status_node *status_node_add(struct status *s, const char *addr);
void status_node_remove(struct status *s, struct status_node *n);
void status_node_connecting(struct status_node *n);
void status_node_connected(struct status_node *n);
void status_node_lost(struct status_node *n, const char *reason);
void status_node_retry(struct status_node *n, double seconds, int attempt);
void status_node_set_rtt(struct status_node *n, double rtt_ms);

#endif
