//! The seeds of the `proto` and `published` fuzz targets
//! (`fuzz/corpus/{proto,published}/`) are, byte for byte, what this build
//! encodes and publishes. A change of the wire format or of the table
//! fails here until the seeds are rewritten with
//!
//! ```text
//! REPLICAD_WRITE_SEEDS=1 cargo test -p replicad-wire --test fuzz_seeds
//! ```
//!
//! so the fuzzers never start from messages the decoder refuses at the
//! header. Every seed in those two folders is one of these.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use replicad_wire::proto::{
    AttachRange, ErrorKind, HeatReport, HeatRow, LeftAlone, NodeSelection, PlanReport, PlanRow,
    ReplicaState, ReplicaStatus, Request, Response, Skipped, SourceStatus, StatusCursor,
    StatusReport, HEADER_LEN,
};
use replicad_wire::published::{nodes_mask, PublishedEntry, Writer, NODES_OTHER};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// A request's header with a JSON body the decoder must refuse.
fn request_with_body(body: &str) -> Vec<u8> {
    let mut m = Request::Status.encode();
    m.truncate(HEADER_LEN);
    m.extend_from_slice(body.as_bytes());
    m
}

fn source() -> SourceStatus {
    SourceStatus {
        path: "/srv/models/weights.bin".into(),
        dev: 0xfe00,
        ino: 1_048_602,
        generation: 3,
        size: 1 << 30,
        fence: "lease".into(),
        targets: vec!["node0".into(), "node1".into()],
        replicas: vec![
            ReplicaStatus {
                target: "node0".into(),
                generation: 3,
                bytes: 1 << 30,
                state: ReplicaState::Valid,
                attachments: vec![4242, 4243],
                file: "/run/replicad/node0/fe00-1048602-3".into(),
                pages: 512,
                pages_on_node: 512,
            },
            ReplicaStatus {
                target: "node1".into(),
                generation: 3,
                bytes: 0,
                state: ReplicaState::Populating,
                attachments: vec![],
                file: "memfd:replica".into(),
                pages: 0,
                pages_on_node: 0,
            },
        ],
    }
}

