/*
 * toxcore's own lossy-packet ceiling between two hosts: the reference
 * bench/run.sh measures veilmesh's Tox path against (no TUN, no Noise, no
 * channels; just two Tox friends, one sending lossy packets as fast as
 * toxcore takes them, the other counting what arrives).
 *
 *   tox_probe recv HOST PORT DHT_KEY            prints its Tox ID, then Gbit/s
 *   tox_probe send HOST PORT DHT_KEY TOX_ID SECONDS
 *
 * HOST PORT DHT_KEY: the bootstrap node. Both iterate as soon as a packet
 * reaches toxcore's UDP socket (found by its port), as veilmesh does.
 *
 * Built with -DVEILMESH_MEMLOCK (and the two functions exported, see
 * bench/run.sh) it runs toxcore as veilmesh does: libsodium's per-packet
 * memory locking replaced by stand-ins that lock nothing
 * (transports/tox/src/memlock.rs).
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <tox/tox.h>

#define PACKET_ID 200

#ifdef VEILMESH_MEMLOCK
int sodium_mlock(void *addr, size_t len) {
    (void)addr; (void)len;
    errno = ENOSYS;
    return -1;
}

int sodium_munlock(void *addr, size_t len) {
    if (addr) memset(addr, 0, len);
    return 0;
}
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int unhex(const char *text, uint8_t *out, size_t len) {
    if (strlen(text) != 2 * len) return -1;
    for (size_t i = 0; i < len; i++) {
        unsigned int byte;
        if (sscanf(text + 2 * i, "%2x", &byte) != 1) return -1;
        out[i] = (uint8_t)byte;
    }
    return 0;
}

/* The descriptor of our UDP socket bound to `port`, or -1. */
static int udp_socket_on(uint16_t port) {
    for (int fd = 3; fd < 1024; fd++) {
        int type = 0;
        socklen_t len = sizeof type;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_DGRAM) continue;
        struct sockaddr_storage addr;
        len = sizeof addr;
        if (getsockname(fd, (struct sockaddr *)&addr, &len) != 0) continue;
        uint16_t bound = 0;
        if (addr.ss_family == AF_INET) bound = ntohs(((struct sockaddr_in *)&addr)->sin_port);
        if (addr.ss_family == AF_INET6) bound = ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);
        if (bound == port) return fd;
    }
    return -1;
}

static uint64_t bytes;
static double first, last;
static int connected_udp;

static void on_request(Tox *tox, const uint8_t *key, const uint8_t *msg, size_t len, void *user) {
    (void)msg; (void)len; (void)user;
    tox_friend_add_norequest(tox, key, NULL);
}

static void on_connection(Tox *tox, uint32_t friend, TOX_CONNECTION status, void *user) {
    (void)tox; (void)friend; (void)user;
    connected_udp = status == TOX_CONNECTION_UDP;
}

static void on_lossy(Tox *tox, uint32_t friend, const uint8_t *data, size_t len, void *user) {
    (void)tox; (void)friend; (void)data; (void)user;
    double t = now();
    if (bytes == 0) first = t;
    last = t;
    bytes += len;
}

/* Iterates, then waits for a packet or the next iteration (at most `cap` ms). */
static void iterate_and_wait(Tox *tox, int fd, int cap) {
    tox_iterate(tox, NULL);
    int wait = (int)tox_iteration_interval(tox);
    if (wait > cap) wait = cap;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    poll(&p, fd >= 0 ? 1 : 0, wait);
}

int main(int argc, char **argv) {
    if (argc < 5 || (strcmp(argv[1], "recv") != 0 && strcmp(argv[1], "send") != 0) ||
        (strcmp(argv[1], "send") == 0 && argc < 7)) {
        fprintf(stderr, "usage: tox_probe recv HOST PORT DHT_KEY | send HOST PORT DHT_KEY TOX_ID SECONDS\n");
        return 2;
    }
    int sending = strcmp(argv[1], "send") == 0;
    uint8_t dht_key[TOX_PUBLIC_KEY_SIZE];
    if (unhex(argv[4], dht_key, sizeof dht_key) != 0) {
        fprintf(stderr, "bad DHT key\n");
        return 2;
    }
    struct Tox_Options *options = tox_options_new(NULL);
    tox_options_set_ipv6_enabled(options, false);
    tox_options_set_local_discovery_enabled(options, false);
    Tox *tox = tox_new(options, NULL);
    tox_options_free(options);
    if (!tox) {
        fprintf(stderr, "tox_new failed\n");
        return 1;
    }
    tox_callback_friend_request(tox, on_request);
    tox_callback_friend_connection_status(tox, on_connection);
    tox_callback_friend_lossy_packet(tox, on_lossy);
    tox_bootstrap(tox, argv[2], (uint16_t)atoi(argv[3]), dht_key, NULL);
    int fd = udp_socket_on(tox_self_get_udp_port(tox, NULL));

    if (!sending) {
        uint8_t id[TOX_ADDRESS_SIZE];
        tox_self_get_address(tox, id);
        for (size_t i = 0; i < sizeof id; i++) printf("%02X", id[i]);
        printf("\n");
        fflush(stdout);
        double start = now();
        /* Until 2 s after the last packet (or 180 s of nothing). */
        while (bytes == 0 ? now() - start < 180 : now() - last < 2) iterate_and_wait(tox, fd, 50);
        if (bytes == 0 || last <= first) {
            fprintf(stderr, "nothing received\n");
            return 1;
        }
        printf("%.3f\n", bytes * 8 / (last - first) / 1e9);
        tox_kill(tox);
        return 0;
    }

    uint8_t id[TOX_ADDRESS_SIZE];
    if (unhex(argv[5], id, sizeof id) != 0) {
        fprintf(stderr, "bad Tox ID\n");
        return 2;
    }
    uint32_t friend = tox_friend_add(tox, id, (const uint8_t *)"probe", 5, NULL);
    double start = now();
    while (!connected_udp) {
        if (now() - start > 120) {
            fprintf(stderr, "no UDP friend connection\n");
            return 1;
        }
        iterate_and_wait(tox, fd, 1);
    }
    uint8_t packet[TOX_MAX_CUSTOM_PACKET_SIZE];
    memset(packet, 0xab, sizeof packet);
    packet[0] = PACKET_ID;
    double end = now() + atof(argv[6]);
    uint64_t sent = 0, refused = 0;
    while (now() < end) {
        for (int i = 0; i < 64; i++) {
            if (tox_friend_send_lossy_packet(tox, friend, packet, sizeof packet, NULL)) sent++;
            else refused++;
        }
        tox_iterate(tox, NULL);
    }
    fprintf(stderr, "tox_probe: sent %llu packets, %llu refused\n", (unsigned long long)sent,
            (unsigned long long)refused);
    tox_kill(tox);
    return 0;
}
