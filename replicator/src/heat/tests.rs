//! The scanner against fixture trees (a 2-node sysfs, a /proc of made-up
//! processes with numa_maps as the kernel prints them) and live on this
//! machine's own /proc.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use replicad_procfs::ProcReader;

use super::policy::tests::policy;
use super::*;
use crate::model::SourceKey;
use crate::Topology;

fn two_nodes() -> Topology {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sysfs/2node");
    Topology::from_sysfs(&root).unwrap()
}

/// One made-up process: cpus, cgroup, maps lines and numa_maps lines.
fn process(root: &Path, pid: u32, cpus: &str, cgroup: &str, maps: &[&str], numa: &[&str]) {
    let d = root.join(pid.to_string());
    std::fs::create_dir_all(&d).unwrap();
    set_cpus(root, pid, cpus);
    std::fs::write(d.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
    std::fs::write(d.join("maps"), maps.join("\n") + "\n").unwrap();
    std::fs::write(d.join("numa_maps"), numa.join("\n") + "\n").unwrap();
}

/// `Cpus_allowed_list` of a made-up process (`taskset` on it).
fn set_cpus(root: &Path, pid: u32, cpus: &str) {
    std::fs::write(
        root.join(pid.to_string()).join("status"),
        format!("Name:\tsleep\nPid:\t{pid}\nUid:\t0\t0\t0\t0\nCpus_allowed_list:\t{cpus}\n"),
    )
    .unwrap();
}

fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proc");
    // Node 1 process: libc text (5 pages on node 0, 1 on node 1) and a
    // model (10 pages, all on node 0), plus a replica from the store.
    process(
        &root,
        200,
        "20-39",
        "/system.slice/llama-a.service",
        &[
            "7f0000000000-7f0000006000 r-xp 00000000 08:01 11 /usr/lib/libc.so.6",
            "7f0000006000-7f0000007000 rw-p 00006000 08:01 11 /usr/lib/libc.so.6",
            "7f1000000000-7f100000a000 r--p 00000000 08:01 22 /srv/model.bin",
            "7f2000000000-7f2000001000 r--p 00000000 00:30 5 /run/replicad/node1/x",
            "7f3000000000-7f3000001000 r-xp 00000000 08:01 33 /usr/lib/libreplicad_preload.so",
            "7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0 [stack]",
        ],
        &[
            "7f0000000000 default file=/usr/lib/libc.so.6 mapped=6 N0=5 N1=1 kernelpagesize_kB=4",
            "7f0000006000 default file=/usr/lib/libc.so.6 anon=1 dirty=1 N1=1 kernelpagesize_kB=4",
            "7f1000000000 default file=/srv/model.bin mapped=10 N0=10 kernelpagesize_kB=4",
            "7f2000000000 default file=/run/replicad/node1/x mapped=1 N1=1 kernelpagesize_kB=4",
            "7f3000000000 default file=/usr/lib/libreplicad_preload.so mapped=1 N0=1 kernelpagesize_kB=4",
            "7ffd00000000 default stack anon=1 dirty=1 N1=1 kernelpagesize_kB=4",
        ],
    );
    // A second node-1 process maps less of the model.
    process(
        &root,
        201,
        "60",
        "/system.slice/llama-b.service",
        &["7f1000000000-7f1000004000 r--p 00000000 08:01 22 /srv/model.bin"],
        &["7f1000000000 default file=/srv/model.bin mapped=4 N0=3 N1=1 kernelpagesize_kB=4"],
    );
    // Node 0: local pages, no remote.
    process(
        &root,
        202,
        "0-3",
        "/user.slice",
        &["7f0000000000-7f0000006000 r-xp 00000000 08:01 11 /usr/lib/libc.so.6"],
        &["7f0000000000 default file=/usr/lib/libc.so.6 mapped=6 N0=6 kernelpagesize_kB=4"],
    );
    // Spanning both nodes: a sharer with no node.
    process(
        &root,
        203,
        "0-79",
        "/user.slice",
        &["7f0000000000-7f0000006000 r-xp 00000000 08:01 11 /usr/lib/libc.so.6"],
        &["7f0000000000 default file=/usr/lib/libc.so.6 mapped=6 N0=6 kernelpagesize_kB=4"],
    );
    // Not covered by the policy: never read past its cgroup.
    process(
        &root,
        204,
        "20",
        "/other.slice",
        &["7f0000000000-7f0000006000 r-xp 00000000 08:01 11 /usr/lib/libc.so.6"],
        &["garbage that would not parse"],
    );
    // Vanished mid-read: a cgroup but no maps.
    let d = root.join("205");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("cgroup"), "0::/user.slice\n").unwrap();
    // Hostile numa_maps: skipped, the pass goes on.
    process(
        &root,
        206,
        "20",
        "/user.slice",
        &["7f0000000000-7f0000006000 r-xp 00000000 08:01 11 /usr/lib/libc.so.6"],
        &["7f0000000000 default N1=lots"],
    );
    (dir, root)
}

