//! `/proc/<pid>/maps` and `/proc/<pid>/smaps`, parsed without trusting
//! them: a line that does not parse is reported (by number) and never
//! guessed at. The daemon reads a client's smaps to decide which ranges a
//! replica may back; the preload shim re-reads its own maps before every
//! remap. The same parser serves both, so they agree on every field.
//!
//! ```text
//!  7f1c2a400000-7f1c2a595000 r-xp 00028000 08:01 1048602    /usr/lib/x86_64-linux-gnu/libc.so.6
//!  start        end          perms offset  maj:min inode   path (may hold spaces, " (deleted)")
//! ```

/// One line of `maps` (or one header line of `smaps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapsLine<'a> {
    /// First address of the mapping.
    pub start: u64,
    /// One past its last address (`end > start`).
    pub end: u64,
    /// `rwxp` / `r-xs` ...: exactly four bytes.
    pub perms: [u8; 4],
    /// Offset in the file of `start`.
    pub offset: u64,
    /// The device as `st_dev` encodes it (`makedev(major, minor)`).
    pub dev: u64,
    /// Inode number; 0 for an anonymous mapping.
    pub ino: u64,
    /// Path, pseudo name (`[heap]`) or empty.
    pub path: &'a str,
}

impl<'a> MapsLine<'a> {
    /// Parse one line; `None` if it is not a well-formed maps line.
    pub fn parse(line: &'a str) -> Option<MapsLine<'a>> {
        let mut rest = line;
        let mut field = || -> Option<&'a str> {
            let r = rest.trim_start_matches(' ');
            let end = r.find(' ').unwrap_or(r.len());
            let (f, tail) = r.split_at(end);
            rest = tail;
            (!f.is_empty()).then_some(f)
        };
        let range = field()?;
        let perms = field()?;
        let offset = field()?;
        let dev = field()?;
        let ino = field()?;
        let path = rest.trim_start_matches(' ');
        let (start, end) = range.split_once('-')?;
        let start = hex(start)?;
        let end = hex(end)?;
        if end <= start {
            return None;
        }
        let perms: [u8; 4] = perms.as_bytes().try_into().ok()?;
        let ok = matches!(perms[0], b'r' | b'-')
            && matches!(perms[1], b'w' | b'-')
            && matches!(perms[2], b'x' | b'-')
            && matches!(perms[3], b'p' | b's');
        if !ok {
            return None;
        }
        let (major, minor) = dev.split_once(':')?;
        let major = u32::try_from(hex(major)?).ok()?;
        let minor = u32::try_from(hex(minor)?).ok()?;
        if !ino.bytes().all(|b| b.is_ascii_digit()) || ino.len() > 20 {
            return None;
        }
        Some(MapsLine {
            start,
            end,
            perms,
            offset: hex(offset)?,
            dev: libc::makedev(major, minor),
            ino: ino.parse().ok()?,
            path,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Never true: a parsed line has `end > start`.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// A private, readable, not writable mapping of a file: the only kind
    /// a replica may back (text, read-only data).
    pub fn private_readonly_file(&self) -> bool {
        self.ino != 0
            && self.perms[0] == b'r'
            && self.perms[1] == b'-'
            && self.perms[3] == b'p'
            && !self.path.starts_with('[')
    }

    /// `r-xp` as text.
    pub fn perms_str(&self) -> &str {
        std::str::from_utf8(&self.perms).unwrap_or("????")
    }
}

fn hex(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// One mapping of `smaps`: its header and the fields replicad uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmapsEntry {
    /// As [`MapsLine::start`].
    pub start: u64,
    /// As [`MapsLine::end`].
    pub end: u64,
    /// As [`MapsLine::perms`].
    pub perms: [u8; 4],
    /// As [`MapsLine::offset`].
    pub offset: u64,
    /// As [`MapsLine::dev`].
    pub dev: u64,
    /// As [`MapsLine::ino`].
    pub ino: u64,
    /// As [`MapsLine::path`].
    pub path: String,
    /// `Anonymous:` in kB: private pages written (COWed) in this mapping.
    /// `None` if the kernel did not print the field.
    pub anonymous_kb: Option<u64>,
}

impl SmapsEntry {
    /// The header fields as a [`MapsLine`].
    pub fn line(&self) -> MapsLine<'_> {
        MapsLine {
            start: self.start,
            end: self.end,
            perms: self.perms,
            offset: self.offset,
            dev: self.dev,
            ino: self.ino,
            path: &self.path,
        }
    }
}

/// A [`MapsLine`] that owns its path: what [`crate::ProcReader::maps`]
/// returns. The same fields and helpers; [`OwnedMapsLine::line`] borrows it
/// back as a [`MapsLine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedMapsLine {
    /// As [`MapsLine::start`].
    pub start: u64,
    /// As [`MapsLine::end`].
    pub end: u64,
    /// As [`MapsLine::perms`].
    pub perms: [u8; 4],
    /// As [`MapsLine::offset`].
    pub offset: u64,
    /// As [`MapsLine::dev`]: `makedev(major, minor)`, comparable with `st_dev`.
    pub dev: u64,
    /// As [`MapsLine::ino`].
    pub ino: u64,
    /// As [`MapsLine::path`].
    pub path: String,
}

impl OwnedMapsLine {
    /// Parse one line; `None` if [`MapsLine::parse`] refuses it.
    pub fn parse(line: &str) -> Option<OwnedMapsLine> {
        MapsLine::parse(line).map(OwnedMapsLine::from)
    }

