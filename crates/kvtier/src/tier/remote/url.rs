//! URL parsing shared by the remote tiers' `remote_url` parsers
//! ([`crate::tier::redis::url`], [`crate::tier::peer::url`]): splitting, percent-decoding,
//! `host:port`, the connection options every remote tier takes, and redaction of secrets.

use std::time::Duration;

use crate::error::{Error, Result};

/// A `remote_url` config error.
pub(crate) fn err(msg: impl Into<String>) -> Error {
    Error::config("remote_url", msg)
}

/// Decodes `%XX` escapes; `what` names the URL part in errors (never its text).
pub(crate) fn percent_decode(s: &str, what: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => out.push(v),
                // Never echo the text: it may be a password.
                None => return Err(err(format!("bad percent-escape in the URL's {what}"))),
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| err(format!("the URL's {what} is not UTF-8")))
}

/// Splits what follows `scheme://` into userinfo, host list and the rest (`/db?query`).
/// The userinfo ends at the last `@` before any `?`, so an unescaped `/` in a password
/// still counts as part of the password (and is never shown).
pub(crate) fn split_authority(rest: &str) -> (Option<&str>, &str, &str) {
    let q = rest.find('?').unwrap_or(rest.len());
    let (userinfo, after) = match rest[..q].rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let end = after.find(['/', '?']).unwrap_or(after.len());
    (userinfo, &after[..end], &after[end..])
}

/// Redacts the credentials of any URL-like string (`scheme://user:secret@host` becomes
/// `scheme://user:***@host`), for messages about URLs that failed to parse.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: anything before an `@` may be a secret.
        return match url.rfind('@') {
            Some(at) => format!("***@{}", &url[at + 1..]),
            None => url.to_string(),
        };
    };
    let (userinfo, hosts, tail) = split_authority(rest);
    let tail = redact_query(tail);
    match userinfo {
        None => format!("{scheme}://{hosts}{tail}"),
        Some(ui) => {
            let user = ui.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{hosts}{tail}")
        }
    }
}

/// Masks `password=` style query parameters.
pub(crate) fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let q: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

/// Splits what follows the host list into the path and the query (without its `?`).
pub(crate) fn split_query(tail: &str) -> (&str, Option<&str>) {
    match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    }
}

/// Parses `host[:port]` (an IPv6 host in brackets) into the host and the port if given.
/// Errors are messages without the URL, for the caller to place.
pub(crate) fn parse_host_port(h: &str) -> std::result::Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("bad IPv6 host `{h}`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("bad host `{h}`")),
        };
        (format!("[{host}]"), port)
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host.to_string(), Some(port)),
            None => (h.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("the URL has no host".to_string());
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("bad port `{p}` for host `{host}`"))?,
        ),
    };
    Ok((host, port))
}

/// The connection options every remote tier takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LinkOptions {
    /// `pool`: connections per server.
    pub pool: usize,
    /// `connect_timeout_ms`: bound on one connect + handshake.
    pub connect_timeout: Duration,
    /// `retry_max_ms`: longest reconnect backoff.
    pub retry_max: Duration,
    /// `name`: tier name override.
    pub name: Option<String>,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            pool: 4,
            connect_timeout: Duration::from_millis(1000),
            retry_max: Duration::from_millis(5000),
            name: None,
        }
    }
}

/// One `key=value` of a URL's query, the value percent-decoded.
pub(crate) struct UrlOption<'a> {
    /// The option name.
    pub key: &'a str,
    /// The decoded value.
    pub value: String,
    shown: &'a str,
}

impl UrlOption<'_> {
    /// The value as a number up to `max`.
    pub fn number(&self, max: u64) -> Result<u64> {
        self.value
            .parse::<u64>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| {
                err(format!(
                    "`{}`: option `{}={}` needs a number up to {max}",
                    self.shown, self.key, self.value
                ))
            })
    }
}

/// Parses the options of `query` (`shown` is the redacted URL, for errors): the
/// [`LinkOptions`] here, the others through `extra`, which returns whether it knew the key;
/// an unknown key is an error listing `known`.
pub(crate) fn parse_options(
    query: Option<&str>,
    shown: &str,
    known: &str,
    mut extra: impl FnMut(&UrlOption<'_>) -> Result<bool>,
) -> Result<LinkOptions> {
    let mut out = LinkOptions::default();
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (key, v) = kv.split_once('=').unwrap_or((kv, ""));
        let opt = UrlOption {
            key,
            value: percent_decode(v, "options")?,
            shown,
        };
        match key {
            "pool" => {
                let n = opt.number(256)?;
                if n == 0 {
                    return Err(err(format!("`{shown}`: pool must be at least 1")));
                }
                out.pool = n as usize;
            }
            "connect_timeout_ms" => {
                out.connect_timeout = Duration::from_millis(opt.number(600_000)?.max(1))
            }
            "retry_max_ms" => out.retry_max = Duration::from_millis(opt.number(3_600_000)?.max(1)),
            "name" => {
                if opt.value.is_empty() {
                    return Err(err(format!("`{shown}`: name must not be empty")));
                }
                out.name = Some(opt.value);
            }
            _ => {
                if !extra(&opt)? {
                    return Err(err(format!(
                        "`{shown}`: unknown option `{key}`; known: {known}"
                    )));
                }
            }
        }
    }
    Ok(out)
}