fn policies() -> Policies {
    Policies {
        list: vec![policy(
            "all",
            &["/system.slice/**", "/user.slice"],
            Mode::Replicate,
            &[Kind::Text, Kind::Data],
        )],
    }
}

#[test]
fn heat_folds_processes_into_files_as_numa_maps_says() {
    let (_dir, root) = fixture();
    let mut s = Scanner::new(ProcReader::new(&root), two_nodes(), "/run/replicad".into());
    let stats = s.full_pass(&policies());
    assert_eq!(stats.processes, 4, "{stats:?}");
    assert_eq!(
        stats.skipped, 2,
        "205 vanished, 206 does not parse: {stats:?}"
    );
    assert!(!s.processes().contains_key(&204));
    assert!(s.processes()[&200].attached);
    let heat = s.heat();
    let by: BTreeMap<u64, &SourceHeat> = heat.iter().map(|h| (h.key.ino, h)).collect();
    assert_eq!(
        by.len(),
        2,
        "only libc and the model, not the shim or the replica: {heat:?}"
    );
    let libc = by[&11];
    assert_eq!(
        libc.key,
        SourceKey {
            dev: libc::makedev(8, 1),
            ino: 11
        }
    );
    assert_eq!(libc.kinds, [Kind::Text]);
    assert_eq!(libc.sharers, [(0, 1), (1, 1)].into());
    assert_eq!(libc.sharers_spanning, 1);
    assert_eq!(libc.resident, [(0, 6), (1, 1)].into());
    assert_eq!(libc.remote, [(0, 0), (1, 5)].into());
    let model = by[&22];
    assert_eq!(model.kinds, [Kind::Data]);
    assert_eq!(model.sharers, [(1, 2)].into());
    assert_eq!(model.mapped_bytes, 10 * 4096);
    assert_eq!(model.resident, [(0, 10), (1, 1)].into());
    assert_eq!(model.remote, [(1, 10)].into());
    assert_eq!(model.remote_pages(), 10);
}

#[test]
fn a_budget_spreads_a_pass_over_steps() {
    let (_dir, root) = fixture();
    let mut s = Scanner::new(ProcReader::new(&root), two_nodes(), "/run/replicad".into());
    let mut steps = 0;
    while !s.step(&policies(), Duration::ZERO) {
        steps += 1;
        assert!(steps < 100);
    }
    assert!(
        steps >= 4,
        "a zero budget reads one process per step: {steps}"
    );
    assert_eq!(s.last_pass().unwrap().steps, steps + 1);
    assert_eq!(s.heat().len(), 2);
}

#[test]
fn policies_that_are_off_scan_nothing() {
    let (_dir, root) = fixture();
    let mut s = Scanner::new(ProcReader::new(&root), two_nodes(), "/run/replicad".into());
    let off = Policies {
        list: vec![policy("off", &["/**"], Mode::Off, &[Kind::Text])],
    };
    let stats = s.full_pass(&off);
    assert_eq!(stats.processes, 0);
    assert!(s.heat().is_empty());
}

