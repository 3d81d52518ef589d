//! Test-only support for the fuzz tests of the decoders that read untrusted bytes
//! ([`crate::wire`], [`crate::transport::frame`], the WebSocket multiplexer): seeded cases,
//! mutations of valid encodings, and an allocator that records the largest allocation a
//! thread asks for (a decoder must not reserve what a header merely announces).
//!
//! Every fuzz test runs a fixed number of cases from a fixed seed: CI is deterministic and
//! takes seconds. To search further or differently:
//!
//! ```text
//! MESH_FUZZ_SEED=random MESH_FUZZ_ITERS=1000000 cargo test --lib fuzz_
//! ```
//!
//! `MESH_FUZZ_SEED` is a number or `random`, `MESH_FUZZ_ITERS` the number of cases of every
//! fuzz test (each has its own default). A failing case prints the seed and its index; run
//! just that case again with `MESH_FUZZ_SEED=<seed> MESH_FUZZ_CASE=<index>`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use fastrand::Rng;

/// The seed used when `MESH_FUZZ_SEED` is not set.
const DEFAULT_SEED: u64 = 0x5105_3e54_f022_2026;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={value:?}: {e}"),
    }
}

/// The seed of this run: the same for every fuzz test of the process.
fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        if std::env::var("MESH_FUZZ_SEED").as_deref() == Ok("random") {
            let seed = fastrand::u64(..);
            eprintln!("MESH_FUZZ_SEED=random: using seed {seed}");
            return seed;
        }
        env_u64("MESH_FUZZ_SEED").unwrap_or(DEFAULT_SEED)
    })
}

/// One fuzz case: its generator, seeded from the run's seed and the case's index. If the case
/// panics, dropping it prints how to run it again.
pub(crate) struct Case {
    pub rng: Rng,
    pub index: usize,
    name: &'static str,
    seed: u64,
}

impl Drop for Case {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fuzz test {} failed at case {}: reproduce with MESH_FUZZ_SEED={} MESH_FUZZ_CASE={}",
                self.name, self.index, self.seed, self.index
            );
        }
    }
}

/// The cases of fuzz test `name`: `default_iters` of them unless the environment says otherwise.
pub(crate) fn cases(name: &'static str, default_iters: usize) -> impl Iterator<Item = Case> {
    let seed = seed();
    let iters = env_u64("MESH_FUZZ_ITERS").map_or(default_iters, |n| n as usize);
    let range = match env_u64("MESH_FUZZ_CASE") {
        Some(only) => only as usize..only as usize + 1,
        None => 0..iters,
    };
    range.map(move |index| Case {
        rng: Rng::with_seed(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        index,
        name,
        seed,
    })
}

/// MessagePack markers that start something with a length or a nesting, and other edge bytes:
/// random inputs drawn partly from them reach deeper into the decoders than uniform bytes.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0x81, 0x8f, 0x90, 0x91, 0x9f, 0xa0, 0xa1, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf, 0xd0, 0xd3, 0xd4, 0xd8,
    0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff,
];

/// A byte: uniform, or one of the [`INTERESTING`] ones.
pub(crate) fn byte(rng: &mut Rng) -> u8 {
    if rng.bool() {
        rng.u8(..)
    } else {
        INTERESTING[rng.usize(..INTERESTING.len())]
    }
}

/// Random bytes of a random length below `max`, most of them short.
pub(crate) fn bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = if rng.u8(..4) == 0 {
        rng.usize(..max)
    } else {
        rng.usize(..max.min(64))
    };
    (0..len).map(|_| byte(rng)).collect()
}