fn proto_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let requests = [
        (
            "request-map-node",
            Request::Map {
                node: Some(1),
                table: 0,
                at: 0,
                len: 0,
            },
        ),
        (
            "request-map-any-node",
            Request::Map {
                node: None,
                table: 0,
                at: 0,
                len: 0,
            },
        ),
        (
            "request-map-table",
            Request::Map {
                node: None,
                table: 0x7f12_3456_7000,
                at: 0x7f12_0000_0000,
                len: 1 << 21,
            },
        ),
        (
            "request-replicate-list",
            Request::Replicate {
                path: "/srv/models/weights.bin".into(),
                nodes: NodeSelection::List(vec![0, 1, 3]),
            },
        ),
        (
            "request-replicate-all",
            Request::Replicate {
                path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                nodes: NodeSelection::All,
            },
        ),
        (
            "request-evict",
            Request::Evict {
                path: "/srv/models/a b\"c".into(),
            },
        ),
        ("request-status", Request::Status),
        (
            "request-status-from",
            Request::StatusFrom {
                after: StatusCursor {
                    path: "/srv/index/seg-0001".into(),
                    dev: 2049,
                    ino: 131_073,
                },
            },
        ),
        (
            "request-hello",
            Request::Hello {
                node: None,
                table: 0,
            },
        ),
        (
            "request-hello-table",
            Request::Hello {
                node: Some(0),
                table: 0x5612_0000_4000,
            },
        ),
        (
            "request-replicate-pid",
            Request::ReplicatePid {
                pid: 4242,
                nodes: NodeSelection::List(vec![1]),
            },
        ),
        (
            "request-heat",
            Request::Heat {
                paths: vec!["/srv/models/weights.bin".into()],
            },
        ),
        ("request-plan", Request::Plan),
        (
            "request-migrate",
            Request::Migrate {
                path: "/srv/index/seg-0001".into(),
                node: 1,
            },
        ),
    ];
    let node = |n: &str, v: u64| -> std::collections::BTreeMap<String, u64> {
        [(n.to_string(), v)].into()
    };
    let responses = [
        (
            "response-heat",
            Response::Heat {
                report: HeatReport {
                    rows: vec![HeatRow {
                        path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                        dev: 2049,
                        ino: 77,
                        kinds: vec!["text".into()],
                        mapped_bytes: 1 << 20,
                        sharers: [("0".to_string(), 3u32), ("1".to_string(), 2)].into(),
                        sharers_spanning: 1,
                        mapped_pages: node("0", 256),
                        remote_bytes: node("1", 1 << 20),
                        replica_pages: node("1", 256),
                        cached_pages: node("0", 256),
                        writes_per_hour: 0,
                        policy: "text".into(),
                    }],
                    passes: 4,
                    processes: 120,
                    pass_cpu_us: 31_000,
                },
            },
        ),
        (
            "response-plan",
            Response::Plan {
                report: PlanReport {
                    actions: vec![PlanRow {
                        action: "skip".into(),
                        path: "/srv/models/b.bin".into(),
                        node: Some(1),
                        bytes: 0,
                        remote_bytes: 0,
                        reason: "over budget on node 1".into(),
                        policy: "data".into(),
                        mode: "observe".into(),
                    }],
                    budget: node("1", 1 << 30),
                    used: node("1", 1 << 29),
                    note: String::new(),
                },
            },
        ),
        (
            "response-migrated",
            Response::Migrated {
                path: "/srv/index/seg-0001".into(),
                node: 1,
                before: node("0", 10),
                after: node("1", 10),
                moved: 10,
                failed: 0,
            },
        ),
        (
            "response-mapped",
            Response::Mapped {
                node: 1,
                generation: 3,
                size: 1 << 30,
            },
        ),
        (
            "response-original",
            Response::Original {
                reason: "no replica on node 1".into(),
            },
        ),
        (
            "response-replicated",
            Response::Replicated { source: source() },
        ),
        ("response-evicted", Response::Evicted { replicas: 2 }),
        (
            "response-status",
            Response::Status {
                report: StatusReport {
                    sources: vec![source()],
                    left_alone: vec![LeftAlone {
                        pid: 77,
                        comm: "a b) (c".into(),
                        reason: "CPUs span nodes 0-1".into(),
                    }],
                    next: Some(StatusCursor {
                        path: "/srv/models/weights.bin".into(),
                        dev: 2049,
                        ino: 12,
                    }),
                },
            },
        ),
        (
            "response-attached",
            Response::Attached {
                node: 0,
                sources: 1,
                ranges: vec![AttachRange {
                    start: 0x7f1c_2a40_0000,
                    end: 0x7f1c_2a59_5000,
                    offset: 0x28000,
                    dev: 0x801,
                    ino: 1_048_602,
                    perms: "r-xp".into(),
                    source: 0,
                    generation: 3,
                }],
                skipped: vec!["/usr/lib/libm.so.6: written pages".into()],
            },
        ),
        (
            "response-replicated-pid",
            Response::ReplicatedPid {
                sources: vec![source()],
                skipped: vec![Skipped {
                    path: "/tmp/a.so".into(),
                    reason: "not fenceable: tmpfs".into(),
                }],
            },
        ),
        (
            "response-error",
            Response::error(ErrorKind::NoSuchNode, "node 7 does not exist"),
        ),
    ];
    let mut seeds: Vec<(&str, Vec<u8>)> = requests
        .into_iter()
        .map(|(name, r)| (name, r.encode()))
        .collect();
    seeds.extend(responses.into_iter().map(|(name, r)| (name, r.encode())));
    seeds.push((
        "invalid-request-unknown-field",
        request_with_body(r#"{"op":"map","node":1,"x":2}"#),
    ));
    seeds.push((
        "invalid-request-unknown-op",
        request_with_body(r#"{"op":"format","path":"/"}"#),
    ));
    seeds
}

fn published_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replicas.set");
    let entry = |ino: u64, nodes: u64| PublishedEntry {
        dev: 0xfe00,
        ino,
        nodes,
        generation: ino % 5,
    };
    let mut seeds = Vec::new();

    let w = Writer::create(&path, 8).unwrap();
    seeds.push(("set-empty", std::fs::read(&path).unwrap()));
    drop(w);

    let mut w = Writer::create(&path, 8).unwrap();
    w.publish(&[
        entry(12, nodes_mask([0, 1])),
        entry(13, 0),
        entry(14, nodes_mask([1, 70])),
    ]);
    seeds.push(("set-three-sources", std::fs::read(&path).unwrap()));
    w.revoke_began();
    seeds.push(("set-revoking", std::fs::read(&path).unwrap()));
    drop(w);

    let mut w = Writer::create(&path, 8).unwrap();
    let many: Vec<_> = (1..=9).map(|ino| entry(ino, NODES_OTHER | 1)).collect();
    assert!(w.publish(&many).overflow);
    seeds.push(("set-overflow", std::fs::read(&path).unwrap()));
    // A new writer retires the file it replaces: keep that one by a link.
    let old = dir.path().join("old.set");
    std::fs::hard_link(&path, &old).unwrap();
    let _new = Writer::create(&path, 8).unwrap();
    seeds.push(("set-retired", std::fs::read(&old).unwrap()));
    seeds
}

/// Compare (or, with REPLICAD_WRITE_SEEDS=1, write) the seeds of `target`;
/// a file in its folder that is not one of them fails too.
fn check(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = corpus(target);
    if std::env::var_os("REPLICAD_WRITE_SEEDS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in seeds {
        let got = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()));
        assert!(
            got == *bytes,
            "{}/{name} is not what this build makes: rewrite the seeds \
             (REPLICAD_WRITE_SEEDS=1 cargo test -p replicad-wire --test fuzz_seeds)",
            dir.display()
        );
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_string_lossy();
        // libFuzzer's own finds (40 hex digits, ignored by git) may be there.
        let found = name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(
            found || seeds.iter().any(|(s, _)| *s == name),
            "{}/{name} is not a seed this test makes",
            dir.display()
        );
    }
}

#[test]
fn proto_seeds_are_this_builds_messages() {
    let seeds = proto_seeds();
    for (name, bytes) in &seeds {
        let decodes = Request::decode(bytes).is_ok() || Response::decode(bytes).is_ok();
        assert_eq!(decodes, !name.starts_with("invalid-"), "{name}");
    }
    check("proto", &seeds);
}

#[test]
fn published_seeds_are_this_builds_tables() {
    let seeds = published_seeds();
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in &seeds {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let reader = replicad_wire::published::Reader::open(&path).unwrap();
        assert_eq!(reader.is_retired(), *name == "set-retired", "{name}");
    }
    check("published", &seeds);
}
