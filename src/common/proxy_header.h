/* PROXY protocol headers (haproxy's proxy-protocol.txt, versions 1 and 2): what a target
 * behind portmux reads first to learn the public client's address. Pure: addresses in,
 * bytes out. */
#ifndef PORTMUX_PROXY_HEADER_H
#define PORTMUX_PROXY_HEADER_H

#include <stddef.h>
#include <sys/socket.h>

/* Room for the longest header either version produces (v1 TCP6 is 104 bytes, v2 TCP6
 * 52). */
#define PROXY_HEADER_MAX 108

/* Writes the version (1 or 2) header for a TCP connection from src to dst into buf
 * (PROXY_HEADER_MAX bytes). IPv4-mapped IPv6 addresses are written as IPv4, so a
 * dual-stack listener still says TCP4 for an IPv4 client; when the two addresses are of
 * different families the header says UNKNOWN (v1) / LOCAL (v2), as the spec asks.
 * Returns the header's length, or -1 for a version other than 1 or 2. */
int proxy_header_build(int version, const struct sockaddr *src, const struct sockaddr *dst,
                       unsigned char *buf);

#endif
