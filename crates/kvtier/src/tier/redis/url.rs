//! `remote_url` parsing for Redis/Valkey tiers, and redaction of credentials.
//!
//! Accepted forms:
//!
//! ```text
//! redis://[user:password@]host[:port][/db][?options]
//! valkey://...                         (same as redis://)
//! redis+cluster://[user:password@]host:port[,host:port...][?options]
//! rediss://, valkeys://, rediss+cluster://, valkeys+cluster://   (the same over TLS)
//! ```
//!
//! TLS settings (CA, client certificate) are engine config keys, see [`super::tls`].
//! `kvtier://` URLs (another node's `kvtier serve`) are parsed by
//! [`crate::tier::peer::url::PeerUrl`]. Credentials not in the URL come from the
//! environment (`KVTIER_REDIS_USERNAME`, `KVTIER_REDIS_PASSWORD`); the URL wins field by
//! field. Options (query parameters):
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `prefix` | `kvtier:` | key namespace (not empty): every key is `<prefix><64 hex chars>`; `clear` and salt removal touch only such keys holding a kvtier record |
//! | `ttl_sec` | 0 (none) | expire stored chunks after this many seconds (`SET ... EX`) |
//! | `pool` | 4 | connections per Redis node (concurrent requests per node) |
//! | `connect_timeout_ms` | 1000 | bound on one connect + handshake |
//! | `retry_max_ms` | 5000 | longest reconnect backoff after failed connects |
//! | `slot_refresh_sec` | 30 | cluster: reload the slot map this often in the background (0: only after redirects and node failures) |
//! | `name` | `redis`, `redis2`, ... | tier name in stats, metrics and logs |
//!
//! Secrets never reach `Debug` output, logs or error messages: everything shows the redacted
//! form `redis://user:***@host:port/db?...`.

use std::time::Duration;

use crate::error::Result;
use crate::tier::remote::url::{
    err, parse_host_port, parse_options, percent_decode, redact, redact_query, split_authority,
    split_query,
};

/// Environment variable for the username when the URL has none.
pub const ENV_USERNAME: &str = "KVTIER_REDIS_USERNAME";
/// Environment variable for the password when the URL has none.
pub const ENV_PASSWORD: &str = "KVTIER_REDIS_PASSWORD";

/// Credentials for `AUTH`. `Debug` never shows the password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// ACL username (`None`: the `default` user / `requirepass`).
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Standalone server or cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One server (or a proxy in front of several).
    Standalone,
    /// Redis Cluster: the hosts are seeds for slot discovery.
    Cluster,
}

/// A parsed Redis tier URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Standalone or cluster.
    pub mode: Mode,
    /// TLS (`rediss://`, `valkeys://`, `rediss+cluster://`).
    pub tls: bool,
    /// `host:port` of the server, or the cluster seeds.
    pub hosts: Vec<String>,
    /// Database index (standalone only).
    pub db: u32,
    /// Credentials (URL first, then environment).
    pub credentials: Credentials,
    /// Key prefix.
    pub prefix: String,
    /// Expiry of stored chunks.
    pub ttl: Option<Duration>,
    /// Connections per node.
    pub pool: usize,
    /// Connect + handshake timeout.
    pub connect_timeout: Duration,
    /// Longest reconnect backoff.
    pub retry_max: Duration,
    /// Period of the background slot-map refresh of a cluster (`None`: event-driven only).
    pub slot_refresh: Option<Duration>,
    /// Tier name override.
    pub name: Option<String>,
    redacted: String,
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

fn parse_host(h: &str) -> Result<String> {
    let (host, port) = parse_host_port(h).map_err(err)?;
    Ok(format!("{host}:{}", port.unwrap_or(6379)))
}

impl RedisUrl {
    /// Parses `url`, taking missing credentials from the process environment.
    pub fn parse(url: &str) -> Result<RedisUrl> {
        RedisUrl::parse_with_env(url, |k| std::env::var(k).ok())
    }

