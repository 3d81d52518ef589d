//! Frame encoding on a byte stream (sans-IO): `u32 BE length | payload`, many frames per
//! write, and a decoder that slices frames out of the chunks a stream delivers without
//! copying them where it can.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::TransportError;

/// Frames up to this size are copied into one contiguous buffer with their headers; larger
/// ones travel as their own chunk (no copy of big payloads).
const COPY_LIMIT: usize = 4096;

/// Append the encoding of `frames` to `out` as a few chunks: small frames and every header
/// are copied into shared buffers, large payloads are referenced. One stream write then
/// carries the whole batch.
pub(crate) fn encode(frames: &[Bytes], out: &mut Vec<Bytes>) {
    let copied: usize = frames
        .iter()
        .map(|f| 4 + if f.len() <= COPY_LIMIT { f.len() } else { 0 })
        .sum();
    let mut buf = BytesMut::with_capacity(copied);
    for f in frames {
        buf.put_u32(f.len() as u32);
        if f.len() <= COPY_LIMIT {
            buf.put_slice(f);
        } else {
            out.push(buf.split().freeze());
            out.push(f.clone());
        }
    }
    if !buf.is_empty() {
        out.push(buf.freeze());
    }
}

/// Check that every frame of a batch fits the limit before anything is written.
pub(crate) fn check(frames: &[Bytes], max: usize) -> Result<(), TransportError> {
    match frames.iter().find(|f| f.len() > max) {
        Some(f) => Err(TransportError::FrameTooLarge {
            size: f.len() as u64,
            max,
        }),
        None => Ok(()),
    }
}

/// Cuts a byte stream, delivered in chunks, into frames. A frame inside one chunk is a slice
/// of it (no copy); only a frame split across chunks is copied, once. Holds at most one
/// incomplete frame (≤ `max` + 4 bytes): a header announcing more than `max` is an error at
/// once, before its body is read.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Bytes of an incomplete frame carried over from earlier chunks.
    partial: BytesMut,
    /// The newest chunk, not yet consumed.
    chunk: Bytes,
    max: usize,
}

impl Decoder {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            partial: BytesMut::new(),
            chunk: Bytes::new(),
            max,
        }
    }

    /// Hand over the next chunk of the stream. Call only once [`Decoder::next`] returned
    /// `Ok(None)`: the previous chunk must be consumed first.
    pub(crate) fn push(&mut self, mut chunk: Bytes) {
        debug_assert!(
            self.chunk.is_empty(),
            "push before the last chunk was consumed"
        );
        // Complete a pending frame with just the bytes it lacks; the rest stays uncopied.
        while !self.partial.is_empty() && !chunk.is_empty() {
            let need = match self.partial.len() {
                n if n < 4 => 4 - n,
                n => {
                    let len = be_len(&self.partial);
                    if len > self.max {
                        break; // `next` reports it
                    }
                    (4 + len).saturating_sub(n)
                }
            };
            if need == 0 {
                break;
            }
            let take = need.min(chunk.len());
            self.partial.extend_from_slice(&chunk[..take]);
            chunk.advance(take);
        }
        self.chunk = chunk;
    }

    /// The next complete frame, if the bytes received so far hold one.
    pub(crate) fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        if !self.partial.is_empty() {
            return match self.header(&self.partial)? {
                Some(len) if self.partial.len() >= 4 + len => {
                    self.partial.advance(4);
                    Ok(Some(self.partial.split_to(len).freeze()))
                }
                _ => Ok(None),
            };
        }
        if let Some(len) = self.header(&self.chunk)?
            && self.chunk.len() >= 4 + len
        {
            let frame = self.chunk.slice(4..4 + len);
            self.chunk.advance(4 + len);
            return Ok(Some(frame));
        }
        // Keep the incomplete rest for the next chunk.
        if !self.chunk.is_empty() {
            self.partial.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
        }
        Ok(None)
    }

    /// The announced length of the frame starting `buf`, once its header is complete.
    fn header(&self, buf: &[u8]) -> Result<Option<usize>, TransportError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = be_len(buf);
        if len > self.max {
            return Err(TransportError::FrameTooLarge {
                size: len as u64,
                max: self.max,
            });
        }
        Ok(Some(len))
    }

    /// Whether no byte of an incomplete frame is held (a stream may end only here).
    pub(crate) fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.chunk.is_empty()
    }
}

