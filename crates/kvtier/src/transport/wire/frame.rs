//! Frames: how one message and its blob travel, and the only code that parses a frame head.
//!
//! ```text
//! u32 LE  body length (everything after these 4 bytes)
//! u8      frame kind (FRAME_MSG)
//! u32 LE  meta length
//! meta    postcard-encoded message
//! blob    raw bytes, the rest of the body
//! ```
//!
//! Every length read off the wire is checked before anything is allocated for it: the body
//! against the receiver's limit, the meta against [`MAX_META`] and the body. Hostile input
//! gets a [`ProtoError`], never a panic. A body length that breaks its limit leaves the
//! stream at an unknown place (the connection must close); a bad kind or meta inside a body
//! of known length does not (the next frame starts after it).

use std::future::Future;
use std::io;
use std::ops::Range;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frame kind of a message frame (the only kind so far; others are refused).
pub const FRAME_MSG: u8 = 1;
/// Bytes before the meta: body length, kind, meta length.
pub const HEADER_LEN: usize = 9;
/// Bytes of the body length prefix.
const LEN_PREFIX: usize = 4;
/// Bytes of the body before the meta: kind, meta length.
const BODY_HEAD: usize = HEADER_LEN - LEN_PREFIX;
/// Default largest body accepted: 64 MiB of blob plus 1 MiB of meta.
pub const DEFAULT_MAX_FRAME: usize = (64 << 20) + (1 << 20);
/// Largest meta accepted, whatever the frame limit.
pub const MAX_META: usize = 1 << 20;

/// Errors of frame encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The body is larger than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The frame is structurally wrong.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame kind is not known.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The meta is not a message of the expected type.
    #[error("malformed frame: undecodable message: {0}")]
    Undecodable(#[source] postcard::Error),
    /// The message cannot be encoded.
    #[error("message cannot be encoded: {0}")]
    Unencodable(#[source] postcard::Error),
}

impl From<ProtoError> for io::Error {
    /// A frame that cannot be read is bad data on the connection.
    fn from(e: ProtoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// What the first [`HEADER_LEN`] bytes of a frame announce, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHead {
    body_len: usize,
    meta_len: usize,
}

impl FrameHead {
    /// Parses and checks a frame head against the receiver's body limit `max_body`.
    pub fn parse(head: &[u8; HEADER_LEN], max_body: usize) -> Result<FrameHead, ProtoError> {
        let [l0, l1, l2, l3, rest @ ..] = *head;
        let body_len = body_len([l0, l1, l2, l3], max_body)?;
        let meta_len = meta_len(rest, body_len)?;
        Ok(FrameHead { body_len, meta_len })
    }

    /// Meta bytes that follow the head (at most [`MAX_META`]).
    pub fn meta_len(&self) -> usize {
        self.meta_len
    }

    /// Blob bytes that follow the meta.
    pub fn blob_len(&self) -> usize {
        self.body_len - BODY_HEAD - self.meta_len
    }
}

/// Reads the body length from the first 4 bytes and checks it against `max`. An error here
/// means the frame boundaries are lost.
pub fn body_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(ProtoError::TooLarge { len, max });
    }
    if len < BODY_HEAD {
        return Err(ProtoError::Malformed(format!(
            "body of {len} bytes is shorter than its {BODY_HEAD}-byte header"
        )));
    }
    Ok(len)
}

/// Checks the kind and reads the meta length from the first 5 bytes of a body of
/// `body_len` bytes.
fn meta_len(head: [u8; BODY_HEAD], body_len: usize) -> Result<usize, ProtoError> {
    let [kind, m0, m1, m2, m3] = head;
    if kind != FRAME_MSG {
        return Err(ProtoError::UnknownKind(kind));
    }
    let meta_len = u32::from_le_bytes([m0, m1, m2, m3]) as usize;
    if meta_len > MAX_META || BODY_HEAD + meta_len > body_len {
        return Err(ProtoError::Malformed(format!(
            "meta of {meta_len} bytes does not fit a {body_len}-byte body"
        )));
    }
    Ok(meta_len)
}

/// Decodes a message from its meta bytes.
pub fn decode_meta<'de, T: Deserialize<'de>>(meta: &'de [u8]) -> Result<T, ProtoError> {
    postcard::from_bytes(meta).map_err(ProtoError::Undecodable)
}

