/* PROXY protocol headers (haproxy's proxy-protocol.txt, versions 1 and 2): what a target
 * behind portmux reads first to learn the public client's address, and what a balancer in
 * front of portmux sends first (trusted_proxies). Pure: addresses in, bytes out, and back. */
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

/* What proxy_header_parse needs to see at most to decide: the longest v1 header (107
 * bytes, CRLF included), and more than a v2 header's fixed part and TCP6 addresses (52). */
#define PROXY_HEADER_PEEK 108

/* What a received header says. src.ss_family is AF_UNSPEC when it names no TCP client
 * (v1 UNKNOWN, v2 LOCAL such as a balancer's health check, v2 UNSPEC or UNIX): the
 * connection speaks for itself then. */
struct proxy_header_info {
    struct sockaddr_storage src;
    struct sockaddr_storage dst;
};

/* Reads the header at the start of buf[0..len). Returns its whole length (> 0), which for
 * v2 may be more than len: the TLVs after the addresses, which the caller discards unread;
 * 0 when buf is a proper beginning of a header and more bytes are needed (never once len
 * reaches PROXY_HEADER_PEEK); -1 when it is not a PROXY header. Fills *out only on > 0. */
long proxy_header_parse(const unsigned char *buf, size_t len, struct proxy_header_info *out);

#endif
