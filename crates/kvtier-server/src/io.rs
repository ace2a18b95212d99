//! Frame I/O of a server connection: frames read under the server's limits, replies, and
//! requests decoded from frame bodies (frame heads are parsed by
//! [`kvtier::transport::wire::frame`]).

use std::io;
use std::time::Duration;

use kvtier::transport::wire::frame::{self, ReadError};
use kvtier::transport::wire::{self as proto, ErrorCode, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::limits::{ConnShare, FrameHold, Gates};

/// Reads the next frame's length prefix, checked against `max`; `None` when the stream
/// ends before a frame starts.
pub(crate) async fn read_len<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> Result<Option<usize>, ReadError> {
    let mut prefix = [0u8; 4];
    match rd.read_exact(&mut prefix).await {
        Ok(_) => Ok(Some(frame::body_len(prefix, max)?)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(ReadError::Io(e)),
    }
}

/// Reads a frame body of `len` bytes (its length already read) within `timeout`. The
/// buffer's pages fill as bytes arrive; callers bound `len` (small frames, or a
/// reservation from [`Gates::reserve`]) before calling.
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::with_capacity(len);
    let mut limited = (&mut *rd).take(len as u64);
    match tokio::time::timeout(timeout, limited.read_to_end(&mut body)).await {
        Ok(Ok(n)) if n == len => Ok(body),
        Ok(Ok(_)) => Err(ReadError::Truncated(io::ErrorKind::UnexpectedEof.into())),
        Ok(Err(e)) => Err(ReadError::Truncated(e)),
        Err(_) => Err(ReadError::Truncated(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the frame body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        ))),
    }
}

/// Reads one whole frame body under the server's limits: the length, a reservation for a
/// large body ([`Gates::reserve`], held until the request is handled), then the body within
/// the frame timeout. `None` when the stream ends between frames; `started` is called once
/// the length has arrived (the connection is no longer idle).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    gates: &Gates,
    share: &ConnShare,
    max: usize,
    started: impl FnOnce(),
) -> Result<Option<(Vec<u8>, FrameHold)>, ReadError> {
    let Some(len) = read_len(rd, max).await? else {
        return Ok(None);
    };
    started();
    let hold = gates.reserve(len, share).await;
    let body = read_body(rd, len, gates.limits().frame_timeout).await?;
    Ok(Some((body, hold)))
}

/// Writes one reply frame: its head, then `blob` as it is (no copy into the frame).
pub(crate) async fn write_msg<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Response,
    blob: &[u8],
) -> std::io::Result<()> {
    let head = proto::encode_head(msg, blob.len())?;
    if blob.is_empty() {
        w.write_all(&head).await
    } else {
        w.write_all(&head).await?;
        w.write_all(blob).await
    }
}

/// Decodes a request frame and its blob; a malformed one is answered with a protocol error
/// (the connection stays usable) and gives `None`.
pub(crate) async fn decode_request<'a, W: AsyncWrite + Unpin>(
    body: &'a [u8],
    wr: &mut W,
) -> std::io::Result<Option<(Request, &'a [u8])>> {
    match proto::decode::<Request>(body) {
        Ok((req, blob)) => Ok(Some((req, &body[blob]))),
        Err(e) => {
            write_msg(wr, &err(ErrorCode::Protocol, e.to_string()), &[]).await?;
            Ok(None)
        }
    }
}

/// An error reply.
pub(crate) fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}
