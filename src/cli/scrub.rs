//! Passwords out of the process title. `/proc/<pid>/cmdline` (what `ps` shows) is readable by
//! every user of the machine for the life of the process, so a password in a connection
//! argument (`postgresql://app:secret@db/shop`, `"host=db password=secret"`) would be on show
//! for the whole release.
//!
//! At startup, if any argument carries a password, walshift re-executes itself once (same
//! pid, `exec`) with those arguments rewritten without it and the original arguments handed
//! over in environment variables private to the process; the new image restores them in
//! memory and removes the variables from its environment before anything else runs (so hooks
//! and child processes never inherit them).
//!
//! **What remains visible:** the arguments as given, for the moment between the start of the
//! process and the re-exec (about a millisecond); and `/proc/<pid>/environ`, which holds the
//! initial environment of the re-executed image and is readable by the same user and root
//! only — as `PGPASSWORD` would be. Better still: keep passwords out of arguments altogether
//! (`PGPASSWORD`, `~/.pgpass` or `PGPASSFILE`).

use std::ffi::OsString;

/// Set (to `1`) in the re-executed image's environment.
const MARKER: &str = "WALSHIFT_ARGS_SCRUBBED";
/// `WALSHIFT_SCRUBBED_ARG_<index>`: the original of a rewritten argument.
const ARG_PREFIX: &str = "WALSHIFT_SCRUBBED_ARG_";

/// The process's arguments with their passwords, re-executing first if any is visible in the
/// process title. Call first thing in `main`, while the process has one thread.
pub fn args() -> Vec<OsString> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if std::env::var_os(MARKER).is_some() {
        return restore(args);
    }
    let scrubbed: Vec<Option<String>> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            (i > 0)
                .then(|| a.to_str().and_then(without_password))
                .flatten()
        })
        .collect();
    if scrubbed.iter().all(Option::is_none) {
        return args;
    }
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(_) => return args,
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg0(&args[0]).env(MARKER, "1");
    for (i, (a, s)) in args.iter().zip(&scrubbed).enumerate().skip(1) {
        match s {
            Some(s) => {
                cmd.arg(s).env(format!("{ARG_PREFIX}{i}"), a);
            }
            None => {
                cmd.arg(a);
            }
        }
    }
    let e = cmd.exec();
    eprintln!(
        "warning: could not re-execute walshift to hide the password in its arguments from ps ({e}); \
         continuing. Pass passwords with PGPASSWORD or ~/.pgpass instead"
    );
    args
}

/// In the re-executed image: the original arguments back, the hand-over variables gone.
fn restore(mut args: Vec<OsString>) -> Vec<OsString> {
    let handed: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| k.starts_with(ARG_PREFIX)) || k == MARKER)
        .collect();
    for (k, v) in &handed {
        // SAFETY: called first thing in `main`, before the runtime or any other thread exists.
        unsafe { std::env::remove_var(k) };
        let Some(i) = k
            .to_str()
            .and_then(|k| k.strip_prefix(ARG_PREFIX))
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        // Only where this very argument was rewritten from that original.
        if let (Some(a), Some(original)) = (args.get(i), v.to_str())
            && without_password(original).as_deref() == a.to_str()
        {
            args[i] = v.clone();
        }
    }
    args
}

/// `arg` without its password, if it is a connection string (optionally as `--flag=…`) that
/// has one: the URL's `user:password@` and `password=` query parameter, or the `password=…`
/// pair of a key=value string. `None` when there is nothing to hide.
pub fn without_password(arg: &str) -> Option<String> {
    let (prefix, value) = match arg.strip_prefix("--").and_then(|r| r.split_once('=')) {
        Some((flag, v)) if !flag.contains(char::is_whitespace) => (&arg[..flag.len() + 3], v),
        _ => ("", arg),
    };
    let scrubbed = if value.starts_with("postgresql://") || value.starts_with("postgres://") {
        url_without_password(value)
    } else {
        keyvalue_without_password(value)
    }?;
    Some(format!("{prefix}{scrubbed}"))
}

fn url_without_password(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let mut changed = false;
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) if userinfo.contains(':') => {
            changed = true;
            format!("{}@{hosts}", userinfo.split(':').next().unwrap_or(""))
        }
        _ => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| {
                    let is_pw = p.split('=').next() == Some("password");
                    changed |= is_pw;
                    !is_pw
                })
                .collect();
            if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        None => tail.to_owned(),
    };
    changed.then(|| format!("{scheme}://{authority}{tail}"))
}

/// The `key = value` pairs of a libpq key=value string, as byte spans `(key, start, end)`;
/// `None` if `s` is not one.
fn keyvalue_pairs(s: &str) -> Option<Vec<(&str, usize, usize)>> {
    let b = s.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i == b.len() {
            break;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        let key = &s[start..i];
        i = skip_ws(i);
        if key.is_empty() || b.get(i) != Some(&b'=') {
            return None;
        }
        i = skip_ws(i + 1);
        if b.get(i) == Some(&b'\'') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return None,
                    Some(b'\\') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
        }
        pairs.push((key, start, i.min(b.len())));
    }
    Some(pairs)
}

fn keyvalue_without_password(s: &str) -> Option<String> {
    let pairs = keyvalue_pairs(s)?;
    if !pairs.iter().any(|(k, _, _)| *k == "password") {
        return None;
    }
    Some(
        pairs
            .iter()
            .filter(|(k, _, _)| *k != "password")
            .map(|&(_, a, b)| &s[a..b])
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::without_password as w;

    #[test]
    fn urls_lose_their_password_and_keep_the_rest() {
        assert_eq!(
            w("postgresql://app:s3cr%40t@db1:5432,db2/shop?sslmode=disable").as_deref(),
            Some("postgresql://app@db1:5432,db2/shop?sslmode=disable")
        );
        assert_eq!(
            w("postgres://app@db1/shop?password=x&application_name=a").as_deref(),
            Some("postgres://app@db1/shop?application_name=a")
        );
        assert_eq!(
            w("--source=postgresql://app:pw@db1/shop").as_deref(),
            Some("--source=postgresql://app@db1/shop")
        );
        assert_eq!(w("postgresql://app@db1/shop"), None);
        assert_eq!(
            w("postgresql://db1/shop?password=x").as_deref(),
            Some("postgresql://db1/shop")
        );
    }

    #[test]
    fn keyvalue_strings_lose_the_password_pair() {
        assert_eq!(
            w("host=db1 password='it''s \\' x' user=app dbname=shop").as_deref(),
            None,
            "not a valid key=value string: left alone"
        );
        assert_eq!(
            w("host=db1 password = 'a b\\'c' user=app").as_deref(),
            Some("host=db1 user=app")
        );
        assert_eq!(
            w("--target=host=db2 password=pw").as_deref(),
            Some("--target=host=db2")
        );
        assert_eq!(w("host=db1 user=app"), None);
        assert_eq!(
            w("echo password=x; true"),
            None,
            "a command is not a connection string"
        );
        assert_eq!(w("--max-lag=5s"), None);
        assert_eq!(w("verify"), None);
    }
}
