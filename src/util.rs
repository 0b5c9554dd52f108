//! Small helpers every subsystem shares and none owns: an error's causes on one line, untrusted
//! text bounded and on one line, files read up to a size, the wall clock in Unix seconds, and the parsers for the config's duration and size strings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An error and its causes on one line (`outer: inner: innermost`), for logs and reports; a
/// cause whose text the line already holds is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Why [`read_capped`] returned no bytes.
#[derive(Debug, thiserror::Error)]
pub enum CappedRead {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("larger than {limit} bytes")]
    TooLarge { limit: u64 },
}

/// Reads a whole file of at most `limit` bytes. Of a larger one (a file from a model
/// artifact may be any size, sparse, or still growing) at most `limit + 1` bytes are read.
///
/// # Errors
/// [`CappedRead::Io`] from opening or reading; [`CappedRead::TooLarge`] past `limit`.
pub fn read_capped(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, CappedRead> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(CappedRead::TooLarge { limit });
    }
    Ok(bytes)
}

/// At most `max` bytes of `s`, cut at a character boundary (for echoing untrusted input).
#[must_use]
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// At most `max` bytes of `s` (cut at a character boundary, `…` marking the cut): free text
/// from a peer, bounded before it goes into a report, a status or an event.
#[must_use]
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}…", truncate(s, max))
}

/// Untrusted text on one line: every run of whitespace and control characters (a newline
/// would forge a log line, an escape sequence would drive a terminal) becomes one space, and
/// the result is [`clip`]ped to `max` bytes.
#[must_use]
pub fn one_line(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for word in s.split(|c: char| c.is_whitespace() || c.is_control()).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
        if out.len() > max {
            break;
        }
    }
    clip(&out, max)
}

/// Whether `host` (a URL's host, IPv6 without brackets) names this machine: `localhost` or a
/// loopback address. Credentials may cross plaintext only to such a host.
#[must_use]
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `url` with any password (and username) replaced, for messages: what a URL carries in its
/// user-info never reaches a log, an error, `/status` or the fleet. Text that does not parse
/// as a URL is cut at its last `@` the same way.
#[must_use]
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("REDACTED");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => url.to_string(),
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}REDACTED{}", &url[..s + 3], &url[at..]),
            _ => url.to_string(),
        },
    }
}

/// Whether an I/O error means the file system (or the user's quota on it) is full.
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// Seconds since the Unix epoch, for records and reports (0 if the clock is before 1970).
#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `t` in Unix seconds, `None` before 1970.
#[must_use]
pub fn unix_secs(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// Longest duration a config value may give. Longer ones are mistakes, and the daemon adds
/// durations to the clock for deadlines and next runs: `Instant::now()` plus a few hundred
/// billion years panics.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

/// Parses a duration string for `key`, recording a problem (and returning zero) when it is
/// not one, is zero or is longer than [`MAX_DURATION`]; shared by every section that validates
/// durations.
pub fn duration(key: &str, value: &str, problems: &mut Vec<String>) -> Duration {
    match humantime::parse_duration(value.trim()) {
        Ok(d) if d.is_zero() => {
            problems.push(format!("{key}: must be longer than zero"));
            Duration::ZERO
        }
        Ok(d) if d > MAX_DURATION => {
            problems.push(format!("{key}: `{value}` is longer than {} days", MAX_DURATION.as_secs() / 86400));
            Duration::ZERO
        }
        Ok(d) => d,
        Err(e) => {
            problems.push(format!("{key}: `{value}` is not a duration such as \"30s\" or \"5m\" ({e})"));
            Duration::ZERO
        }
    }
}

/// Parses `"20GiB"`, `"500MB"`, `"512k"`, `"1024"` (bytes; binary and decimal units).
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().map_err(|_| format!("`{s}` has no number"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit `{other}`")),
    };
    Ok((num * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_bounded_and_on_one_line() {
        assert_eq!(one_line("a\n\r\x1b[31mb\t\u{85}  c ", 100), "a [31mb c");
        assert_eq!(one_line(&"é".repeat(100), 9), format!("{}…", "é".repeat(4)));
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(one_line("", 5), "");
    }

    /// A config duration of 500 billion years passed the check and panicked the poller when it
    /// added it to the clock (fuzz/regressions/config_toml/).
    #[test]
    fn config_durations_are_positive_and_at_most_a_year() {
        let table: [(&str, Result<Duration, &str>); 6] = [
            ("5m", Ok(Duration::from_secs(300))),
            (" 365days ", Ok(MAX_DURATION)),
            ("0s", Err("must be longer than zero")),
            ("366days", Err("is longer than 365 days")),
            ("500000000000years", Err("is longer than 365 days")),
            ("soon", Err("is not a duration")),
        ];
        for (value, want) in table {
            let mut problems = Vec::new();
            let got = duration("k", value, &mut problems);
            match want {
                Ok(d) => assert_eq!((got, problems.as_slice()), (d, &[][..]), "{value}"),
                Err(needle) => {
                    assert_eq!(got, Duration::ZERO, "{value}");
                    assert!(problems.len() == 1 && problems[0].starts_with("k: ") && problems[0].contains(needle), "{value}: {problems:?}");
                }
            }
        }
    }
}