    /// This line as a borrowed [`MapsLine`].
    pub fn line(&self) -> MapsLine<'_> {
        MapsLine {
            start: self.start,
            end: self.end,
            perms: self.perms,
            offset: self.offset,
            dev: self.dev,
            ino: self.ino,
            path: &self.path,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Never true for a parsed line: `end > start`.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// As [`MapsLine::private_readonly_file`].
    pub fn private_readonly_file(&self) -> bool {
        self.line().private_readonly_file()
    }

    /// `r-xp` as text.
    pub fn perms_str(&self) -> &str {
        std::str::from_utf8(&self.perms).unwrap_or("????")
    }

    /// A writable shared mapping (`rw?s`): a way to write the file
    /// without any fd open for writing.
    pub fn shared_writable(&self) -> bool {
        self.perms[0] == b'r' && self.perms[1] == b'w' && self.perms[3] == b's'
    }
}

impl From<MapsLine<'_>> for OwnedMapsLine {
    fn from(l: MapsLine<'_>) -> Self {
        OwnedMapsLine {
            start: l.start,
            end: l.end,
            perms: l.perms,
            offset: l.offset,
            dev: l.dev,
            ino: l.ino,
            path: l.path.to_string(),
        }
    }
}

/// A line of smaps that is neither a header nor a `Key: value` field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line} of smaps is neither a mapping nor a field: {text:?}")]
pub struct SmapsError {
    /// 1-based line number.
    pub line: usize,
    /// The line (its first 200 characters).
    pub text: String,
}

/// Parse a whole `smaps` text.
pub fn parse_smaps(text: &str) -> Result<Vec<SmapsEntry>, SmapsError> {
    let mut out: Vec<SmapsEntry> = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.is_empty() {
            continue;
        }
        if let Some((key, value)) = field(l) {
            let Some(cur) = out.last_mut() else {
                return Err(SmapsError {
                    line: i + 1,
                    text: l.chars().take(200).collect(),
                });
            };
            if key == "Anonymous" {
                cur.anonymous_kb = value
                    .trim()
                    .strip_suffix("kB")
                    .and_then(|v| v.trim().parse().ok());
            }
            continue;
        }
        let Some(m) = MapsLine::parse(l) else {
            return Err(SmapsError {
                line: i + 1,
                text: l.chars().take(200).collect(),
            });
        };
        out.push(SmapsEntry {
            start: m.start,
            end: m.end,
            perms: m.perms,
            offset: m.offset,
            dev: m.dev,
            ino: m.ino,
            path: m.path.to_string(),
            anonymous_kb: None,
        });
    }
    Ok(out)
}