/// A header that announces far more than any input holds: a length of `u32::MAX` or another
/// large one, for an array, a map, a string, a binary or an extension; or a 64-bit integer.
pub(crate) fn huge_header(rng: &mut Rng) -> Vec<u8> {
    let len: u32 = match rng.u8(..4) {
        0 => u32::MAX,
        1 => 1 << 31,
        2 => rng.u32(1 << 20..),
        _ => u32::from(u16::MAX),
    };
    let (marker, width) = match rng.u8(..8) {
        0 => (0xdd, 4), // array 32
        1 => (0xdf, 4), // map 32
        2 => (0xdb, 4), // str 32
        3 => (0xc6, 4), // bin 32
        4 => (0xc9, 4), // ext 32
        5 => (0xdc, 2), // array 16
        6 => (0xde, 2), // map 16
        _ => return [&[0xcf][..], &u64::MAX.to_be_bytes()].concat(),
    };
    let mut out = vec![marker];
    out.extend_from_slice(&len.to_be_bytes()[4 - width..]);
    if marker == 0xc9 {
        out.push(rng.u8(..)); // extension type
    }
    out
}

/// `input` with 1 to 4 random edits: bit flips, byte changes, truncation, insertion and
/// deletion, duplicated ranges (more nesting), huge length headers, `0xff` runs over length
/// fields, deep nesting prefixes.
pub(crate) fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let len = out.len();
        let at = rng.usize(..=len);
        match rng.u8(..10) {
            0 if len > 0 => out[at.min(len - 1)] ^= 1 << rng.u8(..8),
            1 if len > 0 => out[at.min(len - 1)] = byte(rng),
            2 => out.truncate(at),
            3 => {
                let extra: Vec<u8> = (0..rng.usize(1..8)).map(|_| byte(rng)).collect();
                out.splice(at..at, extra);
            }
            4 if at < len => {
                let end = rng.usize(at..=len.min(at + 8));
                out.drain(at..end);
            }
            5 if at < len => {
                let end = rng.usize(at..=len);
                let copy = out[at..end].to_vec();
                let to = rng.usize(..=len);
                out.splice(to..to, copy);
            }
            6 => {
                let header = huge_header(rng);
                out.splice(at..at, header);
            }
            7 if at < len => {
                // A length field set to its maximum (if one starts here).
                let end = len.min(at + rng.usize(1..=4));
                out[at..end].fill(0xff);
            }
            8 => {
                // Nesting: wrap what follows in many one-element arrays or maps.
                let wrapper: &[u8] = if rng.bool() { &[0x91] } else { &[0x81, 0xc0] };
                let depth = if rng.bool() {
                    rng.usize(1..8)
                } else {
                    rng.usize(..3000)
                };
                let prefix = wrapper.repeat(depth);
                out.splice(at..at, prefix);
            }
            _ if len > 0 => out[at.min(len - 1)] = rng.u8(..),
            _ => out.push(byte(rng)),
        }
    }
    out
}

/// Records the largest allocation each thread asks for while [`largest_allocation`] watches.
pub(crate) struct PeakAlloc;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    // `try_with`: the allocator also runs while thread-locals are being torn down.
    if WATCHING.try_with(Cell::get).unwrap_or(false) {
        let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; only sizes are recorded, in
// thread-locals that need no allocation.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// Run `f` and return its result with the size of the largest single allocation (or
/// reallocation) it asked for on this thread, whether the allocator granted it or not.
pub(crate) fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            WATCHING.with(|w| w.set(false));
        }
    }
    PEAK.with(|p| p.set(0));
    WATCHING.with(|w| w.set(true));
    let stop = Stop;
    let out = f();
    drop(stop);
    (out, PEAK.with(Cell::get))
}

mod tests {
    use super::*;

    #[test]
    fn the_allocator_sees_the_largest_request() {
        let ((), peak) = largest_allocation(|| {
            let v: Vec<u8> = Vec::with_capacity(12_345);
            drop(v);
        });
        assert!(peak >= 12_345, "{peak}");
        let ((), peak) = largest_allocation(|| {});
        assert_eq!(peak, 0);
    }

    #[test]
    fn cases_are_reproducible_from_the_seed() {
        let a: Vec<u64> = cases("a", 3).map(|mut c| c.rng.u64(..)).collect();
        let b: Vec<u64> = cases("b", 3).map(|mut c| c.rng.u64(..)).collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }
}
