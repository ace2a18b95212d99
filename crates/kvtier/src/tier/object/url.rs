//! `remote_url` parsing for the object-store tier.
//!
//! ```text
//! s3://bucket[/prefix][?options]
//! gs://bucket[/prefix][?options]
//! az://container[/prefix][?options]
//! ```
//!
//! Objects are named `<prefix>/<64 hex chars of the chunk key>`; the prefix defaults to
//! `kvtier`, so a bucket shared with other data keeps the cache in its own folder. Options:
//!
//! | option | default | meaning |
//! |---|---|---|
//! | `endpoint` | the provider's | `http(s)://host:port[/path]` of an S3-compatible server, Azurite (`http://host:port/<account>`) or a GCS emulator |
//! | `region` | `AWS_REGION`, else `us-east-1` | S3 region |
//! | `path_style` | `true` | S3: `endpoint/bucket/key` requests; `false`: virtual-hosted `bucket.endpoint/key` |
//! | `account` | `AZURE_STORAGE_ACCOUNT_NAME` | Azure storage account |
//! | `anonymous` | `false` | send unsigned requests, with no credentials (public buckets, emulators) |
//! | `tls_ca_file` | `remote_tls_ca_file`, else the system store | PEM CA bundle for an `https` endpoint |
//! | `concurrency` (alias `pool`) | 16 | requests in flight to the store (stores, loads and probes together) |
//! | `part_size_mb` | 0 (off) | chunks larger than this are written as multipart uploads and read as ranged parts of this size, in parallel |
//! | `timeout_ms` | 30000 | bound on one request (the manager's deadlines usually end it sooner) |
//! | `connect_timeout_ms` | 1000 | bound on one connect |
//! | `retry_max_ms` | 5000 | longest backoff after the store stopped answering |
//! | `name` | `s3`, `gs`, `az` (then `s32`, ...) | tier name in stats, metrics and logs |
//!
//! Credentials never appear in the URL: they come from the provider's standard environment
//! variables and configuration (see [`super`]). A URL carrying a user or password is
//! refused, and the endpoint's userinfo, if any, is redacted in everything shown.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::tier::remote::url::{
    err, parse_options, percent_decode, redact, split_query, UrlOption,
};

/// The object-store service a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Amazon S3 or an S3-compatible server (`s3://`).
    S3,
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Azure Blob Storage (`az://`).
    Azure,
}

impl Provider {
    /// The URL scheme, also the default tier name.
    pub fn scheme(self) -> &'static str {
        match self {
            Provider::S3 => "s3",
            Provider::Gcs => "gs",
            Provider::Azure => "az",
        }
    }

    /// The provider of a `remote_url` scheme, if it is an object store's.
    pub fn from_scheme(scheme: &str) -> Option<Provider> {
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => Some(Provider::S3),
            "gs" | "gcs" => Some(Provider::Gcs),
            "az" | "azure" => Some(Provider::Azure),
            _ => None,
        }
    }
}

/// Default object-name prefix when the URL has no path.
pub const DEFAULT_PREFIX: &str = "kvtier";
/// Default requests in flight.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Default bound on one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const KNOWN: &str =
    "endpoint, region, path_style, account, anonymous, tls_ca_file, concurrency (or pool), \
                     part_size_mb, timeout_ms, connect_timeout_ms, retry_max_ms, name";

/// A parsed object-store URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    /// The service.
    pub provider: Provider,
    /// Bucket (S3, GCS) or container (Azure).
    pub bucket: String,
    /// Object-name prefix, without leading or trailing `/` (never empty).
    pub prefix: String,
    /// Endpoint override (`http(s)://...`).
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 path-style requests.
    pub path_style: bool,
    /// Azure storage account.
    pub account: Option<String>,
    /// Unsigned requests, no credentials.
    pub anonymous: bool,
    /// CA bundle for TLS to the endpoint (overrides `remote_tls_ca_file`).
    pub tls_ca_file: Option<PathBuf>,
    /// Requests in flight.
    pub concurrency: usize,
    /// Multipart / ranged part size in bytes (0: whole objects).
    pub part_size: usize,
    /// Bound on one request.
    pub timeout: Duration,
    /// Bound on one connect.
    pub connect_timeout: Duration,
    /// Longest backoff while the store is down.
    pub retry_max: Duration,
    /// Tier name override.
    pub name: Option<String>,
    redacted: String,
}

impl std::fmt::Debug for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `endpoint` with any `user:password@` masked.
fn redact_endpoint(endpoint: &str) -> String {
    redact(endpoint)
}

