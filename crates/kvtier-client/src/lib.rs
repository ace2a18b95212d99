//! Client of a `kvtier serve` cache server.
//!
//! [`KvClient`] implements [`kvtier::KvCache`], the trait of the embedded
//! [`kvtier::Engine`], so callers switch between embedded and server mode by configuration.
//!
//! On a Unix socket the client maps the server's L1 pool (the server passes its descriptor)
//! and copies KV bytes in and out of it directly: a store allocates slots, the client
//! writes them in place and commits; a retrieve holds the chunks under a lease, the client
//! copies them out and releases. Over TCP the bytes travel inside frames. Lookups hash
//! tokens into chunk keys locally and send only the keys.
//!
//! The windowed operations ([`KvCache::lookup_from`], [`KvCache::store_from`],
//! [`KvCache::retrieve_from`] with `first_chunk > 0`) need a server of protocol version
//! [`proto::WINDOW_PROTOCOL_VERSION`] or later; against an older one they fail before
//! anything is sent, saying to upgrade the server. With `first_chunk` 0 they are the
//! whole-prompt requests every server speaks.
//!
//! ```no_run
//! use kvtier::KvCache;
//! use kvtier::layout::{Dtype, KvLayout};
//! use kvtier::keys::ModelIdentity;
//! let id = ModelIdentity::new("tiny", KvLayout::simple(2, 2, 8, Dtype::F16));
//! let client = kvtier_client::KvClient::connect("unix:/run/kvtier/kvtier.sock", id).unwrap();
//! let tokens: Vec<u32> = (0..512).collect();
//! println!("{} tokens cached", client.lookup(&tokens, None).unwrap().hit_tokens);
//! ```
#![warn(missing_docs)]

/// The wire protocol, defined in [`kvtier::transport::wire`] (the engine's `kvtier://` tier
/// speaks it too); re-exported here so `kvtier_client::proto` keeps working.
pub use kvtier::transport::wire as proto;
pub mod shm;
pub mod trust;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use kvtier::api::{KvCache, PendingLoad, PinToken, StoreSummary};
use kvtier::keys::{ChunkKey, KeySpace, ModelIdentity};
use kvtier::transport::wire::socket_path;
use kvtier::{Error, LookupResult, Result, RetrieveReport};
use parking_lot::Mutex;

use proto::{Request, Response, Slot};
use shm::ShmMap;

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix socket path.
    Unix(std::path::PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Addr {
    /// Parses `unix:/path`, a bare path (contains `/`), `tcp:host:port` or `host:port`.
    pub fn parse(s: &str) -> Result<Addr> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(p.into()));
        }
        if let Some(t) = s.strip_prefix("tcp:") {
            return Ok(Addr::Tcp(t.to_string()));
        }
        if s.contains('/') {
            return Ok(Addr::Unix(s.into()));
        }
        if s.rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            return Ok(Addr::Tcp(s.to_string()));
        }
        Err(Error::invalid(format!(
            "server address `{s}`: use unix:/path/to.sock, a socket path, tcp:host:port or host:port"
        )))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(t) => write!(f, "tcp:{t}"),
        }
    }
}

/// Client settings.
#[derive(Clone)]
pub struct ClientOptions {
    /// Limit on every call (socket read/write timeout), and on connecting.
    pub timeout: Duration,
    /// Name the server logs.
    pub client_name: String,
    /// Shared token; defaults to `KVTIER_AUTH_TOKEN`.
    pub auth_token: Option<String>,
    /// Map the server's pool on Unix sockets (else bytes travel in frames).
    pub shared_memory: bool,
    /// Expected chunk size; the handshake fails when the server's differs.
    pub chunk_size: Option<usize>,
    /// Largest blob put in one frame (TCP path), capped by the server's frame limit.
    pub max_piece: usize,
    /// `store` waits until the lower tiers (disk, remote) hold the new chunks.
    pub durable: bool,
    /// Uids a server on a Unix socket may run as besides root and this user's own;
    /// `KVTIER_SERVER_UID` (comma-separated) adds to them. Any other is refused.
    pub trusted_server_uids: Vec<u32>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("timeout", &self.timeout)
            .field("client_name", &self.client_name)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("shared_memory", &self.shared_memory)
            .field("chunk_size", &self.chunk_size)
            .field("max_piece", &self.max_piece)
            .field("durable", &self.durable)
            .field("trusted_server_uids", &self.trusted_server_uids)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(30),
            client_name: format!("pid-{}", std::process::id()),
            auth_token: std::env::var("KVTIER_AUTH_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            shared_memory: true,
            chunk_size: None,
            max_piece: 16 << 20,
            durable: false,
            trusted_server_uids: Vec::new(),
        }
    }
}