/// The length in a complete frame header (`buf` holds at least 4 bytes).
fn be_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Bytes> {
        vec![
            Bytes::new(),
            Bytes::from_static(b"a"),
            Bytes::from(vec![7u8; 300]),
            Bytes::from(vec![9u8; COPY_LIMIT + 1]),
            Bytes::from_static(b"last"),
        ]
    }

    fn wire(frames: &[Bytes]) -> Vec<u8> {
        let mut chunks = Vec::new();
        encode(frames, &mut chunks);
        chunks.concat()
    }

    /// Feed `bytes` in chunks of `size` and collect every frame.
    fn decode_in_chunks(
        bytes: &[u8],
        size: usize,
        max: usize,
    ) -> Result<Vec<Bytes>, TransportError> {
        let mut d = Decoder::new(max);
        let mut out = Vec::new();
        for chunk in bytes.chunks(size) {
            while let Some(f) = d.next()? {
                out.push(f);
            }
            d.push(Bytes::copy_from_slice(chunk));
        }
        while let Some(f) = d.next()? {
            out.push(f);
        }
        assert!(d.is_empty(), "bytes left over");
        Ok(out)
    }

    #[test]
    fn every_chunking_gives_the_same_frames() {
        let frames = frames();
        let bytes = wire(&frames);
        for size in [1, 2, 3, 4, 5, 7, 64, 301, 1200, bytes.len()] {
            assert_eq!(
                decode_in_chunks(&bytes, size, 1 << 20).unwrap(),
                frames,
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn large_payloads_are_referenced_not_copied() {
        let big = Bytes::from(vec![1u8; COPY_LIMIT * 2]);
        let mut chunks = Vec::new();
        encode(&[Bytes::from_static(b"x"), big.clone()], &mut chunks);
        assert!(chunks.iter().any(|c| c.as_ptr() == big.as_ptr()));
    }

    #[test]
    fn frames_inside_a_chunk_are_slices_of_it() {
        let bytes = Bytes::from(wire(&[
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
        ]));
        let mut d = Decoder::new(16);
        d.push(bytes.clone());
        let f = d.next().unwrap().unwrap();
        assert_eq!(&f[..], b"abc");
        assert_eq!(f.as_ptr(), bytes[4..].as_ptr());
    }

    #[test]
    fn only_the_split_frame_is_copied() {
        let bytes = Bytes::from(wire(&[
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ]));
        // Cut inside the second frame: the third must still be a slice of the second chunk.
        let (first, second) = (bytes.slice(..9), bytes.slice(9..));
        let mut d = Decoder::new(16);
        d.push(first);
        assert_eq!(&d.next().unwrap().unwrap()[..], b"abc");
        assert_eq!(d.next(), Ok(None));
        d.push(second.clone());
        assert_eq!(&d.next().unwrap().unwrap()[..], b"de");
        let third = d.next().unwrap().unwrap();
        assert_eq!(&third[..], b"fgh");
        assert_eq!(third.as_ptr(), second[second.len() - 3..].as_ptr());
        assert!(d.is_empty());
    }

    #[test]
    fn an_oversize_header_is_refused_before_its_body() {
        let mut d = Decoder::new(10);
        d.push(Bytes::from_static(&[0, 0, 0, 11]));
        assert_eq!(
            d.next(),
            Err(TransportError::FrameTooLarge { size: 11, max: 10 })
        );
        // Split header: still refused once the 4 bytes are there.
        let mut d = Decoder::new(10);
        d.push(Bytes::from_static(&[0, 0]));
        assert_eq!(d.next(), Ok(None));
        d.push(Bytes::from_static(&[1, 0]));
        assert!(matches!(
            d.next(),
            Err(TransportError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn an_incomplete_frame_is_held_not_returned() {
        let bytes = wire(&[Bytes::from_static(b"hello")]);
        let mut d = Decoder::new(16);
        d.push(Bytes::copy_from_slice(&bytes[..6]));
        assert_eq!(d.next(), Ok(None));
        assert!(!d.is_empty(), "a stream ending now is truncated");
    }

    #[test]
    fn check_refuses_any_oversize_frame() {
        let frames = [Bytes::from_static(b"ok"), Bytes::from(vec![0u8; 5])];
        assert!(check(&frames, 5).is_ok());
        assert!(matches!(
            check(&frames, 4),
            Err(TransportError::FrameTooLarge { size: 5, max: 4 })
        ));
    }
}
