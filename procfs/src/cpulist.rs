//! Kernel CPU (and node) lists, `0-3,8,10-11`, as `Cpus_allowed_list` of
//! `status` and the sysfs `cpulist` files print them. A move-compatible
//! copy of `replicator/src/topology/sysfs.rs`: the same limits, the same
//! messages.

/// The largest CPU or node number a list may name: ids index a bitmap, so
/// a hostile `0-4294967295` must not allocate gigabytes.
pub const MAX_LIST_ID: u32 = 65_535;

/// At most this many characters of outside text are quoted in a message.
const QUOTE_CHARS: usize = 64;

/// Parse a kernel CPU list into sorted, unique ids. Blank text is the
/// empty list. The error quotes the list and names the bad entry.
pub fn parse_cpulist(s: &str) -> std::result::Result<Vec<u32>, String> {
    let bad = |what: String| format!("cpu list {}: {what}", quote(s));
    let body = s.trim();
    if body.is_empty() {
        return Ok(Vec::new());
    }
    // A bitmap bounded by MAX_LIST_ID: repeats and overlaps cost nothing.
    let mut words: Vec<u64> = Vec::new();
    for item in body.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (parse_id(a), parse_id(b)),
            None => (parse_id(item), parse_id(item)),
        };
        let (first, last) = match (first, last) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(bad(format!("entry {}: {e}", quote(item)))),
        };
        if first > last {
            return Err(bad(format!("range {first}-{last} runs backwards")));
        }
        let need = (last / 64) as usize + 1;
        if words.len() < need {
            words.resize(need, 0);
        }
        for id in first..=last {
            if let Some(w) = words.get_mut((id / 64) as usize) {
                *w |= 1 << (id % 64);
            }
        }
    }
    let mut ids = Vec::new();
    for (w, &word) in (0u32..).zip(&words) {
        for bit in 0..64 {
            if word & (1 << bit) != 0 {
                ids.push(w * 64 + bit);
            }
        }
    }
    Ok(ids)
}

/// Format CPUs (any order, repeats allowed) as a kernel CPU list with runs
/// compressed to ranges: `[0, 1, 2, 3, 8]` -> `0-3,8`; empty -> "".
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut it = sorted.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while let Some(&next) = it.peek() {
            if end.checked_add(1) != Some(next) {
                break;
            }
            end = next;
            it.next();
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
    }
    out
}

/// One CPU or node number of a list: decimal digits only, at most
/// [`MAX_LIST_ID`].
fn parse_id(text: &str) -> std::result::Result<u32, String> {
    if text.is_empty() {
        return Err("a number is missing".to_string());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a decimal number".to_string());
    }
    match text.parse::<u32>() {
        Ok(id) if id <= MAX_LIST_ID => Ok(id),
        _ => Err(format!("number is above the limit {MAX_LIST_ID}")),
    }
}

/// Quote (at most [`QUOTE_CHARS`] of) text from outside, escaped.
pub(crate) fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_kernel_lists() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpulist("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpulist("3,1,1-2").unwrap(), vec![1, 2, 3]);
        assert_eq!(format_cpulist(&[8, 0, 1, 2, 3, 3]), "0-3,8");
        assert_eq!(format_cpulist(&[]), "");
        assert_eq!(format_cpulist(&[1, 3, 4]), "1,3-4");
        assert_eq!(
            format_cpulist(&[u32::MAX - 1, u32::MAX]),
            format!("{}-{}", u32::MAX - 1, u32::MAX)
        );
    }

    #[test]
    fn errors_name_the_bad_entry() {
        let e = parse_cpulist("0-3,x,5").unwrap_err();
        assert!(e.contains("entry \"x\""), "{e}");
        let e = parse_cpulist("5-3").unwrap_err();
        assert!(e.contains("runs backwards"), "{e}");
        let e = parse_cpulist("0-4294967295").unwrap_err();
        assert!(e.contains("above the limit"), "{e}");
        assert!(parse_cpulist("1,,2").is_err());
        assert!(parse_cpulist("-1").is_err());
    }
}
