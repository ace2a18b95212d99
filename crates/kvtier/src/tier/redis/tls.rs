//! TLS for `rediss://` tiers: the client configuration and error messages that say what to do.
//!
//! * Server verification: against the PEM CA bundle of `remote_tls_ca_file` when set, else
//!   the system's trust store (what `/etc/ssl/certs` holds on Debian, through
//!   `rustls-native-certs`). The system store is the default because managed Redis services
//!   use public CAs and a site's own CAs are usually installed there; a private CA that is not
//!   installed is given with `remote_tls_ca_file`.
//! * The server name checked is the URL's host (a DNS name or an IP address, which the
//!   certificate must then list as an IP SAN).
//! * Mutual TLS: `remote_tls_cert_file` + `remote_tls_key_file` (PEM).
//! * `remote_tls_insecure_skip_verify`: accepts any server certificate (the handshake's
//!   signatures are still checked). Off by default, logged as a warning when on; for test
//!   setups only.
//!
//! Files are read when the tier is built, so a missing or unreadable file stops the engine at
//! startup with the config key named, rather than showing up as connection failures later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// Config key of the CA bundle.
pub const KEY_CA_FILE: &str = "remote_tls_ca_file";
/// Config key of the client certificate chain.
pub const KEY_CERT_FILE: &str = "remote_tls_cert_file";
/// Config key of the client private key.
pub const KEY_KEY_FILE: &str = "remote_tls_key_file";
/// Config key of the skip-verification switch.
pub const KEY_INSECURE: &str = "remote_tls_insecure_skip_verify";

/// TLS settings for `rediss://` tiers. Holds paths only: no key material.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TlsSettings {
    /// PEM file of the CA certificate(s) that sign the servers' certificates (`None`: the
    /// system trust store).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate (testing only).
    pub insecure_skip_verify: bool,
}

fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, key: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::config(
            key,
            format!(
                "cannot read {what} from {}: {e}; give a readable PEM file",
                path.display()
            ),
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if certs.is_empty() {
        return Err(Error::config(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the {what} in PEM form",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn roots(settings: &TlsSettings) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    if let Some(path) = &settings.ca_file {
        let certs = read_certs(path, KEY_CA_FILE, "the CA certificates")?;
        let (_, bad) = store.add_parsable_certificates(certs);
        if store.is_empty() {
            return Err(Error::config(
                KEY_CA_FILE,
                format!(
                    "none of the {bad} certificates in {} is a usable CA certificate",
                    path.display()
                ),
            ));
        }
        return Ok(store);
    }
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::debug!(error = %e, "skipped part of the system trust store");
    }
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        return Err(Error::config(
            KEY_CA_FILE,
            "rediss:// needs CA certificates to verify the server, and the system trust store is empty; install ca-certificates or set remote_tls_ca_file to the PEM file of the CA that signed the server's certificate",
        ));
    }
    Ok(store)
}

/// Builds the client configuration for `settings`, reading every file it names.
pub fn client_config(settings: &TlsSettings) -> Result<Arc<ClientConfig>> {
    let provider = ring();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS setup: {e}")))?;
    let builder = if settings.insecure_skip_verify {
        tracing::warn!(
            "{KEY_INSECURE} is on: Redis servers' TLS certificates are NOT verified, so anyone on the network path can impersonate the server and read the cache; use it only for tests, and set {KEY_CA_FILE} instead"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
    } else {
        builder.with_root_certificates(roots(settings)?)
    };
    let config = match (&settings.cert_file, &settings.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, KEY_CERT_FILE, "the client certificate")?;
            // The key's text never reaches a message: only the path and the parser's verdict.
            let pk = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::config(
                    KEY_KEY_FILE,
                    format!(
                        "cannot read a PEM private key from {}: {e}; give the client certificate's key (PKCS#8, PKCS#1 or SEC1 PEM)",
                        key.display()
                    ),
                )
            })?;
            builder.with_client_auth_cert(chain, pk).map_err(|e| {
                Error::config(
                    KEY_KEY_FILE,
                    format!(
                        "the key in {} does not fit the certificate in {}: {e}",
                        key.display(),
                        cert.display()
                    ),
                )
            })?
        }
        (Some(_), None) => {
            return Err(Error::config(
                KEY_KEY_FILE,
                "remote_tls_cert_file is set but remote_tls_key_file is not; mutual TLS needs both",
            ))
        }
        (None, Some(_)) => {
            return Err(Error::config(
                KEY_CERT_FILE,
                "remote_tls_key_file is set but remote_tls_cert_file is not; mutual TLS needs both",
            ))
        }
    };
    Ok(Arc::new(config))
}

/// The name to check the certificate against: the host of `host:port`, without IPv6 brackets.
pub fn server_name(addr: &str) -> std::result::Result<ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("`{host}` is neither a DNS name nor an IP address usable for TLS"))
}

/// Explains a failure of a TLS connection (handshake or first exchange) with what to do; the
/// caller names the server.
pub fn describe(e: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E, InvalidMessage as M};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<E>());
    let hint = match inner {
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
            "the server's certificate is not signed by a trusted CA; set {KEY_CA_FILE} to the PEM file of the CA that signed it"
        ),
        Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            "the server's certificate does not name this host; use the host name (or IP) that the certificate lists".to_string()
        }
        Some(E::InvalidCertificate(C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. })) => {
            "the server's certificate is expired or not yet valid; renew it (or check the clock)".to_string()
        }
        Some(E::InvalidMessage(M::InvalidContentType | M::InvalidEmptyPayload | M::MessageTooLarge)) => {
            "the server did not answer with TLS: is this a plaintext port? Use redis:// for a server without TLS".to_string()
        }
        Some(E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::HandshakeFailure | A::UnknownCA)) => format!(
            "the server refused the handshake; if it requires client certificates (tls-auth-clients), set {KEY_CERT_FILE} and {KEY_KEY_FILE} to a certificate its CA trusts"
        ),
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof || e.kind() == std::io::ErrorKind::ConnectionReset => {
            "the server closed the connection during the TLS handshake: is this a TLS port, and does it accept this client?".to_string()
        }
        _ => "check that the port serves TLS and the certificate settings".to_string(),
    };
    format!("TLS error: {e}; {hint}")
}

/// Accepts any server certificate but still checks the handshake signatures, so the session
/// is at least bound to the certificate's key (`remote_tls_insecure_skip_verify`).
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_hosts() {
        assert!(matches!(
            server_name("127.0.0.1:6379"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]:6379"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("redis.example.com:6380"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("bad host:1").is_err());
    }

    #[test]
    fn unreadable_files_name_the_key() {
        let s = TlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsSettings::default()
        };
        let e = client_config(&s).unwrap_err().to_string();
        assert!(
            e.contains(KEY_CA_FILE) && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let s = TlsSettings {
            ca_file: Some(empty),
            ..TlsSettings::default()
        };
        let e = client_config(&s).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let s = TlsSettings {
            cert_file: Some("/x.pem".into()),
            insecure_skip_verify: true,
            ..TlsSettings::default()
        };
        let e = client_config(&s).unwrap_err().to_string();
        assert!(e.contains("needs both"), "{e}");
    }
}