impl ObjectUrl {
    /// Whether `url` names an object store (by scheme), so the factory can route it here.
    pub fn is_object_url(url: &str) -> bool {
        url.split_once("://")
            .is_some_and(|(s, _)| Provider::from_scheme(s).is_some())
    }

    /// Parses `url`.
    pub fn parse(url: &str) -> Result<ObjectUrl> {
        let shown = redact(url);
        let (provider, rest) = match url.split_once("://") {
            Some((scheme, rest)) => match Provider::from_scheme(scheme) {
                Some(p) => (p, rest),
                None => {
                    return Err(err(format!(
                        "`{shown}` is not an s3://, gs:// or az:// URL"
                    )))
                }
            },
            None => {
                return Err(err(format!(
                    "`{shown}` is not an s3://, gs:// or az:// URL"
                )))
            }
        };
        let (path, query) = split_query(rest);
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.contains('@') {
            return Err(err(format!(
                "`{shown}`: credentials do not go in the URL; set them in the environment ({})",
                credential_hint(provider)
            )));
        }
        let bucket = percent_decode(bucket, "bucket")?;
        let what = if provider == Provider::Azure {
            "container"
        } else {
            "bucket"
        };
        if bucket.is_empty() || bucket.contains([':', ',']) {
            return Err(err(format!(
                "`{shown}`: bad {what} name; use {}://{what}[/prefix]",
                provider.scheme()
            )));
        }
        let prefix = percent_decode(prefix, "prefix")?;
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.chars().any(|c| c.is_control())
        {
            return Err(err(format!(
                "`{shown}`: bad prefix `{prefix}`; use folder names separated by single `/`"
            )));
        }
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_string()
        } else {
            prefix.to_string()
        };
        let mut out = ObjectUrl {
            provider,
            bucket,
            prefix,
            endpoint: None,
            region: None,
            path_style: true,
            account: None,
            anonymous: false,
            tls_ca_file: None,
            concurrency: DEFAULT_CONCURRENCY,
            part_size: 0,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_millis(1000),
            retry_max: Duration::from_millis(5000),
            name: None,
            redacted: String::new(),
        };
        let mut concurrency = None;
        let only = |opt: &str, p: Provider| -> Result<()> {
            if provider == p {
                Ok(())
            } else {
                Err(err(format!(
                    "`{shown}`: option `{opt}` is for {}:// URLs only",
                    p.scheme()
                )))
            }
        };
        let flag = |o: &UrlOption<'_>| match o.value.as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            v => Err(err(format!(
                "`{shown}`: {}=`{v}` must be true or false",
                o.key
            ))),
        };
        let link = parse_options(query, &shown, KNOWN, |o| {
            match o.key {
                "endpoint" => {
                    let e = o.value.trim_end_matches('/');
                    let ok = ["http://", "https://"].iter().any(|s| {
                        e.len() > s.len()
                            && e.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s))
                    });
                    if !ok {
                        return Err(err(format!(
                            "`{shown}`: endpoint `{}` must be an http:// or https:// URL",
                            redact_endpoint(e)
                        )));
                    }
                    out.endpoint = Some(e.to_string());
                }
                "region" => {
                    only("region", Provider::S3)?;
                    out.region = Some(o.value.clone()).filter(|r| !r.is_empty());
                }
                "path_style" => {
                    only("path_style", Provider::S3)?;
                    out.path_style = flag(o)?;
                }
                "anonymous" => out.anonymous = flag(o)?,
                "account" => {
                    only("account", Provider::Azure)?;
                    out.account = Some(o.value.clone()).filter(|a| !a.is_empty());
                }
                "tls_ca_file" => {
                    if o.value.is_empty() {
                        return Err(err(format!("`{shown}`: tls_ca_file must not be empty")));
                    }
                    out.tls_ca_file = Some(PathBuf::from(&o.value));
                }
                "concurrency" => {
                    let n = o.number(1024)?;
                    if n == 0 {
                        return Err(err(format!("`{shown}`: concurrency must be at least 1")));
                    }
                    concurrency = Some(n as usize);
                }
                "part_size_mb" => {
                    let mb = o.number(5 * 1024)?;
                    // S3 refuses multipart parts under 5 MiB (but the last).
                    if mb != 0 && mb < 5 {
                        return Err(err(format!(
                            "`{shown}`: part_size_mb must be 0 (off) or at least 5 (the S3 minimum part)"
                        )));
                    }
                    out.part_size = mb as usize * 1024 * 1024;
                }
                "timeout_ms" => out.timeout = Duration::from_millis(o.number(3_600_000)?.max(1)),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        // `pool` is the other remote tiers' name for the same bound.
        let pool_given = query
            .unwrap_or("")
            .split('&')
            .any(|kv| kv.split('=').next() == Some("pool"));
        out.concurrency = match (concurrency, pool_given) {
            (Some(c), _) => c,
            (None, true) => link.pool,
            (None, false) => DEFAULT_CONCURRENCY,
        };
        out.connect_timeout = link.connect_timeout;
        out.retry_max = link.retry_max;
        out.name = link.name;
        let shown_query = query
            .filter(|q| !q.is_empty())
            .map(|q| format!("?{}", redact_query_endpoint(q)))
            .unwrap_or_default();
        out.redacted = format!(
            "{}://{}/{}{}",
            provider.scheme(),
            out.bucket,
            out.prefix,
            shown_query
        );
        Ok(out)
    }

    /// The URL with any endpoint credentials masked.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