/// What the server said in its handshake.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// Server name.
    pub name: String,
    /// Protocol version.
    pub version: u16,
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Whether trailing partial chunks are stored.
    pub save_unfull_chunk: bool,
    /// KV bytes per token of this client's model.
    pub bytes_per_token: usize,
    /// Largest frame body the server accepts.
    pub max_frame: usize,
    /// Whether this client maps the server pool.
    pub shared_memory: bool,
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Whether the server has not closed this idle connection (it sends nothing unasked,
    /// so anything readable means it is gone).
    fn is_open(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        };
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local buffer on a descriptor this stream owns.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One connection. A failed I/O leaves it in an unknown state: it is then dropped.
struct Conn {
    stream: Stream,
    shm: Option<Arc<ShmMap>>,
    timeout: Duration,
    max_frame: usize,
    /// The protocol version this connection's server reported (per connection: a server
    /// restarted at another version is seen as soon as a new connection is opened).
    version: u16,
}

/// A failure on a connection: `Io` poisons the connection, `Reply` does not.
enum CallError {
    Io(io::Error),
    Reply(Error),
}

impl From<io::Error> for CallError {
    fn from(e: io::Error) -> Self {
        CallError::Io(e)
    }
}

impl From<proto::ProtoError> for CallError {
    fn from(e: proto::ProtoError) -> Self {
        CallError::Io(io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

type CallResult<T> = std::result::Result<T, CallError>;

impl Conn {
    fn send(&mut self, req: &Request, blobs: &[&[u8]]) -> CallResult<()> {
        let blob_len: usize = blobs.iter().map(|b| b.len()).sum();
        let mut head = proto::encode_head(req, blob_len)?;
        if blob_len <= 256 << 10 {
            for b in blobs {
                head.extend_from_slice(b);
            }
            self.stream.write_all(&head)?;
        } else {
            self.stream.write_all(&head)?;
            for b in blobs {
                self.stream.write_all(b)?;
            }
        }
        Ok(())
    }

    /// Reads a reply's header and meta; returns the message and the blob length still
    /// to be read.
    fn recv_head(&mut self) -> CallResult<(Response, usize)> {
        let max = self.max_frame.max(proto::DEFAULT_MAX_FRAME);
        Ok(proto::frame::read_head_blocking(&mut self.stream, max)?)
    }

    fn skip(&mut self, mut n: usize) -> CallResult<()> {
        let mut sink = [0u8; 8192];
        while n > 0 {
            let k = n.min(sink.len());
            self.stream.read_exact(&mut sink[..k])?;
            n -= k;
        }
        Ok(())
    }

    /// Sends a request and reads a reply without a blob; error replies become `Reply`.
    fn call(&mut self, req: &Request, blobs: &[&[u8]]) -> CallResult<Response> {
        self.send(req, blobs)?;
        let (msg, blob) = self.recv_head()?;
        self.skip(blob)?;
        match msg {
            Response::Error { code, message } => {
                Err(CallError::Reply(proto::error_from_reply(code, message)))
            }
            m => Ok(m),
        }
    }

    /// Like `call` with a longer read limit for calls that wait server-side.
    fn call_waiting(
        &mut self,
        req: &Request,
        blobs: &[&[u8]],
        wait: Duration,
    ) -> CallResult<Response> {
        self.stream.set_timeout(Some(self.timeout + wait))?;
        let r = self.call(req, blobs);
        self.stream.set_timeout(Some(self.timeout))?;
        r
    }
}

fn unexpected(what: &str, got: &Response) -> CallError {
    CallError::Io(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected reply to {what}: {got:?}"),
    ))
}

struct Shared {
    addr: Addr,
    opts: ClientOptions,
    identity_json: String,
    keys: KeySpace,
    info: ServerInfo,
    idle: Mutex<Vec<Conn>>,
    /// The pool mapping every connection shares while the server sends the same pool (each
    /// connection receives its descriptor): one set of page tables, each region populated
    /// once per process.
    shm: Mutex<Option<Arc<ShmMap>>>,
}

/// A connection (pool) to a `kvtier serve` server for one model identity.
#[derive(Clone)]
pub struct KvClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvClient")
            .field("addr", &self.shared.addr)
            .field("info", &self.shared.info)
            .finish()
    }
}

fn io_err(addr: &Addr, e: io::Error) -> Error {
    Error::io(format!("kvtier server at {addr}"), e)
}

/// Opens and handshakes a connection; `shm` is the client's current pool mapping, reused
/// when the server sends the same pool and replaced otherwise (a restarted server).
fn open_conn(
    addr: &Addr,
    opts: &ClientOptions,
    identity_json: &str,
    shm: &Mutex<Option<Arc<ShmMap>>>,
) -> std::result::Result<(Conn, Response), CallError> {
    let stream = match addr {
        Addr::Unix(p) => {
            let s = UnixStream::connect(p).map_err(|e| old_default_hint(p, e))?;
            // Before a single byte goes out: is this our server?
            trust::check_server(&s, &addr.to_string(), &opts.trusted_server_uids)
                .map_err(CallError::Reply)?;
            Stream::Unix(s)
        }
        Addr::Tcp(t) => {
            use std::net::ToSocketAddrs;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
            let mut got = None;
            for sa in t.to_socket_addrs()? {
                match TcpStream::connect_timeout(&sa, opts.timeout) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = got.ok_or(last)?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
    };
    stream.set_timeout(Some(opts.timeout))?;
    let want_shm = opts.shared_memory && matches!(addr, Addr::Unix(_));
    let mut conn = Conn {
        stream,
        shm: None,
        timeout: opts.timeout,
        max_frame: proto::DEFAULT_MAX_FRAME,
        version: 0,
    };
    // The version whose frames this client sends to any server; newer frames are sent only
    // where the HelloOk allows them (a version-2 server refuses a Hello above 2).
    let hello = Request::Hello {
        magic: proto::MAGIC,
        version: proto::HELLO_VERSION,
        client_name: opts.client_name.clone(),
        identity_json: identity_json.to_string(),
        chunk_size: opts.chunk_size.map(|c| c as u32),
        auth_token: opts.auth_token.clone(),
        want_shm,
    };
    let reply = conn.call(&hello, &[])?;
    let Response::HelloOk {
        version,
        shm_pool_bytes,
        max_frame,
        ..
    } = &reply
    else {
        return Err(unexpected("Hello", &reply));
    };
    conn.max_frame = usize::try_from(*max_frame).unwrap_or(usize::MAX);
    conn.version = *version;
    if let (Some(bytes), Stream::Unix(s)) = (shm_pool_bytes, &conn.stream) {
        let fd = shm::recv_fd(s.as_raw_fd())?;
        let mut current = shm.lock();
        let map = match current.as_ref() {
            Some(m) if m.maps(&fd, *bytes) => m.clone(),
            _ => {
                let m = Arc::new(ShmMap::map(fd, *bytes).map_err(CallError::Reply)?);
                m.map_committed_in_background();
                *current = Some(m.clone());
                m
            }
        };
        conn.shm = Some(map);
    }
    Ok((conn, reply))
}

/// The server's default socket was `/tmp/kvtier.sock` before it moved to a private
/// directory ([`socket_path`]): a client still pointed there is told where to look.
fn old_default_hint(path: &std::path::Path, e: io::Error) -> io::Error {
    if path != std::path::Path::new(socket_path::OLD_DEFAULT_SOCKET)
        || !matches!(
            e.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        )
    {
        return e;
    }
    io::Error::new(
        e.kind(),
        format!(
            "{e} (`kvtier serve` no longer listens on {old} by default: its socket is {root}/{name} \
             when run as root, $XDG_RUNTIME_DIR/kvtier/{name} otherwise (for this user: {mine}); \
             point the client there, or start the server with --socket {old})",
            old = socket_path::OLD_DEFAULT_SOCKET,
            root = socket_path::ROOT_SOCKET_DIR,
            name = socket_path::SOCKET_NAME,
            mine = socket_path::default_socket_path().display(),
        ),
    )
}

impl KvClient {
    /// Connects with default options (`KVTIER_AUTH_TOKEN` as the token, shared memory on
    /// Unix sockets, 30 s call timeout).
    pub fn connect(addr: &str, identity: ModelIdentity) -> Result<KvClient> {
        KvClient::connect_with(addr, identity, ClientOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(
        addr: &str,
        identity: ModelIdentity,
        mut opts: ClientOptions,
    ) -> Result<KvClient> {
        let addr = Addr::parse(addr)?;
        opts.trusted_server_uids = trust::trusted_uids(&opts.trusted_server_uids)?;
        identity.validate()?;
        let identity_json = serde_json::to_string(&identity)
            .map_err(|e| Error::invalid(format!("model identity is not JSON: {e}")))?;
        let shm = Mutex::new(None);
        let (conn, reply) = match open_conn(&addr, &opts, &identity_json, &shm) {
            Ok(x) => x,
            Err(CallError::Io(e)) => return Err(io_err(&addr, e)),
            Err(CallError::Reply(e)) => return Err(e),
        };
        let Response::HelloOk {
            version,
            server_name,
            chunk_size,
            save_unfull_chunk,
            bytes_per_token,
            max_frame,
            ..
        } = reply
        else {
            return Err(Error::Closed);
        };
        let keys = KeySpace::new(identity, chunk_size as usize, save_unfull_chunk)?;
        let info = ServerInfo {
            name: server_name,
            version,
            chunk_size: chunk_size as usize,
            save_unfull_chunk,
            bytes_per_token: bytes_per_token as usize,
            max_frame: usize::try_from(max_frame).unwrap_or(usize::MAX),
            shared_memory: conn.shm.is_some(),
        };
        tracing::debug!(%addr, server = %info.name, shm = info.shared_memory, "connected to kvtier server");
        Ok(KvClient {
            shared: Arc::new(Shared {
                addr,
                opts,
                identity_json,
                keys,
                info,
                idle: Mutex::new(vec![conn]),
                shm,
            }),
        })
    }

    /// The handshake's answer.
    pub fn server_info(&self) -> &ServerInfo {
        &self.shared.info
    }

    /// The key space the client hashes with (same as the server's).
    pub fn key_space(&self) -> &KeySpace {
        &self.shared.keys
    }

    fn take_conn(&self) -> Result<Conn> {
        loop {
            let Some(c) = self.shared.idle.lock().pop() else {
                break;
            };
            // The server closes connections idle past its --idle-timeout-sec: skip those.
            if c.stream.is_open() {
                return Ok(c);
            }
        }
        let s = &self.shared;
        match open_conn(&s.addr, &s.opts, &s.identity_json, &s.shm) {
            Ok((c, _)) => Ok(c),
            Err(CallError::Io(e)) => Err(io_err(&s.addr, e)),
            Err(CallError::Reply(e)) => Err(e),
        }
    }

    fn put_conn(&self, c: Conn) {
        let mut idle = self.shared.idle.lock();
        if idle.len() < 16 {
            idle.push(c);
        }
    }

    /// Runs `f` on a pooled connection; a connection that saw an I/O error is dropped (the
    /// server then releases everything it held).
    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> CallResult<T>) -> Result<T> {
        let mut c = self.take_conn()?;
        match f(&mut c) {
            Ok(v) => {
                self.put_conn(c);
                Ok(v)
            }
            Err(CallError::Reply(e)) => {
                self.put_conn(c);
                Err(e)
            }
            Err(CallError::Io(e)) => Err(io_err(&self.shared.addr, e)),
        }
    }

    fn bpt(&self) -> usize {
        self.shared.info.bytes_per_token
    }

    /// Tokens covered by the prompt's chunks.
    fn covered(&self, n_tokens: usize) -> usize {
        self.shared.keys.covered_tokens(n_tokens)
    }

    /// Stores and waits until the lower tiers (disk, remote) hold the new chunks. Returns
    /// whether every new chunk reached every lower tier: when true, the stored prefix
    /// survives a server restart (the chunks it reported present were stored earlier).
    pub fn store_durable(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        payload: &[u8],
    ) -> Result<(StoreSummary, bool)> {
        self.store_checked(tokens, cache_salt, 0, payload, true)
    }

    fn store_checked(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        payload: &[u8],
        durable: bool,
    ) -> Result<(StoreSummary, bool)> {
        let bpt = self.bpt();
        let keys = &self.shared.keys;
        keys.check_window_payload_len(tokens.len(), first_chunk, bpt, payload.len())?;
        let window = Window {
            first_chunk,
            start: keys.window_start(tokens.len(), first_chunk)?,
        };
        kvtier::keys::normalize_salt(cache_salt)?;
        let blob = proto::tokens_to_bytes(tokens);
        self.with_conn(|c| self.store_impl(c, &blob, cache_salt, window, payload, durable))
    }

    /// Refuses a windowed request (`first_chunk > 0`) on a connection whose server predates
    /// them, before anything is sent: such a server could not decode it.
    fn check_window(&self, c: &Conn, first_chunk: usize) -> CallResult<()> {
        if first_chunk == 0 || c.version >= proto::WINDOW_PROTOCOL_VERSION {
            return Ok(());
        }
        Err(CallError::Reply(Error::invalid(format!(
            "the kvtier server at {} speaks protocol version {}; windowed operations (first_chunk > 0) need version {} or later: upgrade the server (kvtier serve)",
            self.shared.addr,
            c.version,
            proto::WINDOW_PROTOCOL_VERSION
        ))))
    }

    /// Sends a ping and waits for the answer (round trip check).
    pub fn ping(&self) -> Result<()> {
        self.with_conn(|c| match c.call(&Request::Ping, &[])? {
            Response::Pong => Ok(()),
            r => Err(unexpected("Ping", &r)),
        })
    }

    /// Lookup over precomputed chunk keys (`n_tokens` is the prompt length).
    pub fn lookup_keys(&self, keys: &[ChunkKey], n_tokens: usize) -> Result<(usize, Vec<usize>)> {
        self.lookup_keys_from(keys, n_tokens, 0)
    }

    /// Windowed lookup over precomputed chunk keys: `keys` are those of chunks
    /// `first_chunk..` of an `n_tokens`-token prompt. Returns the hit chunks counted from
    /// `first_chunk` and their tiers.
    pub fn lookup_keys_from(
        &self,
        keys: &[ChunkKey],
        n_tokens: usize,
        first_chunk: usize,
    ) -> Result<(usize, Vec<usize>)> {
        let blob = proto::keys_to_bytes(keys);
        let blob = &blob[..];
        // Whole-prompt lookups keep the version-1 request: every server answers it.
        let req = if first_chunk == 0 {
            Request::Lookup {
                n_tokens: n_tokens as u64,
            }
        } else {
            Request::LookupFrom {
                n_tokens: n_tokens as u64,
                first_chunk: first_chunk as u64,
            }
        };
        self.with_conn(|c| {
            self.check_window(c, first_chunk)?;
            match c.call(&req, &[blob])? {
                Response::Lookup { hit_chunks, tiers } => Ok((
                    hit_chunks as usize,
                    tiers.into_iter().map(usize::from).collect(),
                )),
                r => Err(unexpected("Lookup", &r)),
            }
        })
    }

    fn store_impl(
        &self,
        c: &mut Conn,
        tokens_blob: &[u8],
        salt: Option<&str>,
        window: Window,
        payload: &[u8],
        durable: bool,
    ) -> CallResult<(StoreSummary, bool)> {
        let bpt = self.bpt();
        self.check_window(c, window.first_chunk)?;
        let salt = salt.map(str::to_string);
        let begin = match window.first_chunk {
            0 => Request::BeginStore { salt },
            f => Request::BeginStoreFrom {
                salt,
                first_chunk: f as u64,
            },
        };
        let reply = c.call(&begin, &[tokens_blob])?;
        let (lease, slots) = match reply {
            Response::Stored(s) => return Ok((s.into(), true)),
            Response::StoreLease { lease, slots, .. } => (lease, slots),
            r => return Err(unexpected("BeginStore", &r)),
        };
        let mut checksums = Vec::with_capacity(slots.len());
        let filled = (|| -> CallResult<()> {
            for (i, slot) in slots.iter().enumerate() {
                let src = slot_range(payload, slot, window.start, bpt).map_err(CallError::Reply)?;
                match c.shm.clone() {
                    Some(map) => {
                        checksums.push(Some(
                            map.write_with_checksum(slot.offset, src)
                                .map_err(CallError::Reply)?,
                        ));
                    }
                    None => {
                        let piece = self.piece(c);
                        let mut off = 0usize;
                        while off < src.len() || (src.is_empty() && off == 0) {
                            let end = (off + piece).min(src.len());
                            match c.call(
                                &Request::WriteSlot {
                                    lease,
                                    slot: i as u32,
                                    offset: off as u64,
                                },
                                &[&src[off..end]],
                            )? {
                                Response::Written => {}
                                r => return Err(unexpected("WriteSlot", &r)),
                            }
                            if end == src.len() {
                                break;
                            }
                            off = end;
                        }
                        checksums.push(None);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = filled {
            if let CallError::Reply(_) = e {
                let _ = c.send(&Request::AbortStore { lease }, &[]);
            }
            return Err(e);
        }
        let commit = Request::CommitStore {
            lease,
            checksums,
            durable,
        };
        let reply = if durable {
            c.call_waiting(&commit, &[], Duration::from_secs(600))?
        } else {
            c.call(&commit, &[])?
        };
        match reply {
            Response::Stored(s) => Ok((s.into(), !durable)),
            Response::StoredDurable { summary, durable } => Ok((summary.into(), durable)),
            r => Err(unexpected("CommitStore", &r)),
        }
    }

    fn piece(&self, c: &Conn) -> usize {
        self.shared
            .opts
            .max_piece
            .min(c.max_frame.saturating_sub(proto::MAX_META + 64))
            .max(4096)
    }

    fn retrieve_impl(
        &self,
        c: &mut Conn,
        tokens_blob: &[u8],
        salt: Option<&str>,
        window: Window,
        out: &mut [u8],
    ) -> CallResult<RetrieveReport> {
        let bpt = self.bpt();
        self.check_window(c, window.first_chunk)?;
        let salt = salt.map(str::to_string);
        let acquire = match window.first_chunk {
            0 => Request::Acquire { salt },
            f => Request::AcquireFrom {
                salt,
                first_chunk: f as u64,
            },
        };
        let reply = c.call(&acquire, &[tokens_blob])?;
        let Response::Acquired {
            lease,
            hit_tokens,
            chunks,
            tiers,
        } = reply
        else {
            return Err(unexpected("Acquire", &reply));
        };
        let copied = (|| -> CallResult<()> {
            for (i, slot) in chunks.iter().enumerate() {
                let dst = slot_range_mut(out, slot, window.start, bpt).map_err(CallError::Reply)?;
                match c.shm.clone() {
                    Some(map) => map.read(slot.offset, dst).map_err(CallError::Reply)?,
                    None => {
                        let piece = self.piece(c);
                        let mut off = 0usize;
                        while off < dst.len() {
                            let end = (off + piece).min(dst.len());
                            c.send(
                                &Request::ReadSlot {
                                    lease,
                                    slot: i as u32,
                                    offset: off as u64,
                                    len: (end - off) as u64,
                                },
                                &[],
                            )?;
                            let (msg, blob) = c.recv_head()?;
                            match msg {
                                Response::Data if blob == end - off => {
                                    c.stream.read_exact(&mut dst[off..end])?;
                                }
                                Response::Error { code, message } => {
                                    c.skip(blob)?;
                                    return Err(CallError::Reply(proto::error_from_reply(
                                        code, message,
                                    )));
                                }
                                r => return Err(unexpected("ReadSlot", &r)),
                            }
                            off = end;
                        }
                    }
                }
            }
            Ok(())
        })();
        if lease != 0 {
            // One-way: the server answers nothing, so this costs no round trip.
            c.send(&Request::Release { lease }, &[])?;
        }
        copied?;
        let hit_tokens = usize::try_from(hit_tokens).unwrap_or(usize::MAX);
        // The server's count is absolute: a windowed answer never ends before its window.
        if hit_tokens < window.start {
            return Err(CallError::Reply(Error::Corrupt(format!(
                "server reported a run ending at token {hit_tokens} for a window starting at {}",
                window.start
            ))));
        }
        Ok(RetrieveReport {
            hit_tokens,
            tiers: tiers.into_iter().map(usize::from).collect(),
        })
    }
}

/// Where a request's chunks start: the payload (or output) buffer of a windowed operation
/// begins at token `start`, the first of chunk `first_chunk` (both 0 for a whole prompt).
#[derive(Clone, Copy, Debug)]
struct Window {
    first_chunk: usize,
    start: usize,
}

/// The bytes of a server slot (absolute tokens `slot.start..slot.end`) in a buffer that
/// starts at token `base`; a slot outside the buffer is the server's fault.
fn slot_bounds(
    total: usize,
    slot: &Slot,
    base: usize,
    bpt: usize,
) -> Result<std::ops::Range<usize>> {
    let start = usize::try_from(slot.start).unwrap_or(usize::MAX);
    let end = usize::try_from(slot.end).unwrap_or(usize::MAX);
    let rel = |t: usize| t.checked_sub(base).and_then(|t| t.checked_mul(bpt));
    match (rel(start), rel(end)) {
        (Some(s), Some(e)) if s <= e && e <= total && (e - s) as u64 == slot.len => Ok(s..e),
        _ => Err(Error::Corrupt(format!(
            "server slot for tokens {}..{} ({} bytes) does not fit a {total}-byte buffer starting at token {base}",
            slot.start, slot.end, slot.len
        ))),
    }
}

fn slot_range<'a>(buf: &'a [u8], slot: &Slot, base: usize, bpt: usize) -> Result<&'a [u8]> {
    Ok(&buf[slot_bounds(buf.len(), slot, base, bpt)?])
}

fn slot_range_mut<'a>(
    buf: &'a mut [u8],
    slot: &Slot,
    base: usize,
    bpt: usize,
) -> Result<&'a mut [u8]> {
    let r = slot_bounds(buf.len(), slot, base, bpt)?;
    Ok(&mut buf[r])
}

/// A prefetch running on the server; holds the connection it was started on.
struct ClientLoad {
    client: KvClient,
    conn: Conn,
    id: u64,
}

impl PendingLoad for ClientLoad {
    fn wait(self: Box<Self>, timeout: Option<Duration>) -> Result<usize> {
        let ClientLoad {
            client,
            mut conn,
            id,
        } = *self;
        let wait = timeout.unwrap_or(Duration::from_secs(3600));
        let r = conn.call_waiting(
            &Request::WaitPrefetch {
                id,
                timeout_ms: timeout.map(|t| t.as_millis() as u64),
            },
            &[],
            wait,
        );
        match r {
            Ok(Response::Prefetched { tokens }) => {
                client.put_conn(conn);
                Ok(tokens as usize)
            }
            Ok(other) => Err(io_err(
                &client.shared.addr,
                io::Error::new(io::ErrorKind::InvalidData, format!("{other:?}")),
            )),
            Err(CallError::Reply(e)) => {
                client.put_conn(conn);
                Err(e)
            }
            Err(CallError::Io(e)) => Err(io_err(&client.shared.addr, e)),
        }
    }
}

impl KvCache for KvClient {
    fn chunk_size(&self) -> usize {
        self.shared.keys.chunk_size()
    }

    fn bytes_per_token(&self) -> usize {
        self.bpt()
    }

    fn lookup_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
    ) -> Result<LookupResult> {
        let (start, window) = self
            .shared
            .keys
            .window_spans(tokens, cache_salt, first_chunk)?;
        let keys: Vec<ChunkKey> = window.iter().map(|s| s.key).collect();
        let (hit_chunks, tiers) = self.lookup_keys_from(&keys, tokens.len(), first_chunk)?;
        if hit_chunks > window.len() {
            return Err(Error::Corrupt(format!(
                "server reported {hit_chunks} hit chunks of {}",
                window.len()
            )));
        }
        Ok(LookupResult {
            hit_tokens: if hit_chunks == 0 {
                start
            } else {
                window[hit_chunks - 1].end
            },
            hit_chunks,
            tiers,
        })
    }

    fn store_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        payload: &[u8],
    ) -> Result<StoreSummary> {
        let durable = self.shared.opts.durable;
        Ok(self
            .store_checked(tokens, cache_salt, first_chunk, payload, durable)?
            .0)
    }

    fn retrieve_from(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_chunk: usize,
        out: &mut [u8],
    ) -> Result<RetrieveReport> {
        let keys = &self.shared.keys;
        let start = keys.window_start(tokens.len(), first_chunk)?;
        let covered = self.covered(tokens.len());
        let need = (covered - start) * self.bpt();
        if out.len() < need {
            let from = if first_chunk == 0 {
                String::new()
            } else {
                format!(" from chunk {first_chunk} (token {start}) on")
            };
            return Err(Error::invalid(format!(
                "output buffer is {} bytes; the {} chunked tokens{from} need {need}",
                out.len(),
                covered - start,
            )));
        }
        kvtier::keys::normalize_salt(cache_salt)?;
        let blob = proto::tokens_to_bytes(tokens);
        let window = Window { first_chunk, start };
        self.with_conn(|c| self.retrieve_impl(c, &blob, cache_salt, window, out))
    }

    fn prefetch(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<Box<dyn PendingLoad>> {
        let blob = proto::tokens_to_bytes(tokens);
        let mut conn = self.take_conn()?;
        let r = conn.call(
            &Request::Prefetch {
                salt: cache_salt.map(str::to_string),
            },
            &[&blob],
        );
        match r {
            Ok(Response::PrefetchStarted { id }) => Ok(Box::new(ClientLoad {
                client: self.clone(),
                conn,
                id,
            })),
            Ok(other) => Err(io_err(
                &self.shared.addr,
                io::Error::new(io::ErrorKind::InvalidData, format!("{other:?}")),
            )),
            Err(CallError::Reply(e)) => {
                self.put_conn(conn);
                Err(e)
            }
            Err(CallError::Io(e)) => Err(io_err(&self.shared.addr, e)),
        }
    }

    fn pin(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<Vec<PinToken>> {
        let blob = proto::tokens_to_bytes(tokens);
        self.with_conn(|c| {
            match c.call(
                &Request::Pin {
                    salt: cache_salt.map(str::to_string),
                    ttl_ms: ttl.map(|t| t.as_millis() as u64),
                },
                &[&blob],
            )? {
                Response::Pins { pins } => Ok(pins
                    .into_iter()
                    .map(|(k, id)| PinToken {
                        key: ChunkKey(k),
                        id,
                    })
                    .collect()),
                r => Err(unexpected("Pin", &r)),
            }
        })
    }

    fn unpin(&self, pins: &[PinToken]) -> Result<()> {
        let pins = pins.iter().map(|p| (p.key.0, p.id)).collect();
        self.with_conn(|c| match c.call(&Request::Unpin { pins }, &[])? {
            Response::Ok => Ok(()),
            r => Err(unexpected("Unpin", &r)),
        })
    }

    fn remove(&self, tokens: &[u32], cache_salt: Option<&str>) -> Result<u64> {
        let blob = proto::tokens_to_bytes(tokens);
        self.with_conn(|c| {
            match c.call(
                &Request::Remove {
                    salt: cache_salt.map(str::to_string),
                },
                &[&blob],
            )? {
                Response::Count(n) => Ok(n),
                r => Err(unexpected("Remove", &r)),
            }
        })
    }

    fn remove_salt(&self, salt: &str) -> Result<u64> {
        self.with_conn(|c| {
            match c.call(
                &Request::RemoveSalt {
                    salt: salt.to_string(),
                },
                &[],
            )? {
                Response::Count(n) => Ok(n),
                r => Err(unexpected("RemoveSalt", &r)),
            }
        })
    }

    fn clear(&self) -> Result<u64> {
        self.with_conn(|c| match c.call(&Request::Clear, &[])? {
            Response::Count(n) => Ok(n),
            r => Err(unexpected("Clear", &r)),
        })
    }

    fn flush(&self, timeout: Duration) -> Result<bool> {
        self.with_conn(|c| {
            match c.call_waiting(
                &Request::Flush {
                    timeout_ms: timeout.as_millis() as u64,
                },
                &[],
                timeout,
            )? {
                Response::Flushed(b) => Ok(b),
                r => Err(unexpected("Flush", &r)),
            }
        })
    }

    fn stats_json(&self) -> Result<serde_json::Value> {
        let text = self.with_conn(|c| match c.call(&Request::Stats, &[])? {
            Response::Stats(s) => Ok(s),
            r => Err(unexpected("Stats", &r)),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("stats reply: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addrs() {
        assert_eq!(
            Addr::parse("unix:/tmp/x.sock").unwrap(),
            Addr::Unix("/tmp/x.sock".into())
        );
        assert_eq!(Addr::parse("/tmp/x").unwrap(), Addr::Unix("/tmp/x".into()));
        assert_eq!(
            Addr::parse("tcp:127.0.0.1:9").unwrap(),
            Addr::Tcp("127.0.0.1:9".into())
        );
        assert_eq!(
            Addr::parse("localhost:80").unwrap(),
            Addr::Tcp("localhost:80".into())
        );
        assert!(Addr::parse("nonsense").is_err());
    }

    #[test]
    fn slot_bounds_checked() {
        let s = Slot {
            start: 0,
            end: 4,
            offset: 0,
            len: 8,
        };
        assert_eq!(slot_bounds(8, &s, 0, 2).unwrap(), 0..8);
        assert!(slot_bounds(7, &s, 0, 2).is_err());
        let bad = Slot { len: 9, ..s };
        assert!(slot_bounds(100, &bad, 0, 2).is_err());
        // A window's buffer starts at its first token: slots are placed relative to it, and
        // one before it is refused.
        let later = Slot {
            start: 16,
            end: 20,
            ..s
        };
        assert_eq!(slot_bounds(8, &later, 16, 2).unwrap(), 0..8);
        assert_eq!(slot_bounds(100, &later, 12, 2).unwrap(), 8..16);
        assert!(slot_bounds(100, &later, 17, 2).is_err());
        let huge = Slot {
            start: u64::MAX - 1,
            end: u64::MAX,
            offset: 0,
            len: 1,
        };
        assert!(slot_bounds(100, &huge, 0, 2).is_err());
    }

    #[test]
    fn the_old_default_socket_points_to_the_new_one() {
        let gone = || io::Error::from(io::ErrorKind::NotFound);
        let e = old_default_hint(std::path::Path::new("/tmp/kvtier.sock"), gone());
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("/run/kvtier/kvtier.sock"), "{e}");
        let e = old_default_hint(std::path::Path::new("/tmp/other.sock"), gone());
        assert!(!e.to_string().contains("/run/kvtier"), "{e}");
    }

    #[test]
    fn options_debug_redacts_token() {
        let o = ClientOptions {
            auth_token: Some("s3cret".into()),
            ..ClientOptions::default()
        };
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}
