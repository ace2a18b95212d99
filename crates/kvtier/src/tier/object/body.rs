//! An object's body as a record input: the blocks of bytes the HTTP client hands over, read
//! as one stream, so the record reader copies them straight into the pool buffer.

use std::future::Future;
use std::io;

use bytes::{Buf, Bytes};
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::transport::record::RecordInput;

/// The rest of an object's body.
pub(super) struct Body {
    blocks: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl Body {
    /// The body `blocks` of a GET.
    pub fn new(blocks: BoxStream<'static, object_store::Result<Bytes>>) -> Body {
        Body {
            blocks,
            current: Bytes::new(),
        }
    }

    /// The next non-empty block; an error when the body ended.
    async fn fill(&mut self) -> io::Result<()> {
        while self.current.is_empty() {
            match self.blocks.next().await {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "object body ended before its length",
                    ))
                }
            }
        }
        Ok(())
    }
}

impl RecordInput for Body {
    async fn read_exact_into(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let mut off = 0;
        while off < dst.len() {
            self.fill().await?;
            let n = self.current.len().min(dst.len() - off);
            dst[off..off + n].copy_from_slice(&self.current[..n]);
            self.current.advance(n);
            off += n;
        }
        Ok(())
    }

    async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            self.fill().await?;
            let k = self.current.len().min(n);
            self.current.advance(k);
            n -= k;
        }
        Ok(())
    }

    fn read_crlf(&mut self) -> impl Future<Output = io::Result<()>> + Send + '_ {
        std::future::ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "an object body has no terminator",
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(blocks: &[&'static [u8]]) -> Body {
        let v: Vec<object_store::Result<Bytes>> =
            blocks.iter().map(|b| Ok(Bytes::from_static(b))).collect();
        Body::new(futures::stream::iter(v).boxed())
    }

    #[test]
    fn reads_across_blocks_and_reports_a_short_body() {
        futures::executor::block_on(async {
            let mut b = body(&[b"ab", b"", b"cdef", b"g"]);
            let mut out = [0u8; 3];
            b.read_exact_into(&mut out).await.unwrap();
            assert_eq!(&out, b"abc");
            b.skip(2).await.unwrap();
            let mut out = [0u8; 2];
            b.read_exact_into(&mut out).await.unwrap();
            assert_eq!(&out, b"fg");
            let e = b.read_exact_into(&mut out).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            assert!(b.read_crlf().await.is_err());
        });
    }
}
