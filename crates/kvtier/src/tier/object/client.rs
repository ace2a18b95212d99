//! The `object_store` client of an object-store tier: the provider's builder with the
//! standard credential chain, the URL's options, and an HTTP connector of ours.
//!
//! The connector builds reqwest on a rustls configuration with the ring provider (the crate's
//! one crypto stack; no process-wide default provider is installed) and runs every request on
//! the network I/O runtime ([`crate::transport::io_runtime`]): the manager's runtime has no
//! I/O driver, and a request future dropped by a deadline aborts its spawned request.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::client::{ClientOptions, HttpClient, HttpConnector, SpawnService};
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use super::url::{credential_hint, ObjectUrl, Provider};
use crate::error::{Error, Result};
use crate::tier::redis::tls::{self, TlsSettings};

/// Retries inside one call, for a store's transient refusals (503 SlowDown, a reset
/// connection); bounded well inside the manager's deadlines, which end the call anyway.
fn retry(url: &ObjectUrl) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: url.timeout,
    }
}

/// Builds reqwest clients for `object_store`: our TLS, timeouts and pool size, requests on
/// the network I/O runtime.
#[derive(Debug)]
struct Connector {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    timeout: Duration,
    idle_per_host: usize,
}

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let generic = |e: &dyn std::fmt::Display| object_store::Error::Generic {
            store: "kvtier",
            source: e.to_string().into(),
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*self.tls).clone())
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .pool_max_idle_per_host(self.idle_per_host)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .http1_only()
            .build()
            .map_err(|e| generic(&e))?;
        let rt = crate::transport::io_runtime().map_err(|e| generic(&e))?;
        Ok(HttpClient::new(SpawnService::new(
            client,
            rt.handle().clone(),
        )))
    }
}

/// A built client for `url`: the store, with the URL's bucket and credentials.
pub(crate) fn build(url: &ObjectUrl, tls_settings: &TlsSettings) -> Result<Arc<dyn ObjectStore>> {
    let mut settings = tls_settings.clone();
    if let Some(ca) = &url.tls_ca_file {
        settings.ca_file = Some(ca.clone());
    }
    let mut tls = (*tls::client_config(&settings)?).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = Connector {
        tls: Arc::new(tls),
        connect_timeout: url.connect_timeout,
        timeout: url.timeout,
        idle_per_host: url.concurrency,
    };
    let allow_http = url
        .endpoint
        .as_deref()
        .and_then(|e| e.get(..7))
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"));
    let options = ClientOptions::new().with_allow_http(allow_http);
    let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match url.provider {
        Provider::S3 => {
            // The standard chain: AWS_* variables (keys, session token, region, web
            // identity), then the container / instance role.
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(&url.bucket)
                .with_virtual_hosted_style_request(!url.path_style)
                .with_client_options(options)
                .with_retry(retry(url))
                .with_skip_signature(url.anonymous)
                .with_http_connector(connector);
            if let Some(e) = &url.endpoint {
                b = b.with_endpoint(e);
            }
            match &url.region {
                Some(r) => b = b.with_region(r),
                None if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none() =>
                {
                    b = b.with_region("us-east-1")
                }
                None => {}
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        Provider::Gcs => {
            // GOOGLE_SERVICE_ACCOUNT(_PATH|_KEY), GOOGLE_APPLICATION_CREDENTIALS, then the
            // metadata server.
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.bucket)
                .with_client_options(options)
                .with_retry(retry(url))
                .with_skip_signature(url.anonymous)
                .with_http_connector(connector);
            if let Some(e) = &url.endpoint {
                b = b.with_base_url(e);
            }
            b.build().map(|s| Arc::new(s) as _)
        }
        Provider::Azure => {
            // AZURE_STORAGE_* variables (account, key, SAS, client secret), then workload or
            // managed identity.
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.bucket)
                .with_client_options(options)
                .with_retry(retry(url))
                .with_skip_signature(url.anonymous)
                .with_http_connector(connector);
            if let Some(a) = &url.account {
                b = b.with_account(a);
            }
            if let Some(e) = &url.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build().map(|s| Arc::new(s) as _)
        }
    };
    built.map_err(|e| {
        // Builder errors name missing settings, never secret values.
        Error::config(
            "remote_url",
            format!(
                "`{url}`: cannot configure the {} client: {e}; credentials come from {}",
                url.provider.scheme(),
                credential_hint(url.provider)
            ),
        )
    })
}