/// This machine's own /proc: a child maps a file, and heat counts its
/// pages exactly as its numa_maps shows them.
#[test]
fn live_heat_matches_a_child_s_numa_maps() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, vec![7u8; 64 * 4096]).unwrap();
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,flags=mmap.MAP_PRIVATE,prot=mmap.PROT_READ)\n\
             s=sum(m[i] for i in range(0,len(m),4096))\nprint(s,flush=True)\nsys.stdin.read()",
            file.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = child.id();
    let proc = ProcReader::default();
    let numa = proc.numa_maps(pid).unwrap().unwrap();
    let want: u64 = numa
        .iter()
        .filter(|e| e.file.as_deref() == file.to_str())
        .flat_map(|e| e.pages_per_node.values())
        .sum();
    let mut s = Scanner::new(proc, Topology::detect().unwrap(), "/run/replicad".into());
    let all = Policies {
        list: vec![policy("all", &["/**"], Mode::Observe, &[Kind::Data])],
    };
    s.full_pass(&all);
    let heat = s.heat();
    let h = heat
        .iter()
        .find(|h| Path::new(&h.path) == file)
        .expect("the child's file");
    let _ = child.stdin.take().unwrap().write_all(b"x");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(want, 64);
    assert_eq!(h.resident.values().sum::<u64>(), want, "{h:?}");
    assert!(h.sharers.values().sum::<u32>() + h.sharers_spanning >= 1);
}

#[test]
fn a_write_break_and_the_mtime_it_moved_count_once() {
    use std::os::unix::fs::MetadataExt;
    let (dir, root) = fixture();
    let file = dir.path().join("index.bin");
    std::fs::write(&file, [1u8; 4096]).unwrap();
    let md = std::fs::metadata(&file).unwrap();
    let key = SourceKey {
        dev: md.dev(),
        ino: md.ino(),
    };
    let line = format!(
        "7f5000000000-7f5000001000 r--p 00000000 {:02x}:{:02x} {} {}",
        libc::major(md.dev()),
        libc::minor(md.dev()),
        md.ino(),
        file.display()
    );
    process(
        &root,
        210,
        "20",
        "/user.slice",
        &[&line],
        &["7f5000000000 default mapped=1 N0=1 kernelpagesize_kB=4"],
    );
    let mut s = Scanner::new(ProcReader::new(&root), two_nodes(), "/run/replicad".into());
    let rate = |s: &Scanner| {
        s.heat()
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.writes_per_hour)
            .unwrap()
    };
    s.full_pass(&policies());
    assert_eq!(rate(&s), 0.0);
    let touch = |b: u8| {
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, [b; 4096]).unwrap();
    };
    // The engine saw the writer break the fence, and the write moved mtime.
    s.note_write(key);
    touch(2);
    s.full_pass(&policies());
    // One write in under a minute reads as one a minute.
    assert_eq!(rate(&s), 60.0, "counted once, not twice");
    // A write the fence did not see (no replica yet): its mtime counts.
    touch(3);
    s.full_pass(&policies());
    assert_eq!(rate(&s), 120.0);
    s.full_pass(&policies());
    assert_eq!(rate(&s), 120.0, "nothing changed");
}

#[test]
fn the_planner_s_copies_are_kept_across_restarts_and_a_bad_line_is_skipped() {
    use super::driver::{load_owned, save_owned};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(super::driver::OWNED_FILE);
    assert!(load_owned(&path).is_empty(), "no file: no copies");
    let a = SourceKey { dev: 2049, ino: 11 };
    let b = SourceKey { dev: 2049, ino: 22 };
    let owned = BTreeMap::from([((a, 1), 4096), ((b, 0), 0), ((b, 3), 1 << 40)]);
    save_owned(&path, &owned).unwrap();
    assert_eq!(load_owned(&path), owned);
    assert!(!path.with_extension("owned.tmp").exists(), "renamed over");
    // A torn or foreign file: what parses is kept, the rest skipped.
    std::fs::write(
        &path,
        "2049 11 1 4096\n2049 22\nx y z w\n2049 22 0 5 extra\n-1 2 3 4\n2049 22 3 7\n",
    )
    .unwrap();
    assert_eq!(
        load_owned(&path),
        BTreeMap::from([((a, 1), 4096), ((b, 3), 7)])
    );
}
