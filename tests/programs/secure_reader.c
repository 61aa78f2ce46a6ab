/*
 * Test program for tests/trust.rs, linked with libreplicad_preload.so (a
 * set-user-ID program ignores LD_PRELOAD, but not the libraries it is
 * linked with): the shim's constructor runs in it and its mmap wrapper
 * sees every mapping, as with /etc/ld.so.preload.
 *
 *     replicad-secure-reader FILE
 *
 * Maps FILE read-only with mmap(2), as any program does, and prints
 *
 *     uid=<real uid> euid=<effective uid> secure=<getauxval(AT_SECURE)>
 *     fnv=<FNV-1a of every byte read through the mapping>
 *     head=<the first 32 bytes, printable ASCII or '.'>
 *     map=<the /proc/self/maps line of the mapping>
 *
 * Exits 1 if FILE cannot be opened, is empty or cannot be mapped.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s FILE\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
        perror(argv[1]);
        return 1;
    }
    size_t len = (size_t)st.st_size;
    const unsigned char *p = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    close(fd);
    printf("uid=%u euid=%u secure=%lu\n", (unsigned)getuid(), (unsigned)geteuid(),
           getauxval(AT_SECURE));
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h = (h ^ p[i]) * 0x100000001b3ull;
    }
    printf("fnv=%016llx\nhead=", (unsigned long long)h);
    for (size_t i = 0; i < len && i < 32; i++) {
        putchar(p[i] >= 0x20 && p[i] < 0x7f ? p[i] : '.');
    }
    putchar('\n');
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[4096];
    char want[32];
    snprintf(want, sizeof want, "%lx-", (unsigned long)p);
    while (maps && fgets(line, sizeof line, maps)) {
        if (strncmp(line, want, strlen(want)) == 0) {
            printf("map=%s", line);
        }
    }
    return 0;
}
