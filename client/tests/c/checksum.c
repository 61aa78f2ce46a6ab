/* Maps each file named on the command line through replicad_map and prints
 * its FNV-1a checksum. With "--wait" first: after printing, waits for a line
 * on stdin, then checksums the same mapping again (the test revokes the
 * replica meanwhile). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "replicad.h"

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

int main(int argc, char **argv) {
    int wait = 0, first = 1, failed = 0;
    if (argc > 1 && strcmp(argv[1], "--wait") == 0) {
        wait = 1;
        first = 2;
    }
    for (int i = first; i < argc; i++) {
        struct replicad_mapping m;
        int rc = replicad_map(argv[i], &m);
        if (rc < 0) {
            printf("%s error=%d (%s) handle=%p\n", argv[i], -rc, strerror(-rc), m.handle);
            failed = 1;
            continue;
        }
        printf("%s len=%zu on_replica=%d node=%u generation=%llu checksum=%016llx\n", argv[i],
               m.len, replicad_on_replica(&m), m.node, (unsigned long long)m.generation,
               (unsigned long long)fnv1a(m.addr, m.len));
        fflush(stdout);
        if (wait) {
            char line[16];
            if (!fgets(line, sizeof line, stdin))
                return 3;
            int before = replicad_on_replica(&m);
            uint64_t sum = fnv1a(m.addr, m.len); /* faults, falls back */
            int after = replicad_on_replica(&m);
            printf("%s again before=%d after=%d checksum=%016llx\n", argv[i], before, after,
                   (unsigned long long)sum);
            fflush(stdout);
        }
        replicad_unmap(&m);
        replicad_unmap(&m);
        if (m.handle != NULL || m.addr != NULL)
            return 4;
    }
    return failed ? 1 : 0;
}
