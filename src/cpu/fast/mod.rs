//! The fast CPU engine's kernels, beside the reference they are tested against: the same exact
//! integer accumulators and the same f32 operations in the same order, so every result is equal
//! to its reference twin's bit for bit. What changes is the layout (ternary weights packed 2 bits
//! each, float tables interleaved for SIMD), the instructions (AVX2 chosen at run time on x86-64,
//! portable Rust elsewhere) and the threads (natively a team of the engine's own, `team`, with
//! `rayon` for loops that find it busy; the browser's wasm build runs the same code on its one
//! thread).

mod attention;
mod int8_rows;
mod quant;
mod rows;
#[cfg(not(target_arch = "wasm32"))]
mod team;
mod ternary;

pub(crate) use attention::attention_cached;
pub use attention::{RopeTable, attention, rope_table};
pub use int8_rows::Int8Rows;
pub use quant::{act_quant, rmsnorm};
pub use rows::{FloatRows, InterleavedRows};
pub use ternary::PackedMatrix;

/// The instructions the products run on, chosen once per product: AVX2 (with F16C, which every
/// AVX2 processor has, for the f16 tables) where the processor has them, else plain Rust; the
/// ternary products also use AVX-512 VNNI where it is present (`vpdpbusd`: 32 byte products
/// summed into i32 lanes in one instruction, three with AVX2), the float ones AVX2 there.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    fn detect() -> Self {
        *Self::available().last().expect("the portable kernel")
    }

    /// Every kernel this processor runs, the fastest last (the tests check each).
    fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("f16c") {
                kernels.push(Kernel::Avx2);
                if has!("avx512f") && has!("avx512vl") && has!("avx512vnni") {
                    kernels.push(Kernel::Vnni);
                }
            }
        }
        kernels
    }
}

/// Maps in the pages under `len` elements from `start` (memory a buffer is about to fill) in one
/// call, where Linux can: filling a fresh allocation of 2B4T's size otherwise takes a page fault
/// per 4 KiB, most of the time it takes to build the engine. Only whole pages inside the range
/// are touched; an older kernel's refusal leaves the faults to come, as correct.
fn populate<T>(start: *const T, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let (begin, end) = (start as usize, start as usize + len * size_of::<T>());
        let (first, last) = (begin.next_multiple_of(PAGE), end / PAGE * PAGE);
        if last > first {
            // SAFETY: the pages lie inside one allocation this process owns; MADV_POPULATE_WRITE
            // maps them as a write would, changing no byte.
            unsafe {
                libc::madvise(first as *mut _, last - first, libc::MADV_POPULATE_WRITE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// Asks glibc's malloc to keep freed memory for the next allocation, once per process. A
/// prompt's activations (megabytes per layer) are allocated and freed at every step; by default
/// the larger ones are mapped and unmapped each time, or trimmed from the heap's top, and every
/// reuse pays a page fault and a zeroed page per 4 KiB: 17% of a 128-token prompt (`perf`),
/// 10% of its speed. Allocations up to 32 MiB (the most glibc allows for this threshold) come
/// from the heap and freed memory stays mapped, up to 1 GiB; the peak is unchanged.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes thresholds; called before the engine's work begins.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        });
    }
}

/// `(rows, cols)` of a table an engine lays out: an error for empty rows, or for values that are
/// not whole rows.
fn table_shape(table: &crate::table::Table<'_>) -> crate::Result<(usize, usize)> {
    let (rows, cols) = (table.rows(), table.cols());
    if cols == 0 {
        return Err(crate::Error::Empty("table row"));
    }
    if rows * cols != table.len() {
        return Err(crate::Error::shape(
            "table",
            format!("{rows} x {cols}"),
            table.len(),
        ));
    }
    Ok((rows, cols))
}

/// Runs `f(index, chunk)` on every `chunk`-sized piece of `out`, on all cores natively (the
/// engine's own threads, [`team`]; `rayon`'s when those are busy with another loop). One piece,
/// or one thread, runs here: handing it over and waiting costs a sleep and a wake-up.
fn for_each_chunk<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    for_each_chunk_pair((out, chunk), (&mut [(); 0], 0), |i, a, _| f(i, a));
}

/// [`for_each_chunk`] over two outputs cut into as many pieces: `f(index, a_chunk, b_chunk)`
/// (`b`'s pieces empty past its end).
fn for_each_chunk_pair<A: Send, B: Send>(
    (a, a_chunk): (&mut [A], usize),
    (b, b_chunk): (&mut [B], usize),
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (a_chunk, b_chunk) = (a_chunk.max(1), b_chunk.max(1));
    #[cfg(not(target_arch = "wasm32"))]
    if a.len() > a_chunk && threads() > 1 {
        let pieces = a.len().div_ceil(a_chunk);
        let (a_len, b_len) = (a.len(), b.len());
        let (a_ptr, b_ptr) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        let piece = |i: usize| {
            let (a_start, b_start) = (i * a_chunk, (i * b_chunk).min(b_len));
            // SAFETY: piece `i` covers elements of `a` and of `b` no other piece covers (each
            // index runs once), inside the slices borrowed mutably for this call.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        a_ptr.get().add(a_start),
                        a_chunk.min(a_len - a_start),
                    ),
                    std::slice::from_raw_parts_mut(
                        b_ptr.get().add(b_start),
                        b_chunk.min(b_len - b_start),
                    ),
                )
            };
            f(i, a, b);
        };
        if !team::run(threads(), pieces, &piece) {
            use rayon::prelude::*;
            (0..pieces).into_par_iter().for_each(piece);
        }
        return;
    }
    a.chunks_mut(a_chunk)
        .zip(
            b.chunks_mut(b_chunk)
                .chain(std::iter::repeat_with(|| &mut [][..])),
        )
        .enumerate()
        .for_each(|(i, (a, b))| f(i, a, b));
}

