//! AMX integer GEMM (Intel Advanced Matrix Extensions, Sapphire Rapids and later).
//!
//! `tdpbusd` multiplies a 16 x 64 tile of unsigned activation bytes by a 64 x 16 tile of
//! signed weight bytes (stored as 16 rows of 16 lanes of 4 consecutive `k`, the VNNI layout
//! of [`super::avx512`]) and adds the exact products to a 16 x 16 tile of `i32`: 16 384
//! multiply-adds per instruction. The tile instructions are not yet exposed as intrinsics on
//! stable Rust, so they are written as inline assembly; the assembler knows them.
//!
//! Tiles: `tmm0..tmm3` accumulate a 32 x 32 block of `C` (two row halves by two column
//! blocks), `tmm4`/`tmm5` hold the two 16-row halves of `A` and `tmm6`/`tmm7` the two column
//! blocks of `B`, all configured as 16 rows of 64 bytes. Weights are packed with `k` padded
//! to a multiple of 64 (zero weights), so every `B` tile is a full one; the last, partial
//! 64-byte chunk of the activations is copied into a zero-padded buffer. Row counts that are
//! not a multiple of 16 leave their last rows to the AVX-512 VNNI kernel.
//!
//! Linux hands out the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`): the
//! kernel is available only where the CPU reports AMX-TILE and AMX-INT8, the OS enabled the
//! tile state in XCR0 and that request succeeded.

use std::arch::asm;
use std::arch::x86_64::{__cpuid, __cpuid_count};
use std::sync::OnceLock;

/// Columns per block (one `B` tile).
const NR: usize = 16;
/// Rows per `A` tile.
const TILE_ROWS: usize = 16;
/// Bytes of `k` per tile step.
pub(crate) const KC: usize = 64;

/// Whether this process may run AMX int8 instructions (detected once).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

fn detect() -> bool {
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("xsave"))
    {
        return false;
    }
    // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    let leaf7 = __cpuid_count(7, 0);
    if leaf7.edx & (3 << 24) != 3 << 24 {
        return false;
    }
    // Leaf 0x1d, palette 1 must offer 8 tiles of 16 rows of 64 bytes.
    if __cpuid(0).eax < 0x1d {
        return false;
    }
    let palette = __cpuid_count(0x1d, 1);
    let (names, bytes_per_row, rows) = (palette.ebx >> 16, palette.ebx & 0xffff, palette.ecx);
    if names < 8 || bytes_per_row < 64 || (rows & 0xffff) < 16 {
        return false;
    }
    // XCR0 bits 17 and 18: the OS saves and restores the tile configuration and data.
    let xcr0: u64;
    // SAFETY: `xgetbv` with ECX = 0 reads XCR0; CPUID reported XSAVE (hence XGETBV) above.
    unsafe {
        let (lo, hi): (u32, u32);
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
        xcr0 = u64::from(lo) | (u64::from(hi) << 32);
    }
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    request_permission()
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with these arguments only changes the permissions
    // of this process; the syscall instruction clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// `k` rounded up to whole tile steps: the per-block length of the packed weights.
pub(crate) fn block_k(kp: usize) -> usize {
    kp.next_multiple_of(KC)
}

/// The tile configuration: palette 1, eight tiles of 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t] = KC as u8;
            cfg[48 + t] = TILE_ROWS as u8;
        }
        Self(cfg)
    }
}

/// A 64-byte aligned buffer for the last partial `k` chunk of 32 rows.
#[repr(C, align(64))]
struct TailBuffer([u8; 2 * TILE_ROWS * KC]);

/// A 64-byte aligned 16 x 16 `i32` tile, for column blocks that are only partly in `C`.
#[repr(C, align(64))]
struct CTile([i32; TILE_ROWS * NR]);

macro_rules! tile_load {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd ", $tmm, ", [{p} + {s} * 1]"),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack, readonly),
        )
    };
}

macro_rules! tile_store {
    ($tmm:literal, $ptr:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{p} + {s} * 1], ", $tmm),
            p = in(reg) $ptr,
            s = in(reg) $stride,
            options(nostack),
        )
    };
}

