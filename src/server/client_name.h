/* What a tunnel client's name (and a config token) may be: 1-64 characters of A-Z a-z 0-9 . _ - (SPEC §4). A
 * leaf of its own, so the config (which checks the names it reads) and the clients
 * registry (which checks stored rows and Hellos) share it without including each other. */
#ifndef PORTMUX_CLIENT_NAME_H
#define PORTMUX_CLIENT_NAME_H

#include <stdbool.h>

#define CLIENT_NAME_MAX 64
/* Tokens written in the config file must be at least this long (the API makes its own). */
#define CLIENT_TOKEN_MIN_CONFIG 16

/* The client a tunnel mapping names when it names none, and the first client a fresh
 * server creates. */
#define CLIENT_NAME_DEFAULT "default"

/* True when name is a valid client name (NULL is not). */
bool client_name_valid(const char *name);

/* name, or CLIENT_NAME_DEFAULT when it is NULL or "": the one place the default applies
 * to a mapping's client. */
const char *client_name_or_default(const char *name);

#endif
