//! A minimal PNG writer (8-bit RGB) with a tiny deflate encoder.
//!
//! The emulator serves images whose real pixel size equals the width/height it reports,
//! so large sizes must stay cheap. The pictures are flat colour blocks under a caption of
//! large, flat letters; a greedy LZ77
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

/// Draws the emulator's deterministic picture as a PNG (see [`painter`]). Equal inputs give
/// equal bytes.
pub fn render(width: u32, height: u32, seed: u64, prompt: &str) -> Vec<u8> {
    encode_rgb(width, height, painter(width, height, seed, prompt))
}

/// The emulator's deterministic picture, one row at a time (`paint(y, row)` fills the
/// `3 * width` RGB bytes of row `y`): 64-pixel colour blocks derived from `seed` and a hash
/// of the prompt, under a white band that spells the prompt's first [`CAPTION_CHARS`]
/// characters (where falgate puts an avatar's trigger phrase), so that a person can tell
/// which picture answers which request. Every output format draws it.
pub fn painter(
    width: u32,
    height: u32,
    seed: u64,
    prompt: &str,
) -> impl FnMut(u32, &mut [u8]) + use<> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let key = h ^ seed.rotate_left(17);
    let caption = Caption::new(prompt, width, height);
    move |y, row| {
        if caption.draw_row(y, row) {
            return;
        }
        let by = u64::from(y / 64);
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let bx = (x / 64) as u64;
            let v = splitmix(key ^ (by << 32) ^ bx);
            px.copy_from_slice(&v.to_le_bytes()[..3]);
        }
    }
}

/// How much of a prompt the picture spells.
pub const CAPTION_CHARS: usize = 40;

/// The prompt's words laid out in the band at the top of the picture.
struct Caption {
    lines: Vec<Vec<u8>>,
    scale: u32,
    margin: u32,
}

impl Caption {
    fn new(prompt: &str, width: u32, height: u32) -> Self {
        let text: Vec<u8> = prompt
            .trim()
            .chars()
            .take(CAPTION_CHARS)
            .map(|c| match c {
                ' '..='~' => c as u8,
                c if c.is_whitespace() => b' ',
                _ => b'?',
            })
            .collect();
        // Letters grow with the picture, so that they stay legible on a large one.
        let mut scale = (width.min(height) / 256).clamp(1, 8);
        let fits = |scale: u32| width >= 2 * 2 * scale + GLYPH_W * scale;
        while scale > 1 && !fits(scale) {
            scale -= 1;
        }
        let margin = 2 * scale;
        let none = Self {
            lines: Vec::new(),
            scale,
            margin,
        };
        if text.is_empty() || !fits(scale) {
            return none;
        }
        let columns = ((width - 2 * margin) / (GLYPH_W * scale)) as usize;
        let rows = (height.saturating_sub(2 * margin) / (GLYPH_H * scale)) as usize;
        let lines: Vec<Vec<u8>> = wrap(&text, columns).into_iter().take(rows).collect();
        Self {
            lines,
            scale,
            margin,
        }
    }

    fn band_height(&self) -> u32 {
        if self.lines.is_empty() {
            0
        } else {
            2 * self.margin + self.lines.len() as u32 * GLYPH_H * self.scale
        }
    }

    /// Fills row `y` if it lies in the band; false when it is the picture's.
    fn draw_row(&self, y: u32, row: &mut [u8]) -> bool {
        if y >= self.band_height() {
            return false;
        }
        row.fill(0xff);
        let Some(ly) = y.checked_sub(self.margin).map(|v| v / self.scale) else {
            return true;
        };
        let (line, gy) = ((ly / GLYPH_H) as usize, ly % GLYPH_H);
        let Some(text) = self.lines.get(line) else {
            return true;
        };
        if gy >= 7 {
            return true;
        }
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let Some(lx) = (x as u32).checked_sub(self.margin).map(|v| v / self.scale) else {
                continue;
            };
            let (column, gx) = ((lx / GLYPH_W) as usize, lx % GLYPH_W);
            let Some(&c) = text.get(column) else { break };
            if gx < 5 && glyph(c)[gx as usize] >> gy & 1 == 1 {
                px.fill(0);
            }
        }
        true
    }
}

