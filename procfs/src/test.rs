//! The readers against fixture trees of verbatim kernel output
//! (`testdata/real`, captured from a `sleep` process) and hostile variants
//! (`testdata/hostile`), then live on `/proc/self`, then random bytes
//! through every parser.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::*;

const REAL_PID: u32 = 10164;

fn testdata(name: &str) -> ProcReader {
    ProcReader::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name),
    )
}

fn real() -> ProcReader {
    testdata("real")
}

fn hostile() -> ProcReader {
    testdata("hostile")
}

fn me() -> u32 {
    std::process::id()
}

#[test]
fn paths_are_under_the_root() {
    let r = ProcReader::new("/x");
    assert_eq!(r.root(), Path::new("/x"));
    assert_eq!(r.pid_dir(7), Path::new("/x/7"));
    assert_eq!(r.self_fd_path(3), Path::new("/x/self/fd/3"));
    assert_eq!(r.fd_path(7, 4), Path::new("/x/7/fd/4"));
    assert_eq!(
        r.map_files_path(7, 0x7f1c2a400000, 0x7f1c2a595000),
        Path::new("/x/7/map_files/7f1c2a400000-7f1c2a595000")
    );
    assert_eq!(
        r.map_files_path(1, 0x1000, 0xa000),
        Path::new("/x/1/map_files/1000-a000")
    );
    assert_eq!(ProcReader::default().root(), Path::new(PROC_ROOT));
    assert_eq!(SELF_MAPS_C.last(), Some(&0));
    assert_eq!(&SELF_MAPS_C[..SELF_MAPS_C.len() - 1], b"/proc/self/maps");
}

#[test]
fn pids_are_the_numeric_entries() {
    let mut p = hostile().pids().unwrap();
    p.sort_unstable();
    assert_eq!(p, vec![100, 101, 200, 300]);
    assert_eq!(real().pids().unwrap(), vec![REAL_PID]);
    let e = ProcReader::new("/nonexistent/proc").pids().unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().starts_with("/nonexistent/proc: "), "{e}");
}

#[test]
fn real_maps_and_smaps() {
    let maps = real().maps(REAL_PID).unwrap().unwrap();
    assert_eq!(maps.len(), 37);
    let first = &maps[0];
    assert_eq!(first.start, 0x556d852c8000);
    assert_eq!(first.len(), 0x2000);
    assert_eq!(first.perms_str(), "r--p");
    assert_eq!(first.dev, libc::makedev(0xfe, 0));
    assert_eq!(first.ino, 247774);
    assert_eq!(first.path, "/usr/bin/sleep");
    assert!(first.private_readonly_file());
    assert_eq!(first.line().path, "/usr/bin/sleep");
    assert!(maps
        .iter()
        .any(|m| m.path == "[stack]" && !m.private_readonly_file()));
    let text = real().maps_text(REAL_PID).unwrap().unwrap();
    assert_eq!(text.lines().count(), 37);
    let smaps = real().smaps(REAL_PID).unwrap().unwrap();
    assert_eq!(smaps.len(), 37);
    assert!(smaps.iter().all(|e| e.anonymous_kb.is_some()));
    assert_eq!(smaps[0].line(), maps[0].line());
}

#[test]
fn a_bad_maps_line_names_file_and_line() {
    let e = hostile().maps(101).unwrap_err();
    let Error::Parse { path, line, reason } = &e else {
        panic!("{e:?}");
    };
    assert!(path.ends_with("hostile/101/maps"), "{}", path.display());
    assert_eq!(*line, 3);
    assert!(reason.contains("rw-q"), "{reason}");
    assert!(e.to_string().contains("/101/maps: line 3: "), "{e}");
    // The text is still there for a caller that wants the good lines.
    assert_eq!(
        hostile().maps_text(101).unwrap().unwrap().lines().count(),
        6
    );
}

#[test]
fn real_stat() {
    let s = real().stat(REAL_PID).unwrap().unwrap();
    assert_eq!(s.pid, REAL_PID);
    assert_eq!(s.comm, "sleep");
    assert_eq!(s.state, 'S');
    assert_eq!(s.ppid, 10159);
    assert_eq!(s.pgrp, 10159);
    assert_eq!(s.session, 8274);
    assert_eq!(s.tty_nr, 0);
    assert_eq!(s.flags, 4194304);
    assert_eq!(s.minflt, 129);
    assert_eq!(s.majflt, 1);
    assert_eq!(s.priority, 20);
    assert_eq!(s.nice, 0);
    assert_eq!(s.num_threads, 1);
    assert_eq!(s.start_time, 26676);
    assert_eq!(s.vsize, 2990080);
    assert_eq!(s.rss_pages, 414);
    assert_eq!(real().start_time(REAL_PID).unwrap(), Some(26676));
}

