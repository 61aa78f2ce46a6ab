#!/usr/bin/python3
# The flooder of tests/limits.rs and benches/limits.rs, run as nobody:
#   flood.py SOCKET N SECONDS
# keeps up to N connections to replicad's socket open (as far as it knows:
# some wait in the listen backlog), sends a garbage packet on each every
# 50 ms, reconnects the ones the daemon closes, and at the end prints
# "held H refused R": how many it had open at most, and how many were
# refused with replicad's limit.
import socket, sys, time
path, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns, held, refused, end = [], 0, 0, time.time() + secs
while time.time() < end:
    while len(conns) < n:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            break
        conns.append(s)
    alive = []
    for s in conns:
        try:
            got = s.recv(65536)
            if b"limit" in got:
                refused += 1
            if b"limit" in got or got == b"":
                s.close()
                continue
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        try:
            s.send(b"garbage!")
            alive.append(s)
        except BlockingIOError:
            alive.append(s)
        except OSError:
            s.close()
    conns = alive
    held = max(held, len(conns))
    time.sleep(0.05)
print("held", held, "refused", refused)
