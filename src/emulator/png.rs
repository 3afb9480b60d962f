//! A minimal PNG writer (8-bit RGB) with a tiny deflate encoder.
//!
//! The emulator serves images whose real pixel size equals the width/height it reports,
//! so large sizes must stay cheap. The pictures are flat colour blocks; a greedy LZ77
//! that only looks 3 bytes back (previous pixel) or one row back, emitted with deflate's
//! fixed Huffman codes, shrinks a 2048×2048 image to a few tens of KB without a crate.

/// Encodes an RGB image; `fill_row(y, row)` writes `3 * width` bytes for row `y`.
pub fn encode_rgb(width: u32, height: u32, mut fill_row: impl FnMut(u32, &mut [u8])) -> Vec<u8> {
    let stride = 1 + 3 * width as usize;
    let mut deflate = Deflater::new();
    let mut adler = Adler32::new();
    let mut prev = vec![0u8; stride];
    let mut row = vec![0u8; stride];
    for y in 0..height {
        row[0] = 0; // filter type None
        fill_row(y, &mut row[1..]);
        adler.update(&row);
        if y > 0 && row == prev && stride <= MAX_DISTANCE {
            deflate.repeat(stride, stride);
        } else {
            deflate.row(&row);
        }
        std::mem::swap(&mut prev, &mut row);
    }
    let mut zlib = vec![0x78, 0x01];
    zlib.extend_from_slice(&deflate.finish());
    zlib.extend_from_slice(&adler.finish().to_be_bytes());

    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Draws the emulator's deterministic picture: 64-pixel colour blocks derived from
/// `seed` and a hash of the prompt, so equal inputs give equal bytes.
pub fn render(width: u32, height: u32, seed: u64, prompt: &str) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let key = h ^ seed.rotate_left(17);
    encode_rgb(width, height, |y, row| {
        let by = u64::from(y / 64);
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let bx = (x / 64) as u64;
            let v = splitmix(key ^ (by << 32) ^ bx);
            px.copy_from_slice(&v.to_le_bytes()[..3]);
        }
    })
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

struct Adler32 {
    a: u32,
    b: u32,
}

impl Adler32 {
    fn new() -> Self {
        Self { a: 1, b: 0 }
    }

    fn update(&mut self, data: &[u8]) {
        // 5552 is the largest block for which the sums cannot overflow u32 (zlib's NMAX).
        for block in data.chunks(5552) {
            for &byte in block {
                self.a += u32::from(byte);
                self.b += self.a;
            }
            self.a %= 65521;
            self.b %= 65521;
        }
    }

    fn finish(&self) -> u32 {
        (self.b << 16) | self.a
    }
}

const MAX_DISTANCE: usize = 32768;
const MAX_MATCH: usize = 258;

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

/// One final deflate block with fixed Huffman codes (RFC 1951 §3.2.6).
struct Deflater {
    out: Vec<u8>,
    acc: u64,
    nbits: u32,
}

impl Deflater {
    fn new() -> Self {
        let mut d = Self {
            out: Vec::new(),
            acc: 0,
            nbits: 0,
        };
        d.bits(1, 1); // BFINAL
        d.bits(1, 2); // BTYPE = 01 (fixed Huffman)
        d
    }