#[test]
fn stat_comm_with_spaces_and_parens() {
    let s = hostile().stat(100).unwrap().unwrap();
    assert_eq!(s.pid, 100);
    assert_eq!(s.comm, "a b) (c");
    assert_eq!(s.state, 'S');
    assert_eq!(s.start_time, 26676);
    assert_eq!(hostile().comm(100).unwrap().unwrap(), "a b) (c");
    let s =
        parse_stat("5 (x\ny) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22").unwrap();
    assert_eq!(s.comm, "x\ny");
    assert_eq!(s.num_threads, 17);
    assert_eq!(s.start_time, 19);
}

#[test]
fn truncated_stat_is_a_parse_error() {
    let e = hostile().stat(101).unwrap_err();
    assert!(matches!(e, Error::Parse { line: 1, .. }), "{e:?}");
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(hostile().start_time(101).is_err());
    for bad in [
        "",
        "1 (x",
        "1 x) S",
        "x (y) S 1",
        ") 1 (",
        "1 (a) SS 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
    ] {
        assert!(parse_stat(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn real_status() {
    let s = real().status(REAL_PID).unwrap().unwrap();
    assert_eq!(s.uid, [0; 4]);
    assert_eq!(s.gid, [0; 4]);
    assert_eq!(s.cpus_allowed, vec![0, 1]);
    assert_eq!(s.mems_allowed, vec![0]);
    assert_eq!(s.threads, 1);
    assert_eq!(s.vm_rss_kb, Some(1828));
    assert_eq!(real().cpus_allowed(REAL_PID).unwrap(), Some(vec![0, 1]));
    // Name with ") (" is just another value.
    assert_eq!(hostile().status(100).unwrap().unwrap(), s);
}

#[test]
fn status_without_threads_is_a_parse_error() {
    let e = hostile().status(101).unwrap_err();
    assert!(matches!(e, Error::Parse { line: 0, .. }), "{e:?}");
    assert!(e.to_string().contains("Threads"), "{e}");
    // cpus_allowed needs only its own line.
    assert_eq!(hostile().cpus_allowed(101).unwrap(), Some(vec![0, 1]));
    let e = parse_status("Uid:\t0 0 0\n").unwrap_err();
    assert_eq!(e.line, 1);
    let e = parse_cpus_allowed("Cpus_allowed_list:\t0-x\n").unwrap_err();
    assert_eq!(e.line, 1);
    assert!(e.reason.contains("entry \"0-x\""), "{}", e.reason);
    assert_eq!(parse_cpus_allowed("Name: x\n").unwrap_err().line, 0);
}

#[test]
fn status_groups_empty_listed_or_garbage() {
    let base = "Uid:\t1 1 1 1\nGid:\t2 2 2 2\nThreads:\t1\nCpus_allowed_list:\t0\n";
    assert!(parse_status(base).unwrap().groups.is_empty());
    let s = parse_status(&format!("{base}Groups:\t\n")).unwrap();
    assert!(s.groups.is_empty());
    let s = parse_status(&format!("{base}Groups:\t4 24 27 4294967294 \n")).unwrap();
    assert_eq!(s.groups, vec![4, 24, 27, 4294967294]);
    let e = parse_status(&format!("{base}Groups:\t4 x\n")).unwrap_err();
    assert_eq!(e.line, 5);
    assert!(e.reason.contains("group ids"), "{}", e.reason);
}

#[test]
fn cgroups_v1_v2_hybrid_and_empty() {
    let c = real().cgroups(REAL_PID).unwrap().unwrap();
    assert_eq!(c.len(), 10);
    assert_eq!(c[0].hierarchy, 9);
    assert_eq!(c[0].controllers, vec!["name=systemd"]);
    assert_eq!(c[5].controllers, vec!["memory"]);
    assert_eq!(c[5].path, "/process_api/38bfd2297dd23f56982bc7b8736b9376");
    assert_eq!(
        c[9],
        CgroupEntry {
            hierarchy: 0,
            controllers: vec![],
            path: "/".into()
        }
    );
    let h = hostile().cgroups(101).unwrap().unwrap();
    assert_eq!(h[0].hierarchy, 12);
    assert_eq!(h[0].controllers, vec!["cpu", "cpuacct"]);
    assert_eq!(h[0].path, "/user.slice");
    assert_eq!(h[2].path, "/user.slice/x:y");
    assert_eq!(h[3].hierarchy, 0);
    assert_eq!(h[3].path, "/user.slice/session-1.scope");
    let empty = hostile().cgroups(100).unwrap().unwrap();
    assert_eq!(
        empty,
        vec![CgroupEntry {
            hierarchy: 0,
            controllers: vec![],
            path: "/".into()
        }]
    );
    assert_eq!(parse_cgroup("0:/x\n").unwrap_err().line, 1);
    assert_eq!(parse_cgroup("0::/\nx::/y\n").unwrap_err().line, 2);
}

#[test]
fn real_comm_and_fdinfo() {
    assert_eq!(real().comm(REAL_PID).unwrap().unwrap(), "sleep");
    let f = real().fdinfo(REAL_PID, 0).unwrap().unwrap();
    assert_eq!(
        f,
        FdInfo {
            pos: 0,
            flags: 0o100000,
            mnt_id: Some(24),
            ino: Some(3)
        }
    );
    assert!(!f.writable());
    let f = hostile().fdinfo(100, 5).unwrap().unwrap();
    assert_eq!(f.pos, 4096);
    assert_eq!(f.flags, 0o2100002);
    assert!(f.writable());
    assert_eq!(f.mnt_id, Some(31));
    assert_eq!(f.ino, Some(1234));
    // No flags line.
    let e = hostile().fdinfo(101, 3).unwrap_err();
    assert!(matches!(e, Error::Parse { line: 0, .. }), "{e:?}");
    // A closed fd is gone, like a vanished process.
    assert!(real().fdinfo(REAL_PID, 9).unwrap().is_none());
    assert_eq!(parse_fdinfo("pos:\t0\nflags:\t9\n").unwrap_err().line, 2);
    assert_eq!(
        parse_fdinfo("pos: 1\nflags: 01\n").unwrap(),
        FdInfo {
            pos: 1,
            flags: 1,
            mnt_id: None,
            ino: None
        }
    );
}

#[test]
fn real_auxv_and_loader() {
    let a = real().auxv(REAL_PID).unwrap().unwrap();
    assert_eq!(a.len(), 22);
    assert!(a.contains(&(6, 4096)), "AT_PAGESZ");
    assert!(a.iter().all(|&(k, _)| k != AT_NULL));
    let base = real().at_base(REAL_PID).unwrap().unwrap();
    let maps = real().maps(REAL_PID).unwrap().unwrap();
    let ld = maps
        .iter()
        .find(|l| l.start <= base && base < l.end)
        .unwrap();
    assert!(ld.path.ends_with("ld-linux-x86-64.so.2"), "{}", ld.path);
    // 100 bytes: six pairs and a partial one, no AT_NULL.
    let e = hostile().auxv(101).unwrap_err();
    assert!(matches!(e, Error::Parse { line: 7, .. }), "{e:?}");
    assert_eq!(parse_auxv(&[]).unwrap(), vec![]);
    let mut static_prog = Vec::new();
    for (k, v) in [(6u64, 4096u64), (AT_BASE, 0), (AT_NULL, 0), (9, 9)] {
        static_prog.extend_from_slice(&k.to_ne_bytes());
        static_prog.extend_from_slice(&v.to_ne_bytes());
    }
    assert_eq!(
        parse_auxv(&static_prog).unwrap(),
        vec![(6, 4096), (AT_BASE, 0)]
    );
}

#[test]
fn real_and_hostile_numa_maps() {
    let n = real().numa_maps(REAL_PID).unwrap().unwrap();
    assert_eq!(n.len(), 36);
    assert_eq!(n[0].start, 0x556d852c8000);
    assert_eq!(n[0].policy, "default");
    assert_eq!(n[0].file.as_deref(), Some("/usr/bin/sleep"));
    assert_eq!(n[0].mapped, 2);
    assert_eq!(n[0].pages_per_node.get(&0), Some(&2));
    assert_eq!(n[0].kernelpagesize_kb, 4);
    assert_eq!((n[3].anon, n[3].dirty), (1, 1));
    let h = hostile().numa_maps(100).unwrap().unwrap();
    assert_eq!(h.len(), 8);
    assert!(h[1].heap);
    assert_eq!(h[1].pages_per_node, BTreeMap::from([(0, 20), (1, 13)]));
    let huge = &h[2];
    assert_eq!(huge.policy, "bind:0-1");
    assert_eq!(huge.file.as_deref(), Some("/dev/hugepages/my db"));
    assert!(huge.huge);
    assert_eq!(huge.dirty, 512);
    assert_eq!(huge.kernelpagesize_kb, 2048);
    assert_eq!(huge.pages_per_node, BTreeMap::from([(0, 256), (1, 256)]));
    assert_eq!(h[3].policy, "interleave:0-1");
    assert_eq!(h[4].policy, "prefer:1");
    assert_eq!(h[5].kernelpagesize_kb, 1048576);
    assert_eq!(h[5].file.as_deref(), Some("/anon_hugepage (deleted)"));
    assert_eq!(h[6].kernelpagesize_kb, 0);
    assert!(h[6].pages_per_node.is_empty());
    assert!(h[7].stack);
    assert_eq!(parse_numa_maps("zz default\n").unwrap_err().line, 1);
    assert_eq!(parse_numa_maps("1000 default\n1000\n").unwrap_err().line, 2);
    assert_eq!(parse_numa_maps("1000 default N0=x\n").unwrap_err().line, 1);
}

use std::collections::BTreeMap;

#[test]
fn mountinfo_with_escapes_and_empty_source() {
    let m = hostile().mountinfo(None).unwrap();
    assert_eq!(m.len(), 5);
    assert_eq!(m[1].mount_point, "/");
    assert_eq!(m[1].optional, vec!["shared:1"]);
    assert_eq!(m[1].dev, libc::makedev(254, 0));
    let spaced = &m[2];
    assert_eq!(spaced.mount_id, 36);
    assert_eq!(spaced.parent_id, 27);
    assert_eq!(spaced.root, "/mnt1");
    assert_eq!(spaced.mount_point, "/mnt/with space");
    assert_eq!(spaced.options, "rw,noatime");
    assert_eq!(spaced.optional, vec!["master:1"]);
    assert_eq!(spaced.fstype, "ext3");
    assert_eq!(spaced.source, "/dev/root");
    assert_eq!(spaced.super_options, "rw,errors=continue");
    assert_eq!(m[3].source, "tmp\\fs");
    assert_eq!(m[3].optional, vec!["shared:7", "master:2"]);
    assert_eq!(m[4].root, "/a\tb");
    assert_eq!(m[4].source, "");
    assert!(m[4].optional.is_empty());
    assert_eq!(hostile().mountinfo(Some(100)).unwrap(), m);
    let r = real().mountinfo(Some(REAL_PID)).unwrap();
    assert_eq!(r.len(), 20);
    assert!(r
        .iter()
        .any(|e| e.mount_point == "/proc" && e.fstype == "proc"));
    // A missing mountinfo is an error: there is no "vanished" answer here.
    assert!(matches!(real().mountinfo(None), Err(Error::Io { .. })));
    for bad in [
        "1 2 0:1 / /x rw",
        "1 2 0:1 / /x rw shared:1 ext4 /dev/x rw",
        "1 2 01 / /x rw - a b c",
        "x 2 0:1 / /x rw - a b c",
    ] {
        assert_eq!(parse_mountinfo(bad).unwrap_err().line, 1, "{bad:?}");
    }
    assert_eq!(unescape_octal("a\\040b\\\\c\\999\\04"), "a b\\\\c\\999\\04");
}

#[test]
fn a_vanished_process_is_none_everywhere() {
    for r in [hostile(), real()] {
        for pid in [300, 999_999] {
            assert!(r.maps_text(pid).unwrap().is_none());
            assert!(r.maps(pid).unwrap().is_none());
            assert!(r.smaps(pid).unwrap().is_none());
            assert!(r.stat(pid).unwrap().is_none());
            assert!(r.start_time(pid).unwrap().is_none());
            assert!(r.status(pid).unwrap().is_none());
            assert!(r.cpus_allowed(pid).unwrap().is_none());
            assert!(r.cgroups(pid).unwrap().is_none());
            assert!(r.auxv(pid).unwrap().is_none());
            assert!(r.at_base(pid).unwrap().is_none());
            assert!(r.fds(pid).unwrap().is_none());
            assert!(r.fdinfo(pid, 0).unwrap().is_none());
            assert!(r.pagemap(pid).unwrap().is_none());
            assert!(r.numa_maps(pid).unwrap().is_none());
            assert!(!r.holds_for_write(pid, 1, 1));
        }
    }
    assert_eq!(hostile().comm(300).unwrap().unwrap(), "vanished");
    assert!(hostile().comm(999_999).unwrap().is_none());
    assert!(hostile().proc_owner_uid(300).unwrap().is_some());
    assert!(hostile().proc_owner_uid(999_999).unwrap().is_none());
}

#[test]
fn shared_writable_mappings_match_dev_and_ino() {
    let h = hostile();
    let dev = libc::makedev(8, 1);
    assert!(h.holds_for_write(200, dev, 4242));
    // Same ino on another device: not this file (the old code said yes).
    assert!(!h.holds_for_write(200, libc::makedev(8, 2), 4242));
    assert!(h.holds_for_write(200, libc::makedev(8, 2), 4545));
    assert!(!h.holds_for_write(200, dev, 4343), "r--s cannot write");
    assert!(
        !h.holds_for_write(200, dev, 4444),
        "rw-p writes a private copy"
    );
    assert_eq!(h.writers_of(dev, 4242), vec![(200, "writer".to_string())]);
    assert!(h.writers_of(dev, 1).is_empty());
}

// ---- live, on /proc/self ----

#[test]
fn live_maps_smaps_numa_maps() {
    let r = ProcReader::default();
    let maps = r.maps(me()).unwrap().unwrap();
    assert!(maps.iter().any(|m| m.private_readonly_file()));
    let smaps = r.smaps(me()).unwrap().unwrap();
    assert!(smaps.iter().any(|m| m.line().private_readonly_file()));
    if let Some(n) = r.numa_maps(me()).unwrap() {
        assert!(n.iter().any(|e| maps.iter().any(|m| m.start == e.start)));
    }
}

#[test]
fn live_stat_status_comm() {
    let r = ProcReader::default();
    let s = r.stat(me()).unwrap().unwrap();
    assert_eq!(s.pid, me());
    assert!(s.num_threads >= 1);
    assert_eq!(r.start_time(me()).unwrap(), Some(s.start_time));
    let st = r.status(me()).unwrap().unwrap();
    // SAFETY: getuid cannot fail and touches no memory of ours.
    let uid = unsafe { libc::getuid() };
    assert_eq!(st.uid[0], uid);
    assert!(st.threads >= 1);
    assert!(!st.cpus_allowed.is_empty());
    assert!(st.vm_rss_kb.is_some());
    assert_eq!(r.cpus_allowed(me()).unwrap(), Some(st.cpus_allowed.clone()));
    let comm = r.comm(me()).unwrap().unwrap();
    assert_eq!(comm, s.comm);
    assert!(!comm.ends_with('\n'));
    assert!(!r.cgroups(me()).unwrap().unwrap().is_empty());
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(r.proc_owner_uid(me()).unwrap(), Some(euid));
}

#[test]
fn live_auxv_and_mountinfo() {
    let r = ProcReader::default();
    let a = r.auxv(me()).unwrap().unwrap();
    // SAFETY: sysconf reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    assert!(a.contains(&(6, page)), "AT_PAGESZ");
    // SAFETY: getauxval only reads the process's auxiliary vector.
    let base = unsafe { libc::getauxval(libc::AT_BASE) };
    assert_eq!(r.at_base(me()).unwrap(), (base != 0).then_some(base));
    let m = r.mountinfo(None).unwrap();
    assert!(m.iter().any(|e| e.mount_point == "/"));
    assert_eq!(r.mountinfo(Some(me())).unwrap(), m);
}

#[test]
fn live_fds_fdinfo_and_writers() {
    let r = ProcReader::default();
    let path = std::env::temp_dir().join(format!("replicad-procfs-test-{}", me()));
    let mut w = std::fs::File::create(&path).unwrap();
    w.write_all(b"0123456789").unwrap();
    let ro = std::fs::File::open(&path).unwrap();
    let meta = ro.metadata().unwrap();
    let (dev, ino) = (meta.dev(), meta.ino());
    let fds = r.fds(me()).unwrap().unwrap();
    let (wfd, rfd) = (w.as_raw_fd() as u32, ro.as_raw_fd() as u32);
    assert!(fds.contains(&wfd) && fds.contains(&rfd));
    let wi = r.fdinfo(me(), wfd).unwrap().unwrap();
    assert_eq!(wi.pos, 10);
    assert!(wi.writable());
    assert_eq!(wi.ino, Some(ino));
    assert!(!r.fdinfo(me(), rfd).unwrap().unwrap().writable());
    assert_eq!(std::fs::metadata(r.fd_path(me(), rfd)).unwrap().ino(), ino);
    assert_eq!(
        std::fs::metadata(r.self_fd_path(ro.as_raw_fd()))
            .unwrap()
            .ino(),
        ino
    );
    assert!(r.holds_for_write(me(), dev, ino));
    assert!(r.writers_of(dev, ino).iter().any(|&(p, _)| p == me()));
    drop(w);
    assert!(
        !r.holds_for_write(me(), dev, ino),
        "only a read-only fd left"
    );
    drop(ro);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn live_pagemap_counts_written_pages() {
    let r = ProcReader::default();
    let pm = r.pagemap(me()).unwrap().unwrap();
    let mut buf = vec![0u8; 64 * 4096 + 4096];
    for b in buf.iter_mut().step_by(4096) {
        *b = 1;
    }
    let start = (buf.as_ptr() as u64).div_ceil(4096) * 4096;
    let end = start + 64 * 4096;
    let n = written_pages(&pm, start, end).unwrap();
    assert_eq!(n, 64);
    // More than one chunk of entries, and a range with nothing mapped.
    assert!(written_pages(&pm, start, start + 4096).unwrap() <= 1);
    assert_eq!(
        written_pages(&pm, 0, 4096 * (PAGEMAP_CHUNK as u64 * 3)).unwrap(),
        0
    );
    std::hint::black_box(&buf);
}

// ---- no parser panics ----

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn every_parser(bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    let _ = parse_stat(&s);
    let _ = parse_status(&s);
    let _ = parse_cpus_allowed(&s);
    let _ = parse_cgroup(&s);
    let _ = parse_numa_maps(&s);
    let _ = parse_numa_maps_of(&s, |start| start % 2 == 0);
    let _ = parse_mountinfo(&s);
    let _ = parse_fdinfo(&s);
    let _ = parse_auxv(bytes);
    let _ = parse_cpulist(&s);
    let _ = parse_smaps(&s);
    let _ = unescape_octal(&s);
    for l in s.lines() {
        let _ = MapsLine::parse(l);
    }
}

#[test]
fn mutated_fixtures_never_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/hostile/100");
    let mut seeds: Vec<Vec<u8>> = [
        "stat",
        "status",
        "numa_maps",
        "mountinfo",
        "fdinfo/5",
        "comm",
        "maps",
    ]
    .iter()
    .map(|f| std::fs::read(dir.join(f)).unwrap())
    .collect();
    seeds.push(
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/real/10164/auxv"))
            .unwrap(),
    );
    seeds.push(b"12:cpu,cpuacct:/a\n0::/b\n".to_vec());
    let mut x = XorShift(0x2545_F491_4F6C_DD1D);
    for round in 0..6_000 {
        let seed = &seeds[round % seeds.len()];
        let mut b = seed.clone();
        for _ in 0..(x.next() % 4 + 1) {
            let i = (x.next() as usize) % b.len().max(1);
            if let Some(c) = b.get_mut(i) {
                *c = match x.next() % 4 {
                    0 => b' ',
                    1 => b')',
                    2 => b'\\',
                    _ => x.next() as u8,
                };
            }
        }
        let cut = (x.next() as usize) % (b.len() + 1);
        every_parser(&b[..cut]);
        every_parser(&b);
    }
    // And pure noise, of every short length.
    for len in 0..3_000 {
        let b: Vec<u8> = (0..len % 300).map(|_| x.next() as u8).collect();
        every_parser(&b);
    }
}

#[test]
fn live_children_are_listed_and_a_gone_process_has_none() {
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    let r = ProcReader::default();
    let kids = r.children(me()).unwrap().unwrap();
    // Kernels without CONFIG_PROC_CHILDREN list nobody.
    if r.pid_dir(me())
        .join("task")
        .join(me().to_string())
        .join("children")
        .exists()
    {
        assert!(kids.contains(&child.id()), "{kids:?}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(r.children(u32::MAX - 1).unwrap(), None);
}

#[test]
fn a_process_dir_reads_the_process_it_was_opened_for() {
    // Fixture tree: the same answers as the path readers.
    let dir = real().process(REAL_PID).unwrap().unwrap();
    assert_eq!(dir.path(), real().pid_dir(REAL_PID));
    assert_eq!(dir.cgroups().unwrap(), real().cgroups(REAL_PID).unwrap());
    assert_eq!(
        dir.cpus_allowed().unwrap(),
        real().cpus_allowed(REAL_PID).unwrap()
    );
    assert_eq!(
        dir.maps_text().unwrap(),
        real().maps_text(REAL_PID).unwrap()
    );
    assert_eq!(
        dir.numa_maps_of(|_| true).unwrap(),
        real().numa_maps(REAL_PID).unwrap()
    );
    assert!(real().process(u32::MAX - 1).unwrap().is_none());
    // A live child: once it is gone, the open directory reads as vanished
    // (never as whoever gets the pid next).
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    let live = ProcReader::default();
    let dir = live.process(child.id()).unwrap().unwrap();
    // spawn() returns once the exec began (its vfork completion), which
    // may be before the kernel mapped the new program: wait for it.
    let t0 = std::time::Instant::now();
    let text = loop {
        let text = dir.maps_text().unwrap().unwrap();
        if text.lines().any(|l| l.contains("sleep")) {
            break text;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{text}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(text.contains("[stack]"), "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(dir.maps_text().unwrap(), None);
    assert_eq!(dir.cgroups().unwrap(), None);
    assert_eq!(dir.cpus_allowed().unwrap(), None);
    assert_eq!(dir.numa_maps_of(|_| true).unwrap(), None);
}

#[test]
fn numa_maps_of_keeps_the_asked_lines_and_checks_them() {
    let all = real().numa_maps(REAL_PID).unwrap().unwrap();
    let want = [all[0].start, all[5].start];
    let dir = real().process(REAL_PID).unwrap().unwrap();
    let some = dir.numa_maps_of(|s| want.contains(&s)).unwrap().unwrap();
    assert_eq!(some, vec![all[0].clone(), all[5].clone()]);
    // A kept line is checked as parse_numa_maps checks it; one not kept is
    // read only as far as its start.
    let text = "1000 default N0=x\n2000 default N0=3\n";
    assert_eq!(
        parse_numa_maps_of(text, |s| s == 0x1000).unwrap_err().line,
        1
    );
    let kept = parse_numa_maps_of(text, |s| s == 0x2000).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].pages_per_node, BTreeMap::from([(0, 3)]));
    assert_eq!(
        parse_numa_maps_of("zz default\n", |_| false)
            .unwrap_err()
            .line,
        1
    );
}

#[test]
fn files_longer_than_the_first_buffer_are_read_whole() {
    // Past the 64 KiB read_whole starts with, and not valid UTF-8 at the
    // end (a path need not be).
    let dir = tempfile::tempdir().unwrap();
    let pid = dir.path().join("7");
    std::fs::create_dir(&pid).unwrap();
    let line = "7f0000000000-7f0000001000 r--p 00000000 fe:00 12 /a/file\n";
    let mut text = line.repeat(3000).into_bytes();
    text.extend_from_slice(b"7f0000002000-7f0000003000 r--p 00000000 fe:00 13 /b\xff\n");
    std::fs::write(pid.join("maps"), &text).unwrap();
    let r = ProcReader::new(dir.path());
    let read = r.maps_text(7).unwrap().unwrap();
    assert_eq!(
        read.len(),
        text.len() + 2,
        "one byte became U+FFFD (3 bytes)"
    );
    assert_eq!(r.maps(7).unwrap().unwrap().len(), 3001);
    let through_dir = r.process(7).unwrap().unwrap().maps_text().unwrap().unwrap();
    assert_eq!(through_dir, read);
}