/// The items of a blob of fixed-size items, e.g. tokens or chunk keys (`what` names them
/// in the error).
pub(crate) fn blob_items<'a, const N: usize>(
    blob: &'a [u8],
    what: &str,
) -> Result<impl Iterator<Item = [u8; N]> + 'a, ProtoError> {
    if blob.len() % N != 0 {
        return Err(ProtoError::Malformed(format!(
            "{what} blob of {} bytes is not a multiple of {N}",
            blob.len()
        )));
    }
    // Every chunk is exactly N bytes long, so the conversion cannot fail.
    Ok(blob.chunks_exact(N).map(|c| c.try_into().unwrap_or([0; N])))
}

/// Encodes the head and meta of a frame, with `room` more bytes reserved.
fn encode_with_room<T: Serialize>(
    msg: &T,
    blob_len: usize,
    room: usize,
) -> Result<Vec<u8>, ProtoError> {
    let meta = postcard::to_stdvec(msg).map_err(ProtoError::Unencodable)?;
    let body = BODY_HEAD + meta.len() + blob_len;
    let body_u32 = u32::try_from(body).map_err(|_| ProtoError::TooLarge {
        len: body,
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + room);
    out.extend_from_slice(&body_u32.to_le_bytes());
    out.push(FRAME_MSG);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    Ok(out)
}

/// Encodes a frame: header, postcard meta, blob.
pub fn encode<T: Serialize>(msg: &T, blob: &[u8]) -> Result<Vec<u8>, ProtoError> {
    let mut out = encode_with_room(msg, blob.len(), blob.len())?;
    out.extend_from_slice(blob);
    Ok(out)
}

/// Encodes only the header and meta of a frame whose blob of `blob_len` bytes is written
/// separately (avoids copying large payloads).
pub fn encode_head<T: Serialize>(msg: &T, blob_len: usize) -> Result<Vec<u8>, ProtoError> {
    encode_with_room(msg, blob_len, 0)
}

/// Splits a body (everything after the length) into the decoded message and the blob
/// range inside `body`.
pub fn decode<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<(T, Range<usize>), ProtoError> {
    let Some((head, _)) = body.split_first_chunk::<BODY_HEAD>() else {
        return Err(ProtoError::Malformed(format!(
            "body of {} bytes is shorter than its {BODY_HEAD}-byte header",
            body.len()
        )));
    };
    let meta_end = BODY_HEAD + meta_len(*head, body.len())?;
    let msg = decode_meta(&body[BODY_HEAD..meta_end])?;
    Ok((msg, meta_end..body.len()))
}

/// A connection the async frame readers can pull exact byte counts from: any tokio reader,
/// or a buffered connection that keeps its own read buffer.
pub trait ReadExact {
    /// Fills `dst` completely, or fails (`UnexpectedEof` when the stream ends first).
    fn read_exact_into(&mut self, dst: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;
}

impl<R: AsyncRead + Unpin + Send> ReadExact for R {
    async fn read_exact_into(&mut self, dst: &mut [u8]) -> io::Result<()> {
        self.read_exact(dst).await.map(drop)
    }
}

impl ReadExact for crate::transport::resp::Conn {
    async fn read_exact_into(&mut self, dst: &mut [u8]) -> io::Result<()> {
        crate::transport::resp::Conn::read_exact_into(self, dst).await
    }
}

/// Reads a frame's head and message; returns the message and the blob length the caller
/// still has to read (or skip). Frame errors come back as `InvalidData` I/O errors: the
/// connection cannot be trusted after one.
pub async fn read_head<T: DeserializeOwned, R: ReadExact>(
    r: &mut R,
    max_body: usize,
) -> io::Result<(T, usize)> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact_into(&mut head).await?;
    let h = FrameHead::parse(&head, max_body)?;
    let mut meta = vec![0u8; h.meta_len()];
    r.read_exact_into(&mut meta).await?;
    Ok((decode_meta(&meta)?, h.blob_len()))
}

/// Blocking [`read_head`], for the synchronous client.
pub fn read_head_blocking<T: DeserializeOwned, R: io::Read>(
    r: &mut R,
    max_body: usize,
) -> io::Result<(T, usize)> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)?;
    let h = FrameHead::parse(&head, max_body)?;
    let mut meta = vec![0u8; h.meta_len()];
    r.read_exact(&mut meta)?;
    Ok((decode_meta(&meta)?, h.blob_len()))
}