    /// Appends `n` bits of `value`, least significant first (deflate's bit order).
    fn bits(&mut self, value: u32, n: u32) {
        self.acc |= u64::from(value) << self.nbits;
        self.nbits += n;
        while self.nbits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.nbits -= 8;
        }
    }

    /// Huffman codes are defined most significant bit first, so reverse them.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = code.reverse_bits() >> (32 - len);
        self.bits(reversed, len);
    }

    fn symbol(&mut self, sym: u16) {
        let s = u32::from(sym);
        match sym {
            0..=143 => self.code(0x30 + s, 8),
            144..=255 => self.code(0x190 + (s - 144), 9),
            256..=279 => self.code(s - 256, 7),
            _ => self.code(0xc0 + (s - 280), 8),
        }
    }

    fn literal(&mut self, byte: u8) {
        self.symbol(u16::from(byte));
    }

    /// A back-reference; `len` in 3..=258, `dist` in 1..=32768.
    fn backref(&mut self, len: usize, dist: usize) {
        let li = LEN_BASE
            .iter()
            .rposition(|&b| usize::from(b) <= len)
            .unwrap_or(0);
        self.symbol(257 + li as u16);
        let le = u32::from(LEN_EXTRA[li]);
        if le > 0 {
            self.bits((len - usize::from(LEN_BASE[li])) as u32, le);
        }
        let di = DIST_BASE
            .iter()
            .rposition(|&b| usize::from(b) <= dist)
            .unwrap_or(0);
        self.code(di as u32, 5);
        let de = u32::from(DIST_EXTRA[di]);
        if de > 0 {
            self.bits((dist - usize::from(DIST_BASE[di])) as u32, de);
        }
    }

    /// Encodes `total` bytes equal to the bytes `dist` back, in legal match sizes.
    /// Callers pass whole rows (at least 4 bytes), so every piece is a legal match.
    fn repeat(&mut self, mut total: usize, dist: usize) {
        debug_assert!(total >= 3);
        while total > 0 {
            let len = if total > MAX_MATCH {
                // Never leave a tail shorter than the minimum match.
                if total - MAX_MATCH < 3 {
                    total - 3
                } else {
                    MAX_MATCH
                }
            } else {
                total
            };
            self.backref(len, dist);
            total -= len;
        }
    }

    /// Greedy: repeat the previous pixel (3 bytes back) where possible, else literals.
    fn row(&mut self, row: &[u8]) {
        let mut i = 0;
        while i < row.len() {
            let mut run = 0;
            if i >= 3 {
                while i + run < row.len() && run < MAX_MATCH && row[i + run] == row[i + run - 3] {
                    run += 1;
                }
            }
            if run >= 3 {
                self.backref(run, 3);
                i += run;
            } else {
                self.literal(row[i]);
                i += 1;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.symbol(256); // end of block
        if self.nbits > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads width and height back from IHDR and checks every chunk CRC.
    fn parse(png: &[u8]) -> (u32, u32, Vec<u8>) {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut pos = 8;
        let mut dims = (0, 0);
        let mut idat = Vec::new();
        while pos < png.len() {
            let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
            let kind = &png[pos + 4..pos + 8];
            let data = &png[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(png[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            assert_eq!(h.finalize(), crc);
            if kind == b"IHDR" {
                dims = (
                    u32::from_be_bytes(data[..4].try_into().unwrap()),
                    u32::from_be_bytes(data[4..8].try_into().unwrap()),
                );
            }
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            pos += 12 + len;
        }
        (dims.0, dims.1, idat)
    }

    /// A fixed-Huffman-only inflater, enough to prove our encoder's output decodes.
    fn inflate_fixed(data: &[u8]) -> Vec<u8> {
        struct Bits<'a> {
            d: &'a [u8],
            pos: usize,
        }
        impl Bits<'_> {
            fn bit(&mut self) -> u32 {
                let b = (self.d[self.pos / 8] >> (self.pos % 8)) & 1;
                self.pos += 1;
                u32::from(b)
            }
            fn bits(&mut self, n: u8) -> u32 {
                (0..n).map(|i| self.bit() << i).sum()
            }
            fn huff(&mut self, n: u32) -> u32 {
                (0..n).fold(0, |acc, _| (acc << 1) | self.bit())
            }
        }
        let mut b = Bits { d: data, pos: 0 };
        assert_eq!(b.bits(1), 1);
        assert_eq!(b.bits(2), 1);
        let mut out: Vec<u8> = Vec::new();
        loop {
            let mut code = b.huff(7);
            let sym = if code <= 0x17 {
                code + 256
            } else {
                code = (code << 1) | b.bit();
                if (0x30..=0xbf).contains(&code) {
                    code - 0x30
                } else if (0xc0..=0xc7).contains(&code) {
                    code - 0xc0 + 280
                } else {
                    code = (code << 1) | b.bit();
                    code - 0x190 + 144
                }
            };
            match sym {
                0..=255 => out.push(sym as u8),
                256 => break,
                _ => {
                    let li = (sym - 257) as usize;
                    let len = usize::from(LEN_BASE[li]) + b.bits(LEN_EXTRA[li]) as usize;
                    let di = b.huff(5) as usize;
                    let dist = usize::from(DIST_BASE[di]) + b.bits(DIST_EXTRA[di]) as usize;
                    for _ in 0..len {
                        out.push(out[out.len() - dist]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn png_roundtrips_through_an_inflater() {
        for (w, h) in [(1, 1), (2, 3), (64, 64), (130, 70), (300, 129)] {
            let png = render(w, h, 42, "a cat");
            let (pw, ph, idat) = parse(&png);
            assert_eq!((pw, ph), (w, h));
            assert_eq!(&idat[..2], &[0x78, 0x01]);
            let raw = inflate_fixed(&idat[2..idat.len() - 4]);
            assert_eq!(raw.len(), (h * (1 + 3 * w)) as usize);
            let mut adler = Adler32::new();
            adler.update(&raw);
            assert_eq!(
                adler.finish().to_be_bytes(),
                idat[idat.len() - 4..],
                "adler32"
            );
            // Every row starts with filter 0.
            for y in 0..h as usize {
                assert_eq!(raw[y * (1 + 3 * w as usize)], 0);
            }
        }
    }

    #[test]
    fn arbitrary_rows_roundtrip() {
        // Noise and long runs mixed, to exercise literals, short and long matches.
        let (w, h) = (200u32, 40u32);
        let mut expected = Vec::new();
        let png = encode_rgb(w, h, |y, row| {
            for (i, b) in row.iter_mut().enumerate() {
                *b = if y % 3 == 0 {
                    (splitmix(u64::from(y) * 1000 + i as u64) & 0xff) as u8
                } else if y % 3 == 1 {
                    (i / 30) as u8
                } else {
                    7
                };
            }
            expected.push(0);
            expected.extend_from_slice(row);
        });
        let (_, _, idat) = parse(&png);
        assert_eq!(inflate_fixed(&idat[2..idat.len() - 4]), expected);
    }

    #[test]
    fn deterministic_and_small() {
        let a = render(1024, 768, 7, "dog");
        assert_eq!(a, render(1024, 768, 7, "dog"));
        assert_ne!(a, render(1024, 768, 8, "dog"));
        assert_ne!(a, render(1024, 768, 7, "cat"));
        assert!(a.len() < 200_000, "{} bytes", a.len());
    }
}