/// Greedy word wrap into lines of at most `columns` characters; a longer word is cut.
fn wrap(text: &[u8], columns: usize) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    for word in text.split(|&c| c == b' ').filter(|w| !w.is_empty()) {
        for piece in word.chunks(columns) {
            if !line.is_empty() && line.len() + 1 + piece.len() > columns {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(b' ');
            }
            line.extend_from_slice(piece);
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// A glyph's cell: five columns of ink and one of space, seven rows and one of space.
const GLYPH_W: u32 = 6;
const GLYPH_H: u32 = 8;

fn glyph(c: u8) -> &'static [u8; 5] {
    &FONT[usize::from(c.clamp(b' ', b'~') - b' ')]
}

/// The classic 5×7 font for printable ASCII (space to `~`): five columns a glyph, the top row
/// in the lowest bit.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5f, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7f, 0x14, 0x7f, 0x14], // #
    [0x24, 0x2a, 0x7f, 0x2a, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1c, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1c, 0x00], // )
    [0x14, 0x08, 0x3e, 0x08, 0x14], // *
    [0x08, 0x08, 0x3e, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3e, 0x51, 0x49, 0x45, 0x3e], // 0
    [0x00, 0x42, 0x7f, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4b, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7f, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3c, 0x4a, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1e], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3e], // @
    [0x7e, 0x11, 0x11, 0x11, 0x7e], // A
    [0x7f, 0x49, 0x49, 0x49, 0x36], // B
    [0x3e, 0x41, 0x41, 0x41, 0x22], // C
    [0x7f, 0x41, 0x41, 0x22, 0x1c], // D
    [0x7f, 0x49, 0x49, 0x49, 0x41], // E
    [0x7f, 0x09, 0x09, 0x09, 0x01], // F
    [0x3e, 0x41, 0x49, 0x49, 0x7a], // G
    [0x7f, 0x08, 0x08, 0x08, 0x7f], // H
    [0x00, 0x41, 0x7f, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3f, 0x01], // J
    [0x7f, 0x08, 0x14, 0x22, 0x41], // K
    [0x7f, 0x40, 0x40, 0x40, 0x40], // L
    [0x7f, 0x02, 0x0c, 0x02, 0x7f], // M
    [0x7f, 0x04, 0x08, 0x10, 0x7f], // N
    [0x3e, 0x41, 0x41, 0x41, 0x3e], // O
    [0x7f, 0x09, 0x09, 0x09, 0x06], // P
    [0x3e, 0x41, 0x51, 0x21, 0x5e], // Q
    [0x7f, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7f, 0x01, 0x01], // T
    [0x3f, 0x40, 0x40, 0x40, 0x3f], // U
    [0x1f, 0x20, 0x40, 0x20, 0x1f], // V
    [0x3f, 0x40, 0x38, 0x40, 0x3f], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7f, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7f, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7f, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7f], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7e, 0x09, 0x01, 0x02], // f
    [0x0c, 0x52, 0x52, 0x52, 0x3e], // g
    [0x7f, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7d, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3d, 0x00], // j
    [0x7f, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7f, 0x40, 0x00], // l
    [0x7c, 0x04, 0x18, 0x04, 0x78], // m
    [0x7c, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7c, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x18, 0x7c], // q
    [0x7c, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3f, 0x44, 0x40, 0x20], // t
    [0x3c, 0x40, 0x40, 0x20, 0x7c], // u
    [0x1c, 0x20, 0x40, 0x20, 0x1c], // v
    [0x3c, 0x40, 0x30, 0x40, 0x3c], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0c, 0x50, 0x50, 0x50, 0x3c], // y
    [0x44, 0x64, 0x54, 0x4c, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7f, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x02, 0x01, 0x02, 0x04, 0x02], // ~
];

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

    /// The band of text at the top: rows that are white but for black letters.
    fn band(png: &[u8]) -> (image::RgbImage, u32) {
        let picture = image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .expect("a PNG any decoder reads")
            .to_rgb8();
        let band = (0..picture.height())
            .take_while(|&y| {
                (0..picture.width()).all(|x| {
                    let p = picture.get_pixel(x, y).0;
                    p == [255; 3] || p == [0; 3]
                })
            })
            .count() as u32;
        (picture, band)
    }

    #[test]
    fn the_picture_spells_its_prompt() {
        let a = render(1024, 768, 7, "TOK_1a2b3c4d at the beach");
        let b = render(1024, 768, 7, "TOK_1a2b3c4d in a library");
        let (pa, band_a) = band(&a);
        let (pb, band_b) = band(&b);
        assert_eq!(pa.dimensions(), (1024, 768));
        assert!(band_a >= 7 && band_a == band_b, "{band_a} {band_b}");
        let ink = |p: &image::RgbImage| {
            (0..band_a)
                .flat_map(|y| (0..p.width()).map(move |x| (x, y)))
                .filter(|&(x, y)| p.get_pixel(x, y).0 == [0; 3])
                .collect::<Vec<_>>()
        };
        let (ink_a, ink_b) = (ink(&pa), ink(&pb));
        assert!(!ink_a.is_empty());
        assert_ne!(ink_a, ink_b, "two prompts, two captions");
        // The shared trigger phrase is drawn alike in both, at the start of the band.
        let left = |ink: &[(u32, u32)]| {
            ink.iter()
                .filter(|&&(x, _)| x < 200)
                .copied()
                .collect::<Vec<_>>()
        };
        assert_eq!(left(&ink_a), left(&ink_b));
        // The caption is the prompt's alone: another seed changes the picture, not the text.
        let (pc, band_c) = band(&render(1024, 768, 8, "TOK_1a2b3c4d at the beach"));
        assert_eq!(band_c, band_a);
        assert_eq!(ink(&pc), ink_a);

        // Small, narrow and long-worded pictures keep their size and decode.
        for (w, h, prompt) in [
            (1, 1, "x"),
            (7, 300, "abc"),
            (64, 64, "a long prompt that wraps onto several lines"),
            (640, 640, "Ünïcode ✓ and\ttabs"),
            (300, 40, "averyveryverylongwordwithoutanyspaces"),
        ] {
            let (p, _) = band(&render(w, h, 1, prompt));
            assert_eq!(p.dimensions(), (w, h), "{prompt}");
        }
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
