//! Length-prefixed frames over any `futures-io` stream.

use std::future::poll_fn;
use std::pin::Pin;

use futures_io::{AsyncRead, AsyncWrite};

use crate::{decode, encode_frame, FrameError, Message};

/// Read one frame's payload. The length is checked against `max` before anything is allocated.
/// A stream that ends cleanly before the first length byte gives [`FrameError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header).await?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < header.len() {
        return Err(FrameError::Truncated {
            expected: header.len(),
            got,
        });
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload).await?;
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(payload)
}

/// Read and decode one message.
pub async fn read_message<M: Message, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<M, FrameError> {
    let payload = read_frame(r, max).await?;
    decode(&payload)
}

/// A frame reader that may be cancelled between frames or in the middle of one: bytes read so
/// far stay in its buffer, so a `select!` that drops [`FrameReader::read_frame`] to handle
/// something else loses nothing. (The free functions above lose a partly read frame when
/// dropped; use them only where nothing races the read.)
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Where reads land before they join `buf` (on the heap: futures stay small).
    scratch: Vec<u8>,
    max: usize,
}

impl FrameReader {
    pub fn new(max: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            scratch: Vec::new(),
            max,
        }
    }

    /// Read one frame's payload (cancel-safe). The length is checked before the payload is
    /// buffered.
    pub async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Vec<u8>, FrameError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                if self.buf.len() >= 4 + len {
                    let payload = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return Ok(payload);
                }
            }
            // Never read past what the current frame can need plus a little: a peer cannot
            // make this buffer exceed one maximal frame.
            let want = if self.buf.len() >= 4 {
                let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                (4 + len - self.buf.len()).max(1)
            } else {
                4 - self.buf.len()
            };
            // Grow the scratch buffer to what this frame needs (most frames are small), up to
            // 16 KiB per read.
            let take = want.clamp(4, 16 * 1024);
            if self.scratch.len() < take {
                self.scratch.resize(take, 0);
            }
            let chunk = &mut self.scratch[..take];
            // Cancel-safe: a poll that returns data appends it before any other await.
            let n = poll_fn(|cx| Pin::new(&mut *r).poll_read(cx, chunk)).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Err(FrameError::Closed)
                } else {
                    let expected = if self.buf.len() >= 4 {
                        4 + u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                            as usize
                    } else {
                        4
                    };
                    Err(FrameError::Truncated {
                        expected,
                        got: self.buf.len(),
                    })
                };
            }
            self.buf.extend_from_slice(&self.scratch[..n]);
        }
    }

    /// Read and decode one message (cancel-safe).
    pub async fn read_message<M: Message, R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<M, FrameError> {
        let payload = self.read_frame(r).await?;
        decode(&payload)
    }
}

/// Write one raw frame (length prefix + payload).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    write_all(w, &len.to_le_bytes()).await?;
    write_all(w, payload).await?;
    Ok(())
}

/// Encode and write one message as a frame.
pub async fn write_message<M: Message, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    let frame = encode_frame(msg)?;
    write_all(w, &frame).await?;
    Ok(())
}