/// A pointer the pieces of one loop share across threads.
#[cfg(not(target_arch = "wasm32"))]
struct SendPtr<T>(*mut T);

#[cfg(not(target_arch = "wasm32"))]
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl<T> Copy for SendPtr<T> {}

// SAFETY: each piece dereferences its own part only (`for_each_chunk_pair`).
#[cfg(not(target_arch = "wasm32"))]
unsafe impl<T: Send> Send for SendPtr<T> {}
#[cfg(not(target_arch = "wasm32"))]
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(not(target_arch = "wasm32"))]
impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Items per task so that each task has about `work` units of work, given `per_item` units per
/// item: small products stay on one thread, where splitting costs more than it saves.
fn items_per_task(items: usize, per_item: usize, work: usize) -> usize {
    let threads = threads();
    let by_work = work.div_ceil(per_item.max(1));
    let by_threads = items.div_ceil(4 * threads);
    by_work.max(by_threads).max(1)
}

#[cfg(not(target_arch = "wasm32"))]
fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(target_arch = "wasm32")]
fn threads() -> usize {
    1
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// Every piece once, with its own index, from loops run one after another, side by side
    /// on several threads, and inside a piece of another loop.
    #[test]
    fn every_piece_runs_once() {
        let check = |len: usize, chunk: usize| {
            let mut a = vec![0usize; len];
            let mut b = vec![0u8; len.div_ceil(chunk.max(1)) * 2 - 1];
            for_each_chunk_pair((&mut a, chunk), (&mut b, 2), |i, a, b| {
                for v in a.iter_mut() {
                    *v += i + 1;
                }
                for v in b.iter_mut() {
                    *v += 1;
                }
            });
            let want: Vec<usize> = (0..len).map(|k| k / chunk.max(1) + 1).collect();
            assert_eq!(a, want, "{len} / {chunk}");
            assert!(b.iter().all(|&v| v == 1), "{len} / {chunk}: {b:?}");
        };
        for (len, chunk) in [(1, 1), (7, 3), (1000, 1), (4097, 64), (10, 100)] {
            check(len, chunk);
        }
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for round in 0..200 {
                        check(100 + t + round, 1 + round % 7);
                    }
                });
            }
        });
        let mut outer = vec![0usize; 8];
        for_each_chunk(&mut outer, 1, |i, o| {
            let mut inner = vec![0usize; 50];
            for_each_chunk(&mut inner, 5, |j, c| c.fill(j));
            o[0] = i + inner.iter().sum::<usize>();
        });
        let inner: usize = (0..10).map(|j| 5 * j).sum();
        assert_eq!(outer, (0..8).map(|i| i + inner).collect::<Vec<_>>());
    }

    #[test]
    fn a_panic_in_a_piece_reaches_the_caller() {
        let result = std::panic::catch_unwind(|| {
            let mut a = vec![0u8; 64];
            for_each_chunk(&mut a, 1, |i, _| assert!(i != 37, "piece 37"));
        });
        assert!(result.is_err());
        let mut a = vec![0u8; 64];
        for_each_chunk(&mut a, 1, |_, a| a[0] = 1);
        assert!(a.iter().all(|&v| v == 1), "the team works after a panic");
    }
}