/// `Key: value` (a field line of smaps; keys are one word).
fn field(l: &str) -> Option<(&str, &str)> {
    let (key, value) = l.split_once(':')?;
    (!key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_lines() {
        let l = MapsLine::parse(
            "7f1c2a400000-7f1c2a595000 r-xp 00028000 08:01 1048602    /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(l.start, 0x7f1c2a400000);
        assert_eq!(l.len(), 0x195000);
        assert_eq!(&l.perms, b"r-xp");
        assert_eq!(l.offset, 0x28000);
        assert_eq!(l.dev, libc::makedev(8, 1));
        assert_eq!(l.ino, 1048602);
        assert_eq!(l.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(l.private_readonly_file());
        let heap =
            MapsLine::parse("55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0  [heap]").unwrap();
        assert!(!heap.private_readonly_file());
        let spaced =
            MapsLine::parse("1000-2000 r--p 00000000 fd:02 77 /tmp/a b (deleted)").unwrap();
        assert_eq!(spaced.path, "/tmp/a b (deleted)");
        assert_eq!(spaced.dev, libc::makedev(0xfd, 2));
        let anon = MapsLine::parse("1000-2000 ---p 00000000 00:00 0").unwrap();
        assert_eq!(anon.path, "");
        assert!(!MapsLine::parse("1000-2000 r-xs 0 08:01 5 /x")
            .unwrap()
            .private_readonly_file());
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in [
            "",
            "garbage",
            "2000-1000 r-xp 0 08:01 1 /x",
            "1000-1000 r-xp 0 08:01 1 /x",
            "1000-2000 r-xq 0 08:01 1 /x",
            "1000-2000 r-x 0 08:01 1 /x",
            "1000-2000 rwxpp 0 08:01 1 /x",
            "1000-2000 r-xp 0 0801 1 /x",
            "1000-2000 r-xp 0 08:01 -1 /x",
            "1000-2000 r-xp 0 08:01 1a /x",
            "zz-2000 r-xp 0 08:01 1 /x",
            "10000000000000000-20000000000000000 r-xp 0 08:01 1 /x",
            "1000-2000 r-xp 0 fffffffff:01 1 /x",
            "1000-2000 r-xp 0 08:01 99999999999999999999999 /x",
        ] {
            assert_eq!(MapsLine::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn smaps_fields_attach_to_their_mapping() {
        let text = "\
1000-3000 r-xp 00000000 08:01 12 /lib/a.so
Size:                  8 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
3000-4000 r--p 00002000 08:01 12 /lib/a.so
Size:                  4 kB
Anonymous:             4 kB
";
        let e = parse_smaps(text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].anonymous_kb, Some(0));
        assert_eq!(e[1].anonymous_kb, Some(4));
        assert_eq!(e[1].offset, 0x2000);
        let err = parse_smaps("Size: 4 kB\n").unwrap_err();
        assert_eq!(err.line, 1);
        let err = parse_smaps("1000-2000 r-xp 0 08:01 1 /x\n??? what\n").unwrap_err();
        assert_eq!(err.line, 2);
    }

    #[test]
    fn our_own_smaps_parses() {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let e = parse_smaps(&text).unwrap();
        assert!(e.iter().any(|m| m.line().private_readonly_file()));
        assert!(e.iter().all(|m| m.anonymous_kb.is_some()));
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for l in maps.lines() {
            assert!(MapsLine::parse(l).is_some(), "{l}");
        }
    }

    /// Random mutations of real lines never panic (the fuzz target does this
    /// at scale).
    #[test]
    fn mutated_lines_never_panic() {
        let base = "7f1c2a400000-7f1c2a595000 r-xp 00028000 08:01 1048602 /usr/lib/libc.so.6\nAnonymous: 0 kB\n";
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = base.as_bytes().to_vec();
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
            let cut = ((x >> 16) as usize) % (b.len() + 1);
            let s = String::from_utf8_lossy(&b[..cut]);
            let _ = parse_smaps(&s);
            for l in s.lines() {
                let _ = MapsLine::parse(l);
            }
        }
    }
}
