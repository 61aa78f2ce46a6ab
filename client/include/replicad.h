/*
 * replicad.h: map a file read-only through this NUMA node's replica.
 *
 * Link with -lreplicad_client (libreplicad_client.so, built by cargo from
 * the replicad-client crate).
 *
 *   struct replicad_mapping m;
 *   int rc = replicad_map("/data/index.seg", &m);
 *   if (rc < 0) { errno = -rc; perror("replicad_map"); ... }
 *   use((const unsigned char *)m.addr, m.len);
 *   replicad_unmap(&m);
 *
 * Without the daemon (or without a replica for this node) the file itself
 * is mapped: replicad_map only fails for reasons that mmap of the file
 * itself would fail for. When replicad revokes a replica before a writer
 * changes the file, the library's SIGBUS handler maps the file back over
 * the same addresses: readers go on with the file's current bytes. The
 * handler is installed on the first replica mapping and chains to the
 * SIGBUS action that was installed before it; a program that installs its
 * own SIGBUS handler afterwards must chain to the previous one too.
 *
 * Set REPLICAD_SOCKET to use another daemon socket, REPLICAD_DEBUG=1 to
 * print on stderr why the file itself was mapped. Only a daemon running as
 * root, or as the uid REPLICAD_DAEMON_UID names, is believed, and only its
 * replicas (read-only files on tmpfs or hugetlbfs that uid owns). A
 * set-user-ID program (or one with file capabilities: AT_SECURE) reads no
 * REPLICAD_* variable and believes root alone.
 */
#ifndef REPLICAD_H
#define REPLICAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct replicad_mapping {
    /* First byte of the read-only mapping. */
    const void *addr;
    /* Length in bytes: the file's size when it was mapped. */
    size_t len;
    /* 1 if a replica backed the mapping when it was made; see
     * replicad_on_replica for the current state. */
    int on_replica;
    /* The replica's NUMA node and generation (0 for the file itself). */
    uint32_t node;
    uint64_t generation;
    /* Owned by the library; NULL once unmapped. */
    void *handle;
};

/*
 * Map `path` read-only. Returns 0 and fills *out, or a negative errno with
 * *out zeroed: -ENOENT, -EACCES, ... (open), -ENODEV (not a regular file),
 * -ENODATA (empty file), -ENOMEM, ... (mmap), -EINVAL (NULL argument),
 * -EIO (internal error). Never longjmps or unwinds.
 *
 * Contract: path is a NUL-terminated string; out points to writable memory.
 * Release a filled struct with replicad_unmap exactly once (do not unmap a
 * copy of it as well).
 */
int replicad_map(const char *path, struct replicad_mapping *out);

/*
 * replicad_map with options: socket (NULL: $REPLICAD_SOCKET or
 * /run/replicad/replicad.sock), node (negative: the caller's home node),
 * timeout_ms (0: 2000).
 */
int replicad_map_with(const char *path, const char *socket, int64_t node,
                      uint32_t timeout_ms, struct replicad_mapping *out);

/*
 * 1 while the replica still backs the mapping, 0 after a revoke made it
 * fall back to the file, or if it never was a replica (or m is NULL or
 * unmapped). Contract: m is NULL or a struct filled by replicad_map and not
 * being unmapped concurrently.
 */
int replicad_on_replica(const struct replicad_mapping *m);

/*
 * Unmap and zero *m. NULL or a zeroed struct is a no-op. Contract: no
 * thread reads the mapping during or after the call.
 */
void replicad_unmap(struct replicad_mapping *m);

#ifdef __cplusplus
}
#endif

#endif /* REPLICAD_H */
