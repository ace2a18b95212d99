//! `remote_url` parsing for the kvtier server tier.
//!
//! ```text
//! kvtier://[token@]host:port[?options]
//! ```
//!
//! `host:port` is the TCP listener of another node's `kvtier serve --tcp`; the port is
//! required (there is no conventional one). The token, when the server requires one, comes
//! from the URL or else from `KVTIER_AUTH_TOKEN` (the variable the server and its clients
//! already use). Options:
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `pool` | 4 | connections to the server (concurrent requests) |
//! | `connect_timeout_ms` | 1000 | bound on one connect + handshake |
//! | `retry_max_ms` | 5000 | longest reconnect backoff after failed connects |
//! | `name` | `peer`, `peer2`, ... | tier name in stats, metrics and logs |
//!
//! The token never reaches `Debug` output, logs or error messages: they show
//! `kvtier://:***@host:port`.

use std::time::Duration;

use crate::error::Result;
use crate::tier::remote::url::{
    err, parse_host_port, parse_options, percent_decode, redact, split_authority, split_query,
};

/// Environment variable holding the server's shared token when the URL has none.
pub const ENV_TOKEN: &str = "KVTIER_AUTH_TOKEN";

/// A parsed `kvtier://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerUrl {
    /// `host:port` of the server's TCP listener.
    pub addr: String,
    /// Shared token (URL first, then environment).
    pub token: Option<String>,
    /// Connections to the server.
    pub pool: usize,
    /// Connect + handshake timeout.
    pub connect_timeout: Duration,
    /// Longest reconnect backoff.
    pub retry_max: Duration,
    /// Tier name override.
    pub name: Option<String>,
    redacted: String,
}

impl std::fmt::Debug for PeerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for PeerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PeerUrl {
    /// Parses `url`, taking a missing token from the process environment.
    pub fn parse(url: &str) -> Result<PeerUrl> {
        PeerUrl::parse_with_env(url, |k| std::env::var(k).ok())
    }

    /// Parses `url`, taking a missing token from `env` (tests pass a map).
    pub fn parse_with_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<PeerUrl> {
        let shown = redact(url);
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("kvtier") => rest,
            _ => {
                return Err(err(format!(
                    "`{shown}` is not a kvtier:// URL (expected kvtier://[token@]host:port)"
                )))
            }
        };
        let (userinfo, host, tail) = split_authority(rest);
        let token = match userinfo {
            None => None,
            Some(ui) => {
                // `token@` or `:token@`; a user name has no meaning for kvtier servers.
                let t = match ui.split_once(':') {
                    None => ui,
                    Some(("", t)) => t,
                    Some(_) => {
                        return Err(err(format!(
                        "`{shown}`: a kvtier server takes a token only: kvtier://TOKEN@host:port"
                    )))
                    }
                };
                Some(percent_decode(t, "token")?).filter(|t| !t.is_empty())
            }
        };
        let token = token.or_else(|| env(ENV_TOKEN).filter(|t| !t.is_empty()));
        let addr = parse_addr(host, &shown)?;
        let (path, query) = split_query(tail);
        if !path.trim_start_matches('/').is_empty() {
            return Err(err(format!(
                "`{shown}`: a kvtier:// URL has no path; use kvtier://[token@]host:port[?options]"
            )));
        }
        let link = parse_options(
            query,
            &shown,
            "pool, connect_timeout_ms, retry_max_ms, name",
            |_| Ok(false),
        )?;
        let mut out = PeerUrl {
            addr,
            token,
            pool: link.pool,
            connect_timeout: link.connect_timeout,
            retry_max: link.retry_max,
            name: link.name,
            redacted: String::new(),
        };
        out.redacted = format!(
            "kvtier://{}{}{}",
            if out.token.is_some() { ":***@" } else { "" },
            out.addr,
            query
                .filter(|q| !q.is_empty())
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
        Ok(out)
    }

    /// The URL with the token masked.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

fn parse_addr(h: &str, shown: &str) -> Result<String> {
    if h.contains(',') {
        return Err(err(format!(
            "`{shown}`: one kvtier server per URL; list several URLs in remote_url instead"
        )));
    }
    let (host, port) =
        parse_host_port(h).map_err(|e| err(format!("`{shown}`: {e}; use kvtier://host:port")))?;
    let Some(port) = port else {
        return Err(err(format!(
            "`{shown}`: missing port; use kvtier://host:port with the port of the server's `kvtier serve --tcp`"
        )));
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_addresses_tokens_and_options() {
        let u = PeerUrl::parse_with_env("kvtier://10.0.0.2:7070", no_env).unwrap();
        assert_eq!(
            (u.addr.as_str(), u.token.as_deref()),
            ("10.0.0.2:7070", None)
        );
        assert_eq!((u.pool, u.name.as_deref()), (4, None));
        let u = PeerUrl::parse_with_env(
            "kvtier://s%40cret@[::1]:7070?pool=2&connect_timeout_ms=50&retry_max_ms=300&name=n1",
            no_env,
        )
        .unwrap();
        assert_eq!(u.addr, "[::1]:7070");
        assert_eq!(u.token.as_deref(), Some("s@cret"));
        assert_eq!(u.pool, 2);
        assert_eq!(u.connect_timeout, Duration::from_millis(50));
        assert_eq!(u.retry_max, Duration::from_millis(300));
        assert_eq!(u.name.as_deref(), Some("n1"));
        let u = PeerUrl::parse_with_env("kvtier://:tok@h:1/", no_env).unwrap();
        assert_eq!(u.token.as_deref(), Some("tok"));
    }

    #[test]
    fn token_from_env_unless_in_url() {
        let env = |k: &str| (k == ENV_TOKEN).then(|| "fromenv".to_string());
        let u = PeerUrl::parse_with_env("kvtier://h:1", env).unwrap();
        assert_eq!(u.token.as_deref(), Some("fromenv"));
        let u = PeerUrl::parse_with_env("kvtier://mine@h:1", env).unwrap();
        assert_eq!(u.token.as_deref(), Some("mine"));
    }

    #[test]
    fn redacts_the_token_everywhere() {
        let u = PeerUrl::parse_with_env("kvtier://hunter2@h:7070?pool=2", no_env).unwrap();
        for s in [u.redacted().to_string(), format!("{u:?}"), format!("{u}")] {
            assert_eq!(s, "kvtier://:***@h:7070?pool=2");
        }
        assert_eq!(redact("kvtier://hunter2@h:1"), "kvtier://:***@h:1");
        let env = |_: &str| Some("fromenv".to_string());
        let u = PeerUrl::parse_with_env("kvtier://h:1", env).unwrap();
        assert!(!format!("{u:?}").contains("fromenv"));
    }

    #[test]
    fn rejects_bad_urls_with_clear_messages() {
        let cases = [
            ("kvtier://topsecret@h", "missing port"),
            ("kvtier://topsecret@h:0", "bad port"),
            ("kvtier://topsecret@h:x", "bad port"),
            ("kvtier://topsecret@:7070", "no host"),
            ("kvtier://u:topsecret@h:1", "token only"),
            ("kvtier://topsecret@h:1/db", "no path"),
            ("kvtier://topsecret@h:1?bogus=1", "unknown option"),
            ("kvtier://topsecret@h:1?pool=0", "at least 1"),
            ("kvtier://topsecret@a:1,b:2", "one kvtier server per URL"),
            ("redis://topsecret@h:1", "not a kvtier:// URL"),
        ];
        for (url, want) in cases {
            let e = PeerUrl::parse_with_env(url, no_env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("secret"), "secret leaked: {e}");
        }
    }
}
