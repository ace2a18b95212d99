//! Reading a chunk record (header + payload) off a byte input: shared by the Redis tier (a
//! `GET` reply's bulk string), the kvtier server tier (a `Record` frame's blob) and the
//! object-store tier (an object's body).

use std::future::Future;
use std::io;

use super::resp::Conn;
use crate::chunk::record::{decode_header, peek_header_len, MAX_HEADER_LEN};
use crate::chunk::Chunk;
use crate::keys::ChunkKey;
use crate::memory::BufferSource;

/// Where a record's bytes come from: a connection ([`Conn`]) or a stream of byte blocks (an
/// object's body).
pub(crate) trait RecordInput: Send {
    /// Fills `dst`; an error when the input ends first.
    fn read_exact_into<'a>(
        &'a mut self,
        dst: &'a mut [u8],
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// Consumes the next `n` bytes.
    fn skip(&mut self, n: usize) -> impl Future<Output = io::Result<()>> + Send + '_;

    /// Reads the `\r\n` of [`Terminator::Crlf`] (only RESP inputs have one).
    fn read_crlf(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_;
}

impl RecordInput for Conn {
    fn read_exact_into<'a>(
        &'a mut self,
        dst: &'a mut [u8],
    ) -> impl Future<Output = io::Result<()>> + Send + 'a {
        Conn::read_exact_into(self, dst)
    }

    fn skip(&mut self, n: usize) -> impl Future<Output = io::Result<()>> + Send + '_ {
        Conn::skip(self, n)
    }

    fn read_crlf(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        Conn::read_crlf(self)
    }
}

/// What reading one record produced; in every case the record was consumed, so the
/// input is usable for the next request.
pub enum RecordRead {
    /// A record for the key whose payload passed verification.
    Chunk(Chunk),
    /// The record is not valid for the key (reason).
    Corrupt(String),
    /// The L1 pool had no room for the payload.
    NoBuffer,
}

/// How a record ends on the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Terminator {
    /// Nothing follows the record (a framed blob).
    None,
    /// A `\r\n` follows (a RESP bulk string).
    Crlf,
}

/// Reads a record of `len` bytes that should hold `key`: the header is checked against the
/// key and length, the payload is read straight into a buffer from `bufs`, then verified.
/// I/O errors are returned as such (the input is then unusable).
pub(crate) async fn read_record(
    conn: &mut impl RecordInput,
    len: usize,
    key: ChunkKey,
    bufs: &dyn BufferSource,
    end: Terminator,
) -> io::Result<RecordRead> {
    let mut head = vec![0u8; len.min(12)];
    conn.read_exact_into(&mut head).await?;
    let hlen = match peek_header_len(&head) {
        Ok(h) if h <= len && h <= MAX_HEADER_LEN => h,
        Ok(h) => {
            return skip_rest(conn, len - head.len(), end, format!("header of {h} bytes")).await
        }
        Err(e) => return skip_rest(conn, len - head.len(), end, e.to_string()).await,
    };
    head.resize(hlen, 0);
    conn.read_exact_into(&mut head[12..]).await?;
    let payload_len = len - hlen;
    let info = match decode_header(&head) {
        Ok((info, _)) => info,
        Err(e) => return skip_rest(conn, payload_len, end, e.to_string()).await,
    };
    if info.key != key || info.len != payload_len as u64 {
        let why = format!(
            "record for key {} of {} payload bytes received for key {key} with {payload_len}",
            info.key, info.len
        );
        return skip_rest(conn, payload_len, end, why).await;
    }
    let Some(mut buf) = bufs.allocate(payload_len) else {
        skip(conn, payload_len, end).await?;
        return Ok(RecordRead::NoBuffer);
    };
    conn.read_exact_into(buf.as_mut_slice()).await?;
    read_end(conn, end).await?;
    if let Err(e) = info.verify(buf.as_slice()) {
        return Ok(RecordRead::Corrupt(e.to_string()));
    }
    Ok(RecordRead::Chunk(Chunk {
        info,
        buf: buf.seal(),
    }))
}

/// Consumes the rest of an invalid record so the input stays usable, then reports `why`.
async fn skip_rest(
    conn: &mut impl RecordInput,
    left: usize,
    end: Terminator,
    why: String,
) -> io::Result<RecordRead> {
    skip(conn, left, end).await?;
    Ok(RecordRead::Corrupt(why))
}

/// Skips `n` bytes and the terminator.
async fn skip(conn: &mut impl RecordInput, n: usize, end: Terminator) -> io::Result<()> {
    conn.skip(n).await?;
    read_end(conn, end).await
}

async fn read_end(conn: &mut impl RecordInput, end: Terminator) -> io::Result<()> {
    match end {
        Terminator::None => Ok(()),
        Terminator::Crlf => conn.read_crlf().await,
    }
}