    /// Parses `url`, taking missing credentials from `env` (tests pass a map).
    pub fn parse_with_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<RedisUrl> {
        let shown = redact(url);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            err(format!(
                "`{shown}` is not a URL (expected redis://host:port)"
            ))
        })?;
        let (mode, tls) = match scheme.to_ascii_lowercase().as_str() {
            "redis" | "valkey" => (Mode::Standalone, false),
            "redis+cluster" | "valkey+cluster" => (Mode::Cluster, false),
            "rediss" | "valkeys" => (Mode::Standalone, true),
            "rediss+cluster" | "valkeys+cluster" => (Mode::Cluster, true),
            "kvtier" => {
                return Err(err(format!(
                    "`{shown}` names a kvtier server, not Redis (build it with PeerTier::from_url)"
                )))
            }
            other => {
                return Err(err(format!(
                    "`{shown}`: unsupported scheme `{other}`; supported: redis://, valkey://, redis+cluster://, their TLS forms rediss:// etc., kvtier://, and the object stores s3://, gs://, az://"
                )))
            }
        };
        let (userinfo, hostlist, tail) = split_authority(rest);
        let (mut username, mut password) = (None, None);
        if let Some(ui) = userinfo {
            let (u, p) = match ui.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (ui, None),
            };
            if !u.is_empty() {
                username = Some(percent_decode(u, "username")?);
            }
            if let Some(p) = p.filter(|p| !p.is_empty()) {
                password = Some(percent_decode(p, "password")?);
            }
        }
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let username = username.or_else(|| env(ENV_USERNAME));
        let password = password.or_else(|| env(ENV_PASSWORD));
        if username.is_some() && password.is_none() {
            return Err(err(format!(
                "`{shown}`: a username needs a password (in the URL or {ENV_PASSWORD})"
            )));
        }
        let hosts = hostlist
            .split(',')
            .map(parse_host)
            .collect::<Result<Vec<_>>>()?;
        if mode == Mode::Standalone && hosts.len() != 1 {
            return Err(err(format!(
                "`{shown}`: several hosts need redis+cluster://; a standalone URL names one server"
            )));
        }
        let (path, query) = split_query(tail);
        let db_text = path.trim_start_matches('/');
        let db = if db_text.is_empty() {
            0
        } else {
            db_text
                .parse::<u32>()
                .map_err(|_| err(format!("`{shown}`: database `{db_text}` is not a number")))?
        };
        if mode == Mode::Cluster && db != 0 {
            return Err(err(format!("`{shown}`: Redis Cluster has only database 0")));
        }
        let mut prefix = "kvtier:".to_string();
        let mut ttl = None;
        let mut slot_refresh = Some(Duration::from_secs(30));
        let link = parse_options(
            query,
            &shown,
            "prefix, ttl_sec, pool, connect_timeout_ms, retry_max_ms, slot_refresh_sec, name",
            |opt| {
                match opt.key {
                    "prefix" => prefix = opt.value.clone(),
                    "ttl_sec" => {
                        let n = opt.number(u64::from(u32::MAX))?;
                        ttl = (n > 0).then(|| Duration::from_secs(n));
                    }
                    "slot_refresh_sec" => {
                        let n = opt.number(86_400)?;
                        slot_refresh = (n > 0).then(|| Duration::from_secs(n));
                    }
                    _ => return Ok(false),
                }
                Ok(true)
            },
        )?;
        if prefix.is_empty() {
            // Every key would then look like a chunk key of this tier: a database shared
            // with other applications is no place for an unnamespaced cache.
            return Err(err(format!(
                "`{shown}`: `prefix` must not be empty (kvtier's keys need a namespace of \
                 their own in a database other applications may use); drop `prefix=` for \
                 the default `kvtier:`, or set a non-empty one such as `prefix=myapp-kv:` \
                 (chunks stored earlier without a prefix are not found again: they are keys \
                 of 64 hex digits)"
            )));
        }
        let mut out = RedisUrl {
            mode,
            tls,
            hosts,
            db,
            credentials: Credentials { username, password },
            prefix,
            ttl,
            pool: link.pool,
            connect_timeout: link.connect_timeout,
            retry_max: link.retry_max,
            slot_refresh,
            name: link.name,
            redacted: String::new(),
        };
        out.redacted = out.render(scheme, query);
        Ok(out)
    }

    fn render(&self, scheme: &str, query: Option<&str>) -> String {
        let mut s = format!("{}://", scheme.to_ascii_lowercase());
        match (&self.credentials.username, &self.credentials.password) {
            (Some(u), Some(_)) => s.push_str(&format!("{u}:***@")),
            (None, Some(_)) => s.push_str(":***@"),
            _ => {}
        }
        s.push_str(&self.hosts.join(","));
        if self.db != 0 {
            s.push_str(&format!("/{}", self.db));
        }
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            s.push_str(&redact_query(&format!("?{q}")));
        }
        s
    }

    /// The URL with the password masked.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_standalone_with_defaults() {
        let u = RedisUrl::parse_with_env("redis://h:6380", no_env).unwrap();
        assert_eq!(u.mode, Mode::Standalone);
        assert_eq!(u.hosts, vec!["h:6380"]);
        assert_eq!((u.db, u.pool, u.ttl), (0, 4, None));
        assert_eq!(u.prefix, "kvtier:");
        assert_eq!(u.credentials, Credentials::default());
        let u = RedisUrl::parse_with_env("valkey://h", no_env).unwrap();
        assert_eq!(u.hosts, vec!["h:6379"]);
        let u = RedisUrl::parse_with_env("redis://[::1]:7000/3", no_env).unwrap();
        assert_eq!((u.hosts[0].as_str(), u.db), ("[::1]:7000", 3));
    }

    #[test]
    fn parses_credentials_and_options() {
        let u = RedisUrl::parse_with_env(
            "redis://al%40ice:p%3Ass@127.0.0.1:6379/2?prefix=x:&ttl_sec=60&pool=8&name=shared",
            no_env,
        )
        .unwrap();
        assert_eq!(u.credentials.username.as_deref(), Some("al@ice"));
        assert_eq!(u.credentials.password.as_deref(), Some("p:ss"));
        assert_eq!(u.db, 2);
        assert_eq!(u.prefix, "x:");
        assert_eq!(u.ttl, Some(Duration::from_secs(60)));
        assert_eq!(u.pool, 8);
        assert_eq!(u.name.as_deref(), Some("shared"));
        let u = RedisUrl::parse_with_env("redis://:secret@h", no_env).unwrap();
        assert_eq!(u.credentials.username, None);
        assert_eq!(u.credentials.password.as_deref(), Some("secret"));
    }

    #[test]
    fn url_credentials_win_over_env() {
        let env = |k: &str| match k {
            ENV_USERNAME => Some("envuser".to_string()),
            ENV_PASSWORD => Some("envpass".to_string()),
            _ => None,
        };
        let u = RedisUrl::parse_with_env("redis://h:1", env).unwrap();
        assert_eq!(u.credentials.username.as_deref(), Some("envuser"));
        assert_eq!(u.credentials.password.as_deref(), Some("envpass"));
        let u = RedisUrl::parse_with_env("redis://me:mine@h:1", env).unwrap();
        assert_eq!(u.credentials.username.as_deref(), Some("me"));
        assert_eq!(u.credentials.password.as_deref(), Some("mine"));
        assert!(!format!("{u:?}").contains("envpass"));
    }

    #[test]
    fn tls_schemes() {
        for (url, mode) in [
            ("rediss://u:pw@h:6380/1", Mode::Standalone),
            ("valkeys://h", Mode::Standalone),
            ("rediss+cluster://a:1,b:2", Mode::Cluster),
            ("valkeys+cluster://a:1", Mode::Cluster),
        ] {
            let u = RedisUrl::parse_with_env(url, no_env).unwrap();
            assert!(u.tls && u.mode == mode, "{url}");
            assert!(!u.redacted().contains("pw"));
        }
        let u = RedisUrl::parse_with_env("rediss://u:pw@h:6380/1", no_env).unwrap();
        assert_eq!(u.redacted(), "rediss://u:***@h:6380/1");
        assert!(!RedisUrl::parse_with_env("redis://h", no_env).unwrap().tls);
    }

    #[test]
    fn slot_refresh_option() {
        let u = RedisUrl::parse_with_env("redis+cluster://a:1", no_env).unwrap();
        assert_eq!(u.slot_refresh, Some(Duration::from_secs(30)));
        let u = RedisUrl::parse_with_env("redis+cluster://a:1?slot_refresh_sec=5", no_env).unwrap();
        assert_eq!(u.slot_refresh, Some(Duration::from_secs(5)));
        let u = RedisUrl::parse_with_env("redis+cluster://a:1?slot_refresh_sec=0", no_env).unwrap();
        assert_eq!(u.slot_refresh, None);
        assert!(
            RedisUrl::parse_with_env("redis+cluster://a:1?slot_refresh_sec=x", no_env).is_err()
        );
    }

    #[test]
    fn parses_cluster_seeds() {
        let u =
            RedisUrl::parse_with_env("redis+cluster://a:7000,b:7001,[::1]:7002", no_env).unwrap();
        assert_eq!(u.mode, Mode::Cluster);
        assert_eq!(u.hosts, vec!["a:7000", "b:7001", "[::1]:7002"]);
        assert!(RedisUrl::parse_with_env("redis+cluster://a:7000/1", no_env).is_err());
        assert!(RedisUrl::parse_with_env("redis://a:1,b:2", no_env).is_err());
    }

    #[test]
    fn rejects_bad_urls_with_clear_messages() {
        let cases = [
            ("redisss://u:topsecret@h:1", "unsupported scheme"),
            ("kvtier://h:1", "names a kvtier server"),
            ("http://u:topsecret@h", "unsupported scheme"),
            ("redis://u:topsecret@h:notaport", "bad port"),
            ("redis://u:topsecret@h:1/x", "not a number"),
            ("redis://u:topsecret@h:1?bogus=1", "unknown option"),
            ("redis://u:topsecret@h:1?pool=0", "at least 1"),
            ("redis://onlyuser@h:1", "needs a password"),
            ("redis://u:topsecret@:1", "no host"),
            ("u:topsecret@h", "not a URL"),
            ("redis://u:top%zzsecret@h", "percent-escape"),
            ("redis://u:top/secret@h:1/x", "not a number"),
            (
                "redis://u:topsecret@h:1?prefix=",
                "`prefix` must not be empty",
            ),
            (
                "redis+cluster://u:topsecret@h:1?pool=2&prefix=",
                "default `kvtier:`",
            ),
        ];
        for (url, want) in cases {
            let e = RedisUrl::parse_with_env(url, no_env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("secret"), "secret leaked: {e}");
        }
    }

    #[test]
    fn redaction_hides_passwords_everywhere() {
        let u =
            RedisUrl::parse_with_env("redis://user:hunter2@h:6379/1?prefix=p:", no_env).unwrap();
        assert_eq!(u.redacted(), "redis://user:***@h:6379/1?prefix=p:");
        assert_eq!(format!("{u:?}"), "redis://user:***@h:6379/1?prefix=p:");
        assert_eq!(format!("{u}"), "redis://user:***@h:6379/1?prefix=p:");
        assert!(!format!("{:?}", u.credentials).contains("hunter2"));
        let env = |k: &str| (k == ENV_PASSWORD).then(|| "fromenv".to_string());
        let u = RedisUrl::parse_with_env("redis://h", env).unwrap();
        assert_eq!(u.redacted(), "redis://:***@h:6379");
        assert_eq!(
            redact("redis://a:b@c:1/0?password=x&prefix=y"),
            "redis://a:***@c:1/0?password=***&prefix=y"
        );
        assert_eq!(redact("redis://c:1"), "redis://c:1");
        assert_eq!(redact("redis://:pw@c"), "redis://:***@c");
        assert_eq!(redact("u:pw@c"), "***@c");
    }
}