/// Why a whole frame could not be read ([`read_body`]); after any of these the frame
/// boundaries are lost and the connection must close.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading the length prefix failed.
    #[error("read error: {0}")]
    Io(#[source] io::Error),
    /// The length prefix is out of bounds.
    #[error(transparent)]
    Frame(#[from] ProtoError),
    /// The stream ended (or failed) inside the body.
    #[error("truncated frame: {0}")]
    Truncated(#[source] io::Error),
}

/// Reads one whole frame body (kind, meta and blob; the message is decoded later by
/// [`decode`], so a bad kind or meta can be answered without closing). `Ok(None)` when the
/// stream ends before a frame starts. The body length is checked against `max_body` before
/// the body buffer is allocated.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    max_body: usize,
) -> Result<Option<Vec<u8>>, ReadError> {
    let mut prefix = [0u8; LEN_PREFIX];
    match r.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    }
    let n = body_len(prefix, max_body)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)
        .await
        .map_err(ReadError::Truncated)?;
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A,
        B { n: u64, s: String },
    }

    #[test]
    fn roundtrip() {
        let m = Msg::B {
            n: 7,
            s: "x".into(),
        };
        let f = encode(&m, b"abc").unwrap();
        let len = body_len(f[..4].try_into().unwrap(), DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(len, f.len() - 4);
        let (d, blob): (Msg, _) = decode(&f[4..]).unwrap();
        assert_eq!(d, m);
        assert_eq!(&f[4..][blob], b"abc");
        let h = encode_head(&Msg::A, 3).unwrap();
        assert_eq!(&h[..], &encode(&Msg::A, b"xyz").unwrap()[..h.len()]);
        let head: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        let fh = FrameHead::parse(&head, DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(fh.blob_len(), 3);
        assert_eq!(HEADER_LEN + fh.meta_len() + fh.blob_len(), f.len());
        let (d, blob): (Msg, usize) = read_head_blocking(&mut &f[..], 1 << 10).unwrap();
        assert_eq!((d, blob), (m, 3));
    }

    #[test]
    fn limits() {
        assert!(matches!(
            body_len(100u32.to_le_bytes(), 10),
            Err(ProtoError::TooLarge { .. })
        ));
        assert!(body_len(2u32.to_le_bytes(), 10).is_err());
        assert!(matches!(
            decode::<Msg>(&[9, 0, 0, 0, 0]),
            Err(ProtoError::UnknownKind(9))
        ));
        assert!(decode::<Msg>(&[1, 255, 255, 255, 255]).is_err());
        assert!(decode::<Msg>(&[1, 0, 0]).is_err());
        assert!(matches!(
            decode::<Msg>(&[1, 1, 0, 0, 0, 200]),
            Err(ProtoError::Undecodable(_))
        ));
        // A meta longer than MAX_META is refused from the head, whatever the body limit.
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&(u32::MAX).to_le_bytes());
        head[4] = FRAME_MSG;
        head[5..].copy_from_slice(&((MAX_META + 1) as u32).to_le_bytes());
        assert!(FrameHead::parse(&head, usize::MAX).is_err());
        head[5..].copy_from_slice(&(MAX_META as u32).to_le_bytes());
        assert!(FrameHead::parse(&head, usize::MAX).is_ok());
        assert!(matches!(
            FrameHead::parse(&head, 1000),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn frame_errors_are_invalid_data() {
        let mut bad: &[u8] = &[5, 0, 0, 0, 2, 0, 0, 0, 0];
        let e = read_head_blocking::<Msg, _>(&mut bad, 1 << 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("unknown frame kind 2"), "{e}");
        let mut short: &[u8] = &[5, 0, 0];
        let e = read_head_blocking::<Msg, _>(&mut short, 1 << 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    fn run<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn read_body_bounds() {
        let f = encode(&Msg::A, b"blob").unwrap();
        let body = run(read_body(&mut &f[..], 1 << 10)).unwrap().unwrap();
        assert_eq!(body, &f[4..]);
        assert!(run(read_body(&mut &[][..], 1 << 10)).unwrap().is_none());
        assert!(matches!(
            run(read_body(&mut &f[..], 4)),
            Err(ReadError::Frame(ProtoError::TooLarge { .. }))
        ));
        assert!(matches!(
            run(read_body(&mut &f[..f.len() - 1], 1 << 10)),
            Err(ReadError::Truncated(_))
        ));
        // The async head reader agrees with the blocking one.
        let (m, blob): (Msg, usize) = run(read_head(&mut &f[..], 1 << 10)).unwrap();
        assert_eq!((m, blob), (Msg::A, 4));
    }

    /// Counts the bytes asked for, to show nothing is allocated for an unchecked length.
    struct Greedy<'a>(&'a [u8], usize);

    impl io::Read for Greedy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = self.1.max(buf.len());
            io::Read::read(&mut self.0, buf)
        }
    }

    proptest! {
        /// Any body, mostly with a message kind and a meta length near the body's: an
        /// error or a message, never a panic (e.g. slicing past the body).
        #[test]
        fn decode_never_panics(
            kind in prop_oneof![Just(FRAME_MSG), any::<u8>()],
            meta_len in prop_oneof![0u32..300, any::<u32>()],
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut body = vec![kind];
            body.extend_from_slice(&meta_len.to_le_bytes());
            body.extend_from_slice(&rest);
            for cut in [0, 1, 4, 5, body.len()] {
                let b = &body[..cut.min(body.len())];
                let _ = decode::<Msg>(b);
                let _ = decode::<(u64, Vec<u8>)>(b);
            }
        }

        /// Any bytes: the readers return an error or a message, never panic, and never ask
        /// for a buffer larger than the limit allows.
        #[test]
        fn readers_never_over_allocate(
            len in 0u32..600,
            kind in 0u8..3,
            meta_len in prop_oneof![0u32..600, any::<u32>()],
            tail in proptest::collection::vec(any::<u8>(), 0..640),
            garbage in any::<bool>(),
            max in 0usize..1024,
        ) {
            // A plausible head (or raw garbage) followed by arbitrary bytes.
            let mut bytes = Vec::new();
            if !garbage {
                bytes.extend_from_slice(&len.to_le_bytes());
                bytes.push(kind);
                bytes.extend_from_slice(&meta_len.to_le_bytes());
            }
            bytes.extend_from_slice(&tail);
            let mut r = Greedy(&bytes, 0);
            if let Ok((_, blob)) = read_head_blocking::<Msg, _>(&mut r, max) {
                prop_assert!(HEADER_LEN - LEN_PREFIX + blob <= max);
            }
            prop_assert!(r.1 <= HEADER_LEN.max(max.min(MAX_META)));
            if let Ok(Some(body)) = run(read_body(&mut &bytes[..], max)) {
                prop_assert!(body.len() <= max);
            }
        }

        /// Valid frames with any message and blob round-trip through every reader, and every
        /// truncation of one is an error, not a short message.
        #[test]
        fn frames_roundtrip_and_truncations_fail(
            n in any::<u64>(),
            s in ".{0,40}",
            blob in proptest::collection::vec(any::<u8>(), 0..300),
            cut in 1usize..64,
        ) {
            let m = Msg::B { n, s };
            let f = encode(&m, &blob).unwrap();
            let (d, bl): (Msg, usize) = read_head_blocking(&mut &f[..], DEFAULT_MAX_FRAME).unwrap();
            prop_assert_eq!(&d, &m);
            prop_assert_eq!(bl, blob.len());
            let body = run(read_body(&mut &f[..], DEFAULT_MAX_FRAME)).unwrap().unwrap();
            let (d, range): (Msg, _) = decode(&body).unwrap();
            prop_assert_eq!(&d, &m);
            prop_assert_eq!(&body[range], &blob[..]);
            let cut = cut.min(f.len());
            let short = &f[..f.len() - cut];
            prop_assert!(!matches!(run(read_body(&mut &short[..], DEFAULT_MAX_FRAME)), Ok(Some(_))));
            if cut > blob.len() {
                prop_assert!(read_head_blocking::<Msg, _>(&mut &short[..], DEFAULT_MAX_FRAME).is_err());
            }
        }
    }
}