/// Masks userinfo inside an `endpoint=` option value.
fn redact_query_endpoint(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("endpoint", v)) => {
                let decoded = percent_decode(v, "options").unwrap_or_else(|_| v.to_string());
                format!("endpoint={}", redact_endpoint(&decoded))
            }
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Where the provider's credentials come from, for error messages.
pub(crate) fn credential_hint(p: Provider) -> &'static str {
    match p {
        Provider::S3 => "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or the instance/container role",
        Provider::Gcs => "GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_SERVICE_ACCOUNT (a service-account JSON file)",
        Provider::Azure => "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY or a managed identity",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schemes_buckets_prefixes_and_options() {
        let u = ObjectUrl::parse("s3://b").unwrap();
        assert_eq!(
            (u.provider, u.bucket.as_str(), u.prefix.as_str()),
            (Provider::S3, "b", DEFAULT_PREFIX)
        );
        assert_eq!((u.concurrency, u.part_size, u.path_style), (16, 0, true));
        let u = ObjectUrl::parse(
            "s3://bk/a/b/?endpoint=http%3A%2F%2F127.0.0.1%3A8333&region=eu-west-1&path_style=false&concurrency=4&part_size_mb=8&timeout_ms=500&connect_timeout_ms=50&retry_max_ms=300&name=cold",
        )
        .unwrap();
        assert_eq!(u.prefix, "a/b");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert!(!u.path_style);
        assert_eq!((u.concurrency, u.part_size), (4, 8 << 20));
        assert_eq!(u.timeout, Duration::from_millis(500));
        assert_eq!(u.connect_timeout, Duration::from_millis(50));
        assert_eq!(u.retry_max, Duration::from_millis(300));
        assert_eq!(u.name.as_deref(), Some("cold"));
        let u = ObjectUrl::parse("az://c/p?account=acct&endpoint=http://h:1/acct&pool=3").unwrap();
        assert_eq!(
            (u.provider, u.account.as_deref()),
            (Provider::Azure, Some("acct"))
        );
        assert_eq!(u.concurrency, 3);
        let u = ObjectUrl::parse("GS://b?tls_ca_file=/etc/ca.pem&anonymous=true").unwrap();
        assert_eq!((u.provider, u.anonymous), (Provider::Gcs, true));
        assert_eq!(u.tls_ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert!(ObjectUrl::is_object_url("az://c"));
        assert!(!ObjectUrl::is_object_url("redis://h:1"));
    }

    #[test]
    fn shown_urls_hide_endpoint_credentials() {
        let u = ObjectUrl::parse("s3://b/p?endpoint=https://user:hunter2@h:9000").unwrap();
        for s in [u.redacted().to_string(), format!("{u:?}"), format!("{u}")] {
            assert!(!s.contains("hunter2"), "{s}");
            assert!(
                s.starts_with("s3://b/p?endpoint=https://user:***@h:9000"),
                "{s}"
            );
        }
    }

    #[test]
    fn rejects_bad_urls_with_clear_messages() {
        let cases = [
            ("s3://AKIA:topsecret@b", "credentials do not go in the URL"),
            ("s3://", "bad bucket name"),
            ("az:///p", "bad container name"),
            ("s3://b/../x", "bad prefix"),
            ("s3://b?endpoint=ftp://h", "http:// or https://"),
            ("s3://b?region=x&bogus=1", "unknown option `bogus`"),
            ("gs://b?region=x", "for s3:// URLs only"),
            ("s3://b?account=x", "for az:// URLs only"),
            ("s3://b?path_style=maybe", "true or false"),
            ("s3://b?concurrency=0", "at least 1"),
            ("s3://b?part_size_mb=1", "at least 5"),
            ("redis://h:1", "not an s3://"),
        ];
        for (url, want) in cases {
            let e = ObjectUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(want), "{url}: {e}");
            assert!(!e.contains("topsecret"), "secret leaked: {e}");
        }
    }
}
