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

    /// Cut `bytes` at random places into chunks (some empty).
    fn random_chunks(rng: &mut fastrand::Rng, bytes: &[u8]) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = match rng.u8(..8) {
                0 => 0,
                1 => bytes.len() - at,
                2..=4 => rng.usize(1..=8),
                _ => rng.usize(1..=bytes.len() - at),
            }
            .min(bytes.len() - at);
            chunks.push(Bytes::copy_from_slice(&bytes[at..at + len]));
            at += len;
        }
        chunks
    }

    /// What a decoder made of a stream: its frames, its error, how many bytes it had been
    /// given when it failed, and whether it ended holding part of a frame.
    struct Outcome {
        frames: Vec<Bytes>,
        error: Option<(TransportError, usize)>,
        holds_partial: bool,
    }

    /// Feed `chunks` to a decoder as a stream reader does, checking at every step that it
    /// holds at most one incomplete frame and never allocates more than that.
    fn feed(chunks: &[Bytes], max: usize) -> Outcome {
        let mut d = Decoder::new(max);
        let mut frames = Vec::new();
        let mut pushed = 0;
        let bound = 2 * (max + 4) + 64;
        let mut drain = |d: &mut Decoder, pushed: usize| -> Result<(), (TransportError, usize)> {
            loop {
                let (next, peak) = crate::fuzz::largest_allocation(|| d.next());
                assert!(peak <= bound, "next() allocated {peak} bytes, max {max}");
                assert!(d.partial.len() <= max + 4, "{} bytes held", d.partial.len());
                match next {
                    Ok(Some(f)) => {
                        assert!(f.len() <= max, "frame of {} bytes, max {max}", f.len());
                        frames.push(f);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => return Err((e, pushed)),
                }
            }
        };
        for chunk in chunks {
            if let Err(e) = drain(&mut d, pushed) {
                return Outcome {
                    frames,
                    error: Some(e),
                    holds_partial: true,
                };
            }
            let ((), peak) = crate::fuzz::largest_allocation(|| d.push(chunk.clone()));
            assert!(peak <= bound, "push() allocated {peak} bytes, max {max}");
            pushed += chunk.len();
        }
        let error = drain(&mut d, pushed).err();
        Outcome {
            frames,
            error,
            holds_partial: !d.is_empty(),
        }
    }

    fn random_max(rng: &mut fastrand::Rng) -> usize {
        match rng.u8(..4) {
            0 => rng.usize(..4),
            1 => rng.usize(..5000),
            _ => rng.usize(..300),
        }
    }

    #[test]
    fn fuzz_random_chunkings_give_the_valid_frames_then_a_clear_error() {
        for mut case in crate::fuzz::cases("frame chunkings", 20_000) {
            let rng = &mut case.rng;
            let max = random_max(rng);
            let frames: Vec<Bytes> = (0..rng.usize(..12))
                .map(|_| {
                    let len = match rng.u8(..4) {
                        0 => 0,
                        1 => max,
                        _ => rng.usize(..=max),
                    };
                    Bytes::from((0..len).map(|_| rng.u8(..)).collect::<Vec<u8>>())
                })
                .collect();
            let mut bytes = wire(&frames);
            let valid = bytes.len();
            // Then: nothing, a frame cut short, or a header announcing more than `max`.
            let tail = rng.u8(..3);
            let announced = match rng.u8(..3) {
                0 => u32::MAX as usize,
                1 => max + 1,
                _ => rng.usize(max + 1..=u32::MAX as usize),
            };
            match tail {
                0 => {}
                1 => {
                    let cut = wire(&[Bytes::from(vec![7u8; max])]);
                    bytes.extend_from_slice(&cut[..rng.usize(1..cut.len())]);
                }
                _ => {
                    bytes.extend_from_slice(&(announced as u32).to_be_bytes());
                    // Some of its body, or garbage: none of it may be buffered.
                    bytes.extend(crate::fuzz::bytes(rng, 2 * max + 2));
                }
            }
            let chunks = random_chunks(rng, &bytes);
            let out = feed(&chunks, max);
            assert_eq!(out.frames, frames, "max {max}, tail {tail}");
            match tail {
                0 => assert!(out.error.is_none() && !out.holds_partial),
                1 => assert!(
                    out.error.is_none() && out.holds_partial,
                    "truncation unseen"
                ),
                _ => {
                    let (error, pushed) = out.error.expect("oversize header accepted");
                    assert_eq!(
                        error,
                        TransportError::FrameTooLarge {
                            size: announced as u64,
                            max
                        }
                    );
                    assert!(!error.to_string().is_empty());
                    // Refused as soon as its 4 bytes arrived: no chunk after that one was read.
                    let header_end = valid + 4;
                    let mut end = 0;
                    let chunk_end = chunks
                        .iter()
                        .map(|c| {
                            end += c.len();
                            end
                        })
                        .find(|&e| e >= header_end)
                        .expect("the header is in the stream");
                    assert!(
                        pushed <= chunk_end,
                        "read {pushed} bytes, header done at {chunk_end}"
                    );
                }
            }
        }
    }

    #[test]
    fn fuzz_random_streams_are_cut_exactly_as_their_headers_say() {
        for mut case in crate::fuzz::cases("frame garbage", 20_000) {
            let rng = &mut case.rng;
            let max = random_max(rng);
            let mut bytes = crate::fuzz::bytes(rng, 4096);
            // Small lengths now and then, so that some frames are valid.
            for _ in 0..rng.usize(..4) {
                let at = rng.usize(..=bytes.len());
                let len = rng.u32(..=(max as u32).saturating_add(2));
                bytes.splice(at..at, len.to_be_bytes());
            }
            let out = feed(&random_chunks(rng, &bytes), max);
            // The model: frames one after the other, each as its header says.
            let mut at = 0;
            for f in &out.frames {
                assert_eq!(be_len(&bytes[at..]), f.len());
                assert_eq!(&bytes[at + 4..at + 4 + f.len()], &f[..]);
                at += 4 + f.len();
            }
            let rest = &bytes[at..];
            match out.error {
                Some((TransportError::FrameTooLarge { size, max: m }, _)) => {
                    assert_eq!((size, m), (be_len(rest) as u64, max));
                    assert!(size as usize > max);
                }
                Some((e, _)) => panic!("unexpected error {e}"),
                None if rest.is_empty() => assert!(!out.holds_partial),
                None => {
                    assert!(out.holds_partial, "{} bytes left unseen", rest.len());
                    assert!(rest.len() < 4 || rest.len() < 4 + be_len(rest));
                    assert!(rest.len() < 4 || be_len(rest) <= max);
                }
            }
        }
    }

    #[test]
    fn fuzz_check_refuses_exactly_the_batches_with_an_oversize_frame() {
        for mut case in crate::fuzz::cases("frame check", 20_000) {
            let rng = &mut case.rng;
            let max = random_max(rng);
            let frames: Vec<Bytes> = (0..rng.usize(..6))
                .map(|_| Bytes::from(vec![0u8; rng.usize(..=max + 2)]))
                .collect();
            match (check(&frames, max), frames.iter().find(|f| f.len() > max)) {
                (Ok(()), None) => {}
                (Err(TransportError::FrameTooLarge { size, max: m }), Some(f)) => {
                    assert_eq!((size, m), (f.len() as u64, max));
                }
                (res, first) => panic!("{res:?} for first oversize {:?}", first.map(Bytes::len)),
            }
        }
    }
}
