//! Frame I/O of a server connection: replies, and requests decoded from frame bodies (the
//! frames themselves are read by [`kvtier::transport::wire::frame`]).

use kvtier::transport::wire::{self as proto, ErrorCode, Request, Response};
use tokio::io::{AsyncWrite, AsyncWriteExt};

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
