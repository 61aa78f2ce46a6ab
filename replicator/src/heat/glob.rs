//! Shell-style globs over paths (cgroup paths, file paths): `*` matches
//! any run of characters within one `/`-separated component, `**` any run
//! across components, `?` one character other than `/`. Everything else
//! matches itself. Matching is iterative with one back-track point per
//! star kind, so a hostile pattern costs at most `O(pattern * text)`.

/// Whether `text` matches `pattern`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    // The common shapes without a memo: a literal, and a literal then `**`
    // (`/**`, `/usr/lib/**`), asked once per mapping of every process.
    let special = |b: &u8| matches!(b, b'*' | b'?');
    match p.iter().position(special) {
        None => return p == t,
        Some(i) if p.len() == i + 2 && p[i + 1] == b'*' => return t.starts_with(&p[..i]),
        _ => {}
    }
    // Memo of (pi, ti) pairs known to fail: bounds the work of `**`.
    let mut failed = vec![false; (p.len() + 1) * (t.len() + 1)];
    matches(p, t, 0, 0, &mut failed)
}

fn matches(p: &[u8], t: &[u8], mut pi: usize, mut ti: usize, failed: &mut [bool]) -> bool {
    let width = t.len() + 1;
    let start = (pi, ti);
    let ok = loop {
        if failed[pi * width + ti] {
            break false;
        }
        if pi == p.len() {
            break ti == t.len();
        }
        match p[pi] {
            b'*' if p.get(pi + 1) == Some(&b'*') => {
                // `**`: any run, `/` included.
                let rest = pi + 2;
                break (ti..=t.len()).any(|k| matches(p, t, rest, k, failed));
            }
            b'*' => {
                // `*`: any run without `/`.
                let rest = pi + 1;
                let mut k = ti;
                let mut found = false;
                loop {
                    if matches(p, t, rest, k, failed) {
                        found = true;
                        break;
                    }
                    if k == t.len() || t[k] == b'/' {
                        break;
                    }
                    k += 1;
                }
                break found;
            }
            b'?' if ti < t.len() && t[ti] != b'/' => {
                pi += 1;
                ti += 1;
            }
            c if ti < t.len() && t[ti] == c => {
                pi += 1;
                ti += 1;
            }
            _ => break false,
        }
    };
    if !ok {
        failed[start.0 * width + start.1] = true;
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::{glob_match, matches};

    /// The memoized matcher alone, without the shortcuts.
    fn general(pattern: &str, text: &str) -> bool {
        let (p, t) = (pattern.as_bytes(), text.as_bytes());
        let mut failed = vec![false; (p.len() + 1) * (t.len() + 1)];
        matches(p, t, 0, 0, &mut failed)
    }

    #[test]
    fn shortcuts_agree_with_the_general_matcher() {
        let patterns = [
            "",
            "/",
            "**",
            "/**",
            "/usr/**",
            "/usr/lib/libc.so.6",
            "/usr/lib/",
            "a**",
            "/**/",
            "/*",
            "/usr/*",
            "?",
            "/usr/lib/**.so",
        ];
        let texts = [
            "",
            "/",
            "/usr",
            "/usr/",
            "/usr/lib/libc.so.6",
            "/usr/lib/libc.so.6x",
            "/usrx/lib",
            "a",
            "ab/c",
            "/system.slice/a.service",
            "usr/lib",
        ];
        for p in patterns {
            for t in texts {
                assert_eq!(glob_match(p, t), general(p, t), "{p:?} against {t:?}");
            }
        }
    }

    #[test]
    fn stars_questions_and_literals() {
        assert!(glob_match(
            "/system.slice/llama-*.service",
            "/system.slice/llama-7b.service"
        ));
        assert!(!glob_match(
            "/system.slice/llama-*.service",
            "/system.slice/llama-7b.scope"
        ));
        assert!(!glob_match("/system.slice/*", "/system.slice/a/b"));
        assert!(glob_match("/system.slice/**", "/system.slice/a/b"));
        assert!(glob_match("**", "/"));
        assert!(glob_match("/**", "/user.slice/user-0.slice"));
        assert!(glob_match(
            "/usr/lib/**/*.so*",
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        ));
        assert!(glob_match("/a?c", "/abc"));
        assert!(!glob_match("/a?c", "/a/c"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
        assert!(glob_match("*", ""));
        assert!(glob_match("/x", "/x"));
        assert!(!glob_match("/x", "/xy"));
    }

    #[test]
    fn hostile_patterns_stay_cheap() {
        let p = "**a**a**a**a**a**a**a**a**a**a**b";
        let t = "a".repeat(200);
        let t0 = std::time::Instant::now();
        assert!(!glob_match(p, &t));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        let p = "*a*a*a*a*a*a*a*a*a*a*a*b";
        assert!(!glob_match(p, &t));
    }
}
