//! `rediss://` against a real TLS-only `redis-server`: certificates are made at test time
//! (rcgen), then store/hit over TLS, a wrong CA, a plaintext server on a TLS URL, unreadable
//! files, and mutual TLS (`--tls-auth-clients yes`). Skipped (with a message) when
//! redis-server lacks TLS support.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier::keys::{ChunkKey, ModelIdentity};
use kvtier::layout::{Dtype, KvLayout};
use kvtier::manager::TierSpec;
use kvtier::tier::redis::tls::TlsSettings;
use kvtier::tier::{PutOutcome, RedisTier, Tier};
use kvtier::{Engine, EngineConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use redis_server::RedisServer;

/// A CA and PEM files signed by it, in a temp directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes `<stem>.pem` and `<stem>.key` for a leaf certificate with `names` as SANs
    /// (IP addresses become IP SANs).
    fn leaf(&self, stem: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, stem);
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        std::fs::write(self.path(&format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{stem}.key")), key.serialize_pem()).unwrap();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A TLS-only server with a certificate for `localhost` and 127.0.0.1 from `pki`.
fn tls_server(pki: &Pki, auth_clients: bool, extra: &[&str]) -> Option<RedisServer> {
    pki.leaf(
        "server",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let mut args = vec![
        "--tls-cert-file",
        s(&cert),
        "--tls-key-file",
        s(&key),
        "--tls-ca-cert-file",
        s(&ca),
        "--tls-auth-clients",
        if auth_clients { "yes" } else { "no" },
    ];
    args.extend_from_slice(extra);
    RedisServer::start_tls(&args)
}

fn identity() -> ModelIdentity {
    ModelIdentity::new("test/tls", KvLayout::simple(2, 4, 64, Dtype::F16))
}

fn config(f: impl FnOnce(&mut EngineConfig)) -> EngineConfig {
    let mut cfg = EngineConfig {
        chunk_size: 16,
        max_local_cpu_size: 16 << 20,
        local_cpu_huge_pages: false,
        read_deadline_ms: 1000,
        store_deadline_ms: 1000,
        ..EngineConfig::default()
    };
    f(&mut cfg);
    cfg
}

fn engine_over(tier: Arc<RedisTier>) -> Engine {
    Engine::with_lower_tiers(config(|_| {}), identity(), vec![TierSpec::new(tier)]).unwrap()
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..64u32).map(|i| seed * 1000 + i).collect()
}

fn kv(e: &Engine, tokens: &[u32]) -> Vec<u8> {
    (0..e.payload_bytes(tokens.len()))
        .map(|i| (i * 7 + tokens[0] as usize) as u8)
        .collect()
}

/// Stores a prompt; returns how many chunks reached Redis.
fn store(e: &Engine, tokens: &[u32]) -> usize {
    let r = e.store(tokens, None, &kv(e, tokens)).unwrap();
    r.ticket
        .wait()
        .iter()
        .filter(|w| w.result == Ok(PutOutcome::Stored))
        .count()
}

/// The tier's error for one probe, and how long it took.
fn probe_error(tier: &RedisTier) -> (String, Duration) {
    let t0 = Instant::now();
    let r = futures::executor::block_on(tier.contains_prefix(&[ChunkKey([7; 32])]));
    let e = r.expect_err("the probe should fail").to_string();
    println!("tier error: {e}");
    (e, t0.elapsed())
}

#[test]
fn rediss_store_and_hit_with_password() {
    let pki = Pki::new("kvtier test CA");
    let Some(srv) = tls_server(&pki, false, &["--requirepass", "tls-pw"]) else {
        return;
    };
    let tls = TlsSettings {
        ca_file: Some(pki.path("ca.pem")),
        ..TlsSettings::default()
    };
    let url = format!("rediss://:tls-pw@127.0.0.1:{}?prefix=t:", srv.port);
    // Written through the engine's config path (remote_url + remote_tls_ca_file) ...
    let writer = Engine::new(
        config(|c| {
            c.remote_url = vec![url.clone()];
            c.remote_tls_ca_file = tls.ca_file.clone();
        }),
        identity(),
    )
    .unwrap();
    let tokens = prompt(1);
    assert_eq!(store(&writer, &tokens), 4);
    // ... and read by a fresh engine over its own tier (valkeys:// is the same scheme).
    let tier = Arc::new(
        RedisTier::from_url_with_tls(
            &format!("valkeys://:tls-pw@127.0.0.1:{}?prefix=t:", srv.port),
            0,
            &tls,
        )
        .unwrap(),
    );
    let reader = engine_over(tier.clone());
    let mut out = vec![0u8; reader.payload_bytes(tokens.len())];
    assert_eq!(
        reader.retrieve(&tokens, None, &mut out).unwrap().hit_tokens,
        64
    );
    assert_eq!(out, kv(&reader, &tokens));
    let st = tier.stats();
    assert_eq!((st.hits, st.checksum_failures), (4, 0));
    assert!(st.connects >= 1);
    // The secret stays out of the tier's Debug and the config dump.
    assert!(!format!("{tier:?}").contains("tls-pw"));
    assert!(!format!("{:?}", writer.config()).contains("tls-pw"));
}

#[test]
fn wrong_ca_plaintext_port_and_bad_files_fail_clearly_and_fast() {
    let pki = Pki::new("kvtier test CA");
    let Some(srv) = tls_server(&pki, false, &[]) else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{}?connect_timeout_ms=4000", srv.port);

    // A CA that did not sign the server's certificate: a TLS error naming the fix.
    let other = Pki::new("some other CA");
    let wrong = TlsSettings {
        ca_file: Some(other.path("ca.pem")),
        ..TlsSettings::default()
    };
    let tier = Arc::new(RedisTier::from_url_with_tls(&url, 0, &wrong).unwrap());
    let (e, took) = probe_error(&tier);
    assert!(e.contains("TLS") && e.contains("remote_tls_ca_file"), "{e}");
    assert!(e.contains(&format!("127.0.0.1:{}", srv.port)), "{e}");
    // Bounded, not fast: the point is that nothing hangs, also on a loaded 2-core CI box.
    assert!(took < Duration::from_secs(6), "{took:?}");
    // Through an engine: a miss and a skipped store within the deadlines, no hang.
    let e = engine_over(tier.clone());
    let tokens = prompt(2);
    let t0 = Instant::now();
    assert_eq!(store(&e, &tokens), 0);
    let fresh = engine_over(tier);
    assert_eq!(fresh.lookup(&tokens, None).unwrap().hit_tokens, 0);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

    // The insecure switch accepts the unverified certificate (testing only).
    let insecure = TlsSettings {
        insecure_skip_verify: true,
        ..TlsSettings::default()
    };
    let tier = Arc::new(RedisTier::from_url_with_tls(&url, 0, &insecure).unwrap());
    assert_eq!(store(&engine_over(tier.clone()), &tokens), 4);
    assert_eq!(tier.stats().puts, 4);

    // rediss:// to a plaintext server: a TLS error (or a TLS handshake timeout), quickly.
    let Some(plain) = RedisServer::start(&[]) else {
        return;
    };
    let good = TlsSettings {
        ca_file: Some(pki.path("ca.pem")),
        ..TlsSettings::default()
    };
    let tier = RedisTier::from_url_with_tls(
        &format!("rediss://127.0.0.1:{}?connect_timeout_ms=500", plain.port),
        0,
        &good,
    )
    .unwrap();
    let (e, took) = probe_error(&tier);
    assert!(e.contains("TLS"), "{e}");
    // Bounded, not fast: the point is that nothing hangs, also on a loaded 2-core CI box.
    assert!(took < Duration::from_secs(6), "{took:?}");

    // Unreadable files stop the engine at startup, naming the key and the path.
    let missing = pki.path("nope.pem");
    let err = match Engine::new(
        config(|c| {
            c.remote_url = vec![url.clone()];
            c.remote_tls_ca_file = Some(missing.clone());
        }),
        identity(),
    ) {
        Ok(_) => panic!("an unreadable CA file must be an error"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("remote_tls_ca_file") && err.contains(s(&missing)),
        "{err}"
    );
    // Plaintext URLs ignore the TLS settings.
    assert!(Engine::new(
        config(|c| {
            c.remote_url = vec![plain.url("")];
            c.remote_tls_ca_file = Some(missing.clone());
        }),
        identity(),
    )
    .is_ok());
}

#[test]
fn mutual_tls_needs_a_client_certificate() {
    let pki = Pki::new("kvtier test CA");
    let Some(srv) = tls_server(&pki, true, &[]) else {
        return;
    };
    pki.leaf(
        "client",
        &["kvtier-client"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    // `localhost`: the server name is a DNS name here (the certificate lists both).
    let url = format!(
        "rediss://localhost:{}?prefix=m:&connect_timeout_ms=4000",
        srv.port
    );
    let ca_only = TlsSettings {
        ca_file: Some(pki.path("ca.pem")),
        ..TlsSettings::default()
    };
    let tier = RedisTier::from_url_with_tls(&url, 0, &ca_only).unwrap();
    let (e, took) = probe_error(&tier);
    assert!(
        e.contains("TLS") && e.contains("remote_tls_cert_file"),
        "{e}"
    );
    // Bounded, not fast: the point is that nothing hangs, also on a loaded 2-core CI box.
    assert!(took < Duration::from_secs(6), "{took:?}");

    let mutual = TlsSettings {
        cert_file: Some(pki.path("client.pem")),
        key_file: Some(pki.path("client.key")),
        ..ca_only.clone()
    };
    let tier = Arc::new(RedisTier::from_url_with_tls(&url, 0, &mutual).unwrap());
    let writer = engine_over(tier.clone());
    let tokens = prompt(3);
    assert_eq!(store(&writer, &tokens), 4);
    // Through the config keys, as a deployment would set them.
    let reader = Engine::new(
        config(|c| {
            c.remote_url = vec![url.clone()];
            c.remote_tls_ca_file = mutual.ca_file.clone();
            c.remote_tls_cert_file = mutual.cert_file.clone();
            c.remote_tls_key_file = mutual.key_file.clone();
        }),
        identity(),
    )
    .unwrap();
    assert_eq!(reader.lookup(&tokens, None).unwrap().hit_tokens, 64);

    // A key that does not belong to the certificate is a startup error naming the key file.
    pki.leaf("other", &["x"], ExtendedKeyUsagePurpose::ClientAuth);
    let mismatched = TlsSettings {
        key_file: Some(pki.path("other.key")),
        ..mutual
    };
    let err = RedisTier::from_url_with_tls(&url, 0, &mismatched)
        .unwrap_err()
        .to_string();
    assert!(err.contains("remote_tls_key_file"), "{err}");
}
