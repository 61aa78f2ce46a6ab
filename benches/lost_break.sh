#!/bin/bash
# Why benches/writer_wait.rs opens each replicated file for writing once
# right after replicating it (Daemon::warm_up): a lease-break signal that
# never reaches replicad.
#
#   benches/lost_break.sh [IDLE_SECONDS]     (root; after cargo build --release)
#
# Starts a replicad of its own, replicates a 1 MiB file, waits
# IDLE_SECONDS (default 15: longer than the request pool keeps an idle
# thread), then opens the file for writing (O_WRONLY|O_APPEND). The kernel
# sends a lease break to the thread that took the lease (F_SETLEASE makes
# the calling thread the file's owner, and send_sigio finds no task once
# that thread has exited), so if the pool thread that served the replicate
# request is gone, no signal comes: the open waits out
# /proc/sys/fs/lease-break-time, the kernel breaks the lease by force, and
# replicad revokes nothing (its
# replicad_invalidations_total{reason="write"} stays 0; the replica stays
# valid and handed out). With IDLE_SECONDS=2 the same open is revoked at
# once. Prints both numbers; exits 1 when the break was lost.
set -euo pipefail
idle=${1:-15}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
dir=$(mktemp -d /tmp/replicad-lost-break-XXXXXX)
file=$(mktemp /var/tmp/replicad-lost-break-XXXXXX)
port=$((40000 + RANDOM % 20000))
head -c 1048576 /dev/zero > "$file"
cat > "$dir/replicad.toml" <<EOF
[daemon]
run_dir = "$dir"
metrics_listen = "127.0.0.1:$port"
[store]
huge_pages = false
EOF
"$bin/replicad" --config "$dir/replicad.toml" 2> "$dir/replicad.log" &
daemon=$!
cleanup() {
	kill "$daemon" 2> /dev/null && wait "$daemon" || true
	rm -rf "$dir" "$file"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$dir/replicad.sock" ] && break; sleep 0.1; done
"$bin/replicactl" --socket "$dir/replicad.sock" replicate "$file" > /dev/null
echo "replicad $daemon: $(ls /proc/$daemon/task | wc -l) threads after replicate"
sleep "$idle"
echo "after ${idle} s idle: $(ls /proc/$daemon/task | wc -l) threads; lease-break-time $(cat /proc/sys/fs/lease-break-time) s"
start=$(date +%s.%N)
exec 3>> "$file"
exec 3>&-
end=$(date +%s.%N)
revoked=$(exec 4<> "/dev/tcp/127.0.0.1/$port"; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&4; \
	grep -E '^replicad_invalidations_total\{reason="write"\}' <&4 | awk '{print $2}')
echo "open for writing waited $(echo "$end - $start" | bc) s; revoked by replicad: ${revoked:-?}"
[ "${revoked:-0}" != 0 ]