/// One `(16 * RB) x (16 * CB)` block of `C` over all of `k`.
///
/// # Safety
/// Tiles configured by [`TileConfig`]; `a` readable for `16 * RB` rows of `64 * full` bytes
/// at stride `lda`; `tail` (when `has_tail`) for `16 * RB` rows of 64 bytes at stride 64; `b`
/// for `CB` blocks of `bs` groups of 64 bytes, `bs * 64` bytes apart, `bs >= 16 * (full +
/// has_tail)`; `c` writable for `16 * RB` rows of `16 * CB` values at stride `n` where
/// `full_cols[j]`, and `spill` is used for the blocks where it is not.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<const RB: usize, const CB: usize>(
    a: *const u8,
    lda: usize,
    full: usize,
    tail: Option<*const u8>,
    b: *const i8,
    bs: usize,
    c: *mut i32,
    n: usize,
    cols: [usize; CB],
    spill: &mut CTile,
) {
    // SAFETY (all blocks below): the caller vouches for every address the tiles reach.
    unsafe {
        asm!("tilezero tmm0", options(nostack, nomem));
        if CB == 2 {
            asm!("tilezero tmm1", options(nostack, nomem));
        }
        if RB == 2 {
            asm!("tilezero tmm2", options(nostack, nomem));
            if CB == 2 {
                asm!("tilezero tmm3", options(nostack, nomem));
            }
        }
        let steps = full + usize::from(tail.is_some());
        for step in 0..steps {
            let (ap, stride) = match tail {
                Some(t) if step == full => (t, KC),
                _ => (a.add(step * KC), lda),
            };
            let bp = b.add(step * TILE_ROWS * KC);
            tile_load!("tmm4", ap, stride);
            tile_load!("tmm6", bp, KC);
            if CB == 2 {
                tile_load!("tmm7", bp.add(bs * NR * 4), KC);
            }
            asm!("tdpbusd tmm0, tmm4, tmm6", options(nostack, nomem));
            if CB == 2 {
                asm!("tdpbusd tmm1, tmm4, tmm7", options(nostack, nomem));
            }
            if RB == 2 {
                tile_load!("tmm5", ap.add(TILE_ROWS * stride), stride);
                asm!("tdpbusd tmm2, tmm5, tmm6", options(nostack, nomem));
                if CB == 2 {
                    asm!("tdpbusd tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
        let ldc = n * 4;
        let sp = spill.0.as_mut_ptr();
        macro_rules! store {
            ($tmm:literal, $row:expr, $col:expr) => {{
                let (row, col): (usize, usize) = ($row, $col);
                let valid = cols[col];
                let dst = c.add(row * TILE_ROWS * n + col * NR);
                if valid == NR {
                    tile_store!($tmm, dst, ldc);
                } else {
                    tile_store!($tmm, sp, NR * 4);
                    for r in 0..TILE_ROWS {
                        std::ptr::copy_nonoverlapping(sp.add(r * NR), dst.add(r * n), valid);
                    }
                }
            }};
        }
        store!("tmm0", 0, 0);
        if CB == 2 {
            store!("tmm1", 0, 1);
        }
        if RB == 2 {
            store!("tmm2", 1, 0);
            if CB == 2 {
                store!("tmm3", 1, 1);
            }
        }
    }
}

/// `c[r * n + j] = sum_kk a[r * lda + kk] * w[j][kk]` for weights packed by
/// [`super::avx512::pack`] with `block_k(kp)` weights per column block.
///
/// # Safety
/// [`available`] must have returned true. Slice lengths are checked here.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    a: &[u8],
    lda: usize,
    m: usize,
    b: &[i8],
    n: usize,
    k: usize,
    kp: usize,
    c: &mut [i32],
) {
    let bk = block_k(kp);
    let blocks = n.div_ceil(NR);
    assert!(kp.is_multiple_of(4) && kp >= k && lda >= kp && b.len() == blocks * bk * NR);
    assert!(m == 0 || a.len() >= (m - 1) * lda + kp);
    assert!(c.len() >= m * n);
    let tiled = m - m % TILE_ROWS;
    if tiled > 0 {
        let full = k / KC;
        let tail_len = kp - full * KC;
        let mut tail = TailBuffer([0; 2 * TILE_ROWS * KC]);
        let mut spill = CTile([0; TILE_ROWS * NR]);
        let config = TileConfig::new();
        let bs = bk / 4;
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let valid = |block: usize| (n - block * NR).min(NR);
        // SAFETY: `available` checked the CPU and the OS; the configuration is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        let mut r = 0;
        while r < tiled {
            let rb = if tiled - r >= 2 * TILE_ROWS { 2 } else { 1 };
            let rows_a = ap.wrapping_add(r * lda);
            if tail_len > 0 {
                for i in 0..rb * TILE_ROWS {
                    let src = &a[(r + i) * lda + full * KC..(r + i) * lda + kp];
                    tail.0[i * KC..i * KC + tail_len].copy_from_slice(src);
                }
            }
            let tail_ptr = (tail_len > 0).then_some(tail.0.as_ptr());
            let mut block_index = 0;
            while block_index < blocks {
                let two = block_index + 1 < blocks;
                let bb = bp.wrapping_add(block_index * bs * 4 * NR);
                let cc = cp.wrapping_add(r * n + block_index * NR);
                // SAFETY: rows `r..r + 16 * rb` are below `m` and hold `kp >= 64 * full`
                // bytes; the tail buffer holds `16 * rb` rows of 64; blocks `block_index..`
                // of `b` hold `bk >= 64 * (full + 1)` weights (asserted above); the columns
                // stored directly are below `n`, the others go through `spill`.
                unsafe {
                    match (rb, two) {
                        (2, true) => block::<2, 2>(
                            rows_a,
                            lda,
                            full,
                            tail_ptr,
                            bb,
                            bs,
                            cc,
                            n,
                            [valid(block_index), valid(block_index + 1)],
                            &mut spill,
                        ),
                        (2, false) => block::<2, 1>(
                            rows_a,
                            lda,
                            full,
                            tail_ptr,
                            bb,
                            bs,
                            cc,
                            n,
                            [valid(block_index)],
                            &mut spill,
                        ),
                        (_, true) => block::<1, 2>(
                            rows_a,
                            lda,
                            full,
                            tail_ptr,
                            bb,
                            bs,
                            cc,
                            n,
                            [valid(block_index), valid(block_index + 1)],
                            &mut spill,
                        ),
                        (_, false) => block::<1, 1>(
                            rows_a,
                            lda,
                            full,
                            tail_ptr,
                            bb,
                            bs,
                            cc,
                            n,
                            [valid(block_index)],
                            &mut spill,
                        ),
                    }
                }
                block_index += 2;
            }
            r += rb * TILE_ROWS;
        }
        // SAFETY: releases the tile state this function configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
    if tiled < m {
        // SAFETY: the CPU supports AVX-512 VNNI (`available` checked); lengths are checked
        // by the callee.
        unsafe {
            super::avx512::gemm(
                &a[tiled * lda..],
                lda,
                m - tiled,
                b,
                n,
                kp,
                bk,
                &mut c[tiled * n..],
            );
        }
    }
}