/// Read until `buf` is full or the stream ends; returns how many bytes were read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = poll_fn(|cx| Pin::new(&mut *r).poll_read(cx, &mut buf[filled..])).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its bytes a few at a time and pends in between, like a network
    /// stream whose packets arrive one by one.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        ready: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if !self.ready {
                self.ready = true;
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            self.ready = false;
            let n = buf.len().min(self.data.len() - self.pos).min(5);
            let pos = self.pos;
            buf[..n].copy_from_slice(&self.data[pos..pos + n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn frame_reader_loses_nothing_when_dropped_mid_frame() {
        use std::future::Future;
        let msgs: Vec<ControllerMessage> = (0..5)
            .map(|i| ControllerMessage::Bye {
                reason: format!("message number {i} with some length to it"),
            })
            .collect();
        let mut data = Vec::new();
        for m in &msgs {
            data.extend(encode_frame(m).unwrap());
        }
        let mut r = Trickle {
            data,
            pos: 0,
            ready: false,
        };
        let mut reader = FrameReader::new(1024);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut got = Vec::new();
        // Poll each read only a couple of times, then drop it (as a select! would) and start a
        // new one: every message must still come out whole and in order.
        let mut polls = 0;
        while got.len() < msgs.len() {
            let mut fut = std::pin::pin!(reader.read_message::<ControllerMessage, _>(&mut r));
            for _ in 0..3 {
                polls += 1;
                if let std::task::Poll::Ready(m) = fut.as_mut().poll(&mut cx) {
                    got.push(m.unwrap());
                    break;
                }
            }
            assert!(polls < 10_000, "no progress");
        }
        assert_eq!(got, msgs);
        let mut fut = std::pin::pin!(reader.read_frame(&mut r));
        let end = loop {
            if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                break v;
            }
        };
        assert!(matches!(end, Err(FrameError::Closed)));
        // Oversized lengths are refused before buffering.
        let mut big = Trickle {
            data: 5000u32.to_le_bytes().to_vec(),
            pos: 0,
            ready: true,
        };
        let mut reader = FrameReader::new(1024);
        let mut fut = std::pin::pin!(reader.read_frame(&mut big));
        let res = loop {
            if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                break v;
            }
        };
        assert!(matches!(res, Err(FrameError::TooLarge { len: 5000, .. })));
    }
    use crate::{AgentMessage, ControllerMessage, Hello, NodeFacts, PROTOCOL_VERSION};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The futures here never pend on in-memory readers, so a no-op waker suffices.
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("in-memory i/o pended"),
        }
    }

    struct Reader<'a>(&'a [u8]);
    impl AsyncRead for Reader<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.0.len()).min(3); // short reads on purpose
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            std::task::Poll::Ready(Ok(n))
        }
    }

    struct Writer(Vec<u8>);
    impl AsyncWrite for Writer {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(5);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            facts: NodeFacts {
                hostname: "box".into(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trip_through_short_reads_and_writes() {
        let mut w = Writer(Vec::new());
        block_on(write_message(&mut w, &hello())).unwrap();
        block_on(write_message(
            &mut w,
            &AgentMessage::Bye { reason: "x".into() },
        ))
        .unwrap();
        let mut r = Reader(&w.0);
        let h: Hello = block_on(read_message(&mut r, 1024)).unwrap();
        assert_eq!(h, hello());
        let b: AgentMessage = block_on(read_message(&mut r, 1024)).unwrap();
        assert_eq!(b, AgentMessage::Bye { reason: "x".into() });
        assert!(matches!(
            block_on(read_frame(&mut r, 1024)),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        // A header claiming 4 GiB - 1 with no payload behind it: must fail on the limit, not try
        // to allocate or read.
        let bytes = u32::MAX.to_le_bytes();
        let mut r = Reader(&bytes);
        match block_on(read_frame(&mut r, 16 * 1024 * 1024)) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 16 * 1024 * 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_header_and_payload() {
        let mut r = Reader(&[1, 0]);
        assert!(matches!(
            block_on(read_frame(&mut r, 100)),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
        let mut r = Reader(&[10, 0, 0, 0, 1, 2, 3]);
        assert!(matches!(
            block_on(read_frame(&mut r, 100)),
            Err(FrameError::Truncated {
                expected: 10,
                got: 3
            })
        ));
    }

    #[test]
    fn garbage_payload_is_a_typed_decode_error() {
        let mut frame = vec![6, 0, 0, 0];
        frame.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa]);
        let mut r = Reader(&frame);
        let err = block_on(read_message::<Hello, _>(&mut r, 100)).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Decode {
                    message: "Hello",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_variant_from_a_newer_minor_is_reported_as_such() {
        // Variant index 9 of ControllerMessage, as a newer minor might send.
        let payload = [9u8, 1, 2, 3];
        let err = crate::decode::<ControllerMessage>(&payload).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::UnknownVariant {
                    index: 9,
                    known: 9,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
