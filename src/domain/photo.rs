//! Training photos, judged by their bytes: the format from the magic number (never the file
//! name), the size, and the picture itself, decoded in full within limits on pixels and
//! memory, with its width and height as displayed (after EXIF orientation).

use image::error::{ImageError, LimitErrorKind};
use image::metadata::Orientation;
use image::{ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Read, Seek, SeekFrom};
use utoipa::ToSchema;

/// The formats FAL's trainers take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PhotoFormat {
    Jpeg,
    Png,
    Webp,
}

impl PhotoFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
            Self::Webp => "webp",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
            Self::Webp => "WEBP",
        }
    }

    fn image_format(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::Webp => image::ImageFormat::WebP,
        }
    }
}

/// The limits a photo must meet (seed-features.md §1), and those that keep decoding it cheap:
/// a file of a few kilobytes may claim billions of pixels.
#[derive(Debug, Clone, Copy)]
pub struct PhotoLimits {
    pub max_bytes: usize,
    pub min_short_side: u32,
    /// Longest side, in pixels.
    pub max_side: u32,
    /// Most pixels (width × height).
    pub max_pixels: u64,
    /// Most memory the decoder may use, the decoded picture included.
    pub max_decode_bytes: u64,
}

impl Default for PhotoLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            min_short_side: 512,
            max_side: 12_000,
            max_pixels: 40_000_000,
            max_decode_bytes: 256 * 1024 * 1024,
        }
    }
}

/// How many leading bytes [`sniff`] needs to tell the formats apart.
pub const SNIFF_BYTES: usize = 16;

/// A photo that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPhoto {
    pub format: PhotoFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: usize,
    pub sha256: String,
}

/// A photo's picture, decoded: its size as it is displayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedPhoto {
    pub width: u32,
    pub height: u32,
}

/// Why a photo is refused, in words that name what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhotoProblem {
    #[error("the file is empty")]
    Empty,
    #[error("the file is {bytes} bytes; the limit is {limit}")]
    TooLarge { bytes: u64, limit: usize },
    #[error("the file is {0}, not JPEG, PNG or WEBP")]
    WrongFormat(&'static str),
    #[error("the {0} is truncated: the file ends before the picture does")]
    Truncated(&'static str),
    #[error("the {format} is damaged: {reason}")]
    Damaged {
        format: &'static str,
        reason: String,
    },
    #[error("the image is wider or taller than {max_side} px, the most accepted")]
    SideTooLong { max_side: u32 },
    #[error("the image is {width}x{height}, over the limit of {max_pixels} pixels")]
    TooManyPixels {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("decoding the image would take more than {limit} bytes of memory")]
    TooCostly { limit: u64 },
    #[error("the image is {width}x{height}; its shorter side must be at least {min} px")]
    TooSmall { width: u32, height: u32, min: u32 },
}

/// Checks one photo held in memory: its size, its format, and its picture.
pub fn check_photo(bytes: &[u8], limits: PhotoLimits) -> Result<CheckedPhoto, PhotoProblem> {
    check_size(bytes.len() as u64, limits)?;
    let format = sniff(bytes)?;
    let decoded = decode_photo(std::io::Cursor::new(bytes), format, limits)?;
    Ok(CheckedPhoto {
        format,
        width: decoded.width,
        height: decoded.height,
        bytes: bytes.len(),
        sha256: hex::encode(Sha256::digest(bytes)),
    })
}

/// The size rules, which can be applied before a byte of the picture is looked at.
pub fn check_size(bytes: u64, limits: PhotoLimits) -> Result<(), PhotoProblem> {
    if bytes == 0 {
        return Err(PhotoProblem::Empty);
    }
    if bytes > limits.max_bytes as u64 {
        return Err(PhotoProblem::TooLarge {
            bytes,
            limit: limits.max_bytes,
        });
    }
    Ok(())
}

/// The format, from the file's first [`SNIFF_BYTES`] bytes (or all of them, if fewer).
pub fn sniff(head: &[u8]) -> Result<PhotoFormat, PhotoProblem> {
    if head.is_empty() {
        Err(PhotoProblem::Empty)
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(PhotoFormat::Png)
    } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(PhotoFormat::Jpeg)
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Ok(PhotoFormat::Webp)
    } else {
        Err(PhotoProblem::WrongFormat(identify_other(head)))
    }
}

/// Decodes the whole picture that `reader` holds, as `format`, and applies the pixel rules to
/// its displayed size. The dimensions are checked from the header before anything is decoded,
/// so a picture that claims more pixels than allowed costs nothing; the decoder itself is held
/// to `max_side` and `max_decode_bytes`.
pub fn decode_photo<R: BufRead + Seek>(
    mut reader: R,
    format: PhotoFormat,
    limits: PhotoLimits,
) -> Result<DecodedPhoto, PhotoProblem> {
    let refused = |err: ImageError| refusal(format, limits, err);
    let cut_short = match format {
        PhotoFormat::Webp => webp_cut_short(&mut reader),
        PhotoFormat::Jpeg => jpeg_cut_short(&mut reader),
        PhotoFormat::Png => Ok(false),
    };
    if cut_short.map_err(|err| refused(ImageError::IoError(err)))? {
        return Err(PhotoProblem::Truncated(format.name()));
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_decode_bytes);
    let mut reader = ImageReader::with_format(reader, format.image_format());
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(refused)?;
    let (stored_width, stored_height) = decoder.dimensions();
    let orientation = decoder.orientation().map_err(refused)?;
    let (width, height) = if turns_sideways(orientation) {
        (stored_height, stored_width)
    } else {
        (stored_width, stored_height)
    };
    if width == 0 || height == 0 {
        return Err(PhotoProblem::Damaged {
            format: format.name(),
            reason: format!("it claims a size of {width}x{height}"),
        });
    }
    if width.max(height) > limits.max_side {
        return Err(PhotoProblem::SideTooLong {
            max_side: limits.max_side,
        });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PhotoProblem::TooManyPixels {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    if width.min(height) < limits.min_short_side {
        return Err(PhotoProblem::TooSmall {
            width,
            height,
            min: limits.min_short_side,
        });
    }
    let needed = decoder.total_bytes();
    if needed > limits.max_decode_bytes {
        return Err(PhotoProblem::TooCostly {
            limit: limits.max_decode_bytes,
        });
    }
    let mut pixels = Vec::new();
    pixels
        .try_reserve_exact(needed as usize)
        .map_err(|_| PhotoProblem::TooCostly {
            limit: limits.max_decode_bytes,
        })?;
    pixels.resize(needed as usize, 0);
    decoder.read_image(&mut pixels).map_err(refused)?;
    Ok(DecodedPhoto { width, height })
}

/// Whether a WEBP file is shorter than its RIFF header says: its decoder reports a file cut
/// short as a corrupt bitstream, and the client deserves to hear which it is.
fn webp_cut_short<R: Read + Seek>(reader: &mut R) -> std::io::Result<bool> {
    let start = reader.stream_position()?;
    let end = reader.seek(SeekFrom::End(0))?;
    reader.seek(SeekFrom::Start(start + 4))?;
    let mut size = [0u8; 4];
    let read = reader.read_exact(&mut size);
    reader.seek(SeekFrom::Start(start))?;
    Ok(match read {
        Ok(()) => end - start < 8 + u64::from(u32::from_le_bytes(size)),
        Err(_) => true,
    })
}

/// Whether a JPEG stops before its end-of-image marker. Its decoder is lenient: it fills what is
/// missing with grey and calls the picture whole, so the end is looked for here. The marker
/// segments before the first scan are skipped by their lengths (an Exif thumbnail holds an end
/// marker of its own); within the scans a 0xFF byte of data is always followed by 0x00, so the
/// first 0xFF 0xD9 after the first scan is the picture's end.
fn jpeg_cut_short<R: Read + Seek>(reader: &mut R) -> std::io::Result<bool> {
    let start = reader.stream_position()?;
    let cut_short = jpeg_end_missing(&mut *reader);
    reader.seek(SeekFrom::Start(start))?;
    cut_short
}

fn jpeg_end_missing<R: Read>(reader: R) -> std::io::Result<bool> {
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, reader);
    let next = |reader: &mut std::io::BufReader<R>| -> std::io::Result<Option<u8>> {
        let byte = reader.fill_buf()?.first().copied();
        if byte.is_some() {
            reader.consume(1);
        }
        Ok(byte)
    };
    // SOI
    if next(&mut reader)?.is_none() || next(&mut reader)?.is_none() {
        return Ok(true);
    }
    loop {
        let Some(mut byte) = next(&mut reader)? else {
            return Ok(true);
        };
        if byte != 0xFF {
            // Not a marker where one must be: damaged, which the decoder will say.
            return Ok(false);
        }
        while byte == 0xFF {
            let Some(following) = next(&mut reader)? else {
                return Ok(true);
            };
            byte = following;
        }
        match byte {
            0xD9 => return Ok(false),
            0xDA => break,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(high), Some(low)) = (next(&mut reader)?, next(&mut reader)?) else {
            return Ok(true);
        };
        let length = u64::from(u16::from_be_bytes([high, low]).saturating_sub(2));
        let skipped = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink())?;
        if skipped < length {
            return Ok(true);
        }
    }
    // The scans: a chunk at a time, since they are nearly all of the file.
    let mut after_ff = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(true);
        }
        let ends_here =
            (after_ff && chunk[0] == 0xD9) || chunk.windows(2).any(|pair| pair == [0xFF, 0xD9]);
        if ends_here {
            return Ok(false);
        }
        after_ff = chunk.last() == Some(&0xFF);
        let consumed = chunk.len();
        reader.consume(consumed);
    }
}

/// Whether the picture is displayed turned a quarter, so that its width and height swap.
fn turns_sideways(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

fn refusal(format: PhotoFormat, limits: PhotoLimits, err: ImageError) -> PhotoProblem {
    match err {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PhotoProblem::Truncated(format.name())
        }
        ImageError::Limits(limit) => match limit.kind() {
            LimitErrorKind::DimensionError => PhotoProblem::SideTooLong {
                max_side: limits.max_side,
            },
            _ => PhotoProblem::TooCostly {
                limit: limits.max_decode_bytes,
            },
        },
        other => {
            let reason = other.to_string();
            // Decoders that read from a buffer report the end of the data in their own words.
            let lower = reason.to_ascii_lowercase();
            if ["eof", "end of file", "truncat", "not enough bytes"]
                .iter()
                .any(|words| lower.contains(words))
            {
                PhotoProblem::Truncated(format.name())
            } else {
                PhotoProblem::Damaged {
                    format: format.name(),
                    reason,
                }
            }
        }
    }
}

/// A name for what the file is instead, so the refusal can say it.
fn identify_other(bytes: &[u8]) -> &'static str {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if starts(b"BM") {
        "a BMP image"
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        "a GIF image"
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        "a TIFF image"
    } else if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        "an ISO media file (HEIC, AVIF or video)"
    } else if starts(b"%PDF") {
        "a PDF document"
    } else if starts(b"PK\x03\x04") {
        "a ZIP archive"
    } else {
        "of an unknown kind"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ExtendedColorType, ImageEncoder};

    fn pixels(width: u32, height: u32) -> Vec<u8> {
        (0..width * height * 3)
            .map(|i| (i / 7 % 251) as u8)
            .collect()
    }

    /// Has `encoder` write a `width`×`height` picture of [`pixels`].
    fn encode(encoder: impl ImageEncoder, width: u32, height: u32) {
        encoder
            .write_image(
                &pixels(width, height),
                width,
                height,
                ExtendedColorType::Rgb8,
            )
            .unwrap();
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode(PngEncoder::new(&mut out), width, height);
        out
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode(JpegEncoder::new_with_quality(&mut out, 80), width, height);
        out
    }

    fn webp(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        encode(WebPEncoder::new_lossless(&mut out), width, height);
        out
    }

    /// `jpeg` with an Exif APP1 segment right after SOI carrying `orientation`.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes());
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, no next IFD
        let mut segment = b"Exif\0\0".to_vec();
        segment.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&(segment.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(&segment);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n\0\0\0\x0d".to_vec();
        out.extend_from_slice(&ihdr);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&ihdr);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
        out
    }

    #[test]
    fn formats_and_sizes_come_from_the_pixels() {
        let limits = PhotoLimits::default();
        let p = check_photo(&png(1024, 768), limits).unwrap();
        assert_eq!((p.format, p.width, p.height), (PhotoFormat::Png, 1024, 768));
        let j = check_photo(&jpeg(600, 800), limits).unwrap();
        assert_eq!((j.format, j.width, j.height), (PhotoFormat::Jpeg, 600, 800));
        let w = check_photo(&webp(700, 600), limits).unwrap();
        assert_eq!((w.format, w.width, w.height), (PhotoFormat::Webp, 700, 600));
        assert_eq!(p.sha256.len(), 64);
    }

    #[test]
    fn the_size_is_the_displayed_one() {
        let limits = PhotoLimits::default();
        let stored = jpeg(600, 800);
        // Orientation 6: stored upright 600x800, displayed turned a quarter.
        let turned = check_photo(&with_orientation(&stored, 6), limits).unwrap();
        assert_eq!((turned.width, turned.height), (800, 600));
        let upside_down = check_photo(&with_orientation(&stored, 3), limits).unwrap();
        assert_eq!((upside_down.width, upside_down.height), (600, 800));
        let plain = check_photo(&with_orientation(&stored, 1), limits).unwrap();
        assert_eq!((plain.width, plain.height), (600, 800));
        // The shorter side is judged on the displayed picture.
        assert_eq!(
            check_photo(&with_orientation(&jpeg(400, 900), 8), limits),
            Err(PhotoProblem::TooSmall {
                width: 900,
                height: 400,
                min: 512
            })
        );
    }

    #[test]
    fn truncated_pictures_are_refused() {
        let limits = PhotoLimits::default();
        let whole = png(640, 600);
        assert_eq!(
            check_photo(&whole[..24], limits),
            Err(PhotoProblem::Truncated("PNG"))
        );
        assert_eq!(
            check_photo(&whole[..whole.len() / 2], limits),
            Err(PhotoProblem::Truncated("PNG"))
        );
        let whole = webp(640, 600);
        assert_eq!(
            check_photo(&whole[..whole.len() / 2], limits),
            Err(PhotoProblem::Truncated("WEBP"))
        );
        let whole = jpeg(640, 600);
        assert_eq!(
            check_photo(&whole[..whole.len() / 2], limits),
            Err(PhotoProblem::Truncated("JPEG"))
        );
        // An Exif thumbnail's end marker is not the picture's end.
        let mut thumbnail = with_orientation(&whole, 1);
        let app1_length = u16::from_be_bytes([thumbnail[4], thumbnail[5]]);
        thumbnail[4..6].copy_from_slice(&(app1_length + 4).to_be_bytes());
        let app1_end = 4 + usize::from(app1_length);
        thumbnail.splice(app1_end..app1_end, [0xFF, 0xD8, 0xFF, 0xD9]);
        assert!(check_photo(&thumbnail, limits).is_ok());
        assert_eq!(
            check_photo(&thumbnail[..thumbnail.len() - 100], limits),
            Err(PhotoProblem::Truncated("JPEG"))
        );
        // Bytes after the end, as some cameras write, are no harm.
        let mut trailer = whole.clone();
        trailer.extend_from_slice(b"camera trailer");
        assert!(check_photo(&trailer, limits).is_ok());
    }

    #[test]
    fn damaged_pictures_are_refused() {
        let limits = PhotoLimits::default();
        let mut damaged = png(640, 600);
        let middle = damaged.len() / 2;
        for byte in &mut damaged[middle..middle + 16] {
            *byte ^= 0x5A;
        }
        assert!(
            matches!(
                check_photo(&damaged, limits),
                Err(PhotoProblem::Damaged { format: "PNG", .. })
            ),
            "{:?}",
            check_photo(&damaged, limits)
        );
        let mut garbage = vec![0xFF, 0xD8, 0xFF, 0xE0];
        garbage.extend((0..4000u32).map(|i| (i * 31 % 256) as u8));
        assert!(matches!(
            check_photo(&garbage, limits),
            Err(PhotoProblem::Damaged { format: "JPEG", .. } | PhotoProblem::Truncated("JPEG"))
        ));
    }

    #[test]
    fn oversized_pictures_are_refused_before_decoding() {
        let limits = PhotoLimits::default();
        // A header alone claiming 100000x100000 pixels.
        let liar = png_header(100_000, 100_000);
        assert_eq!(liar.len(), 33);
        assert_eq!(
            check_photo(&liar, limits),
            Err(PhotoProblem::SideTooLong { max_side: 12_000 })
        );
        let few_pixels = PhotoLimits {
            max_pixels: 1_000_000,
            ..limits
        };
        assert_eq!(
            check_photo(&png(1200, 900), few_pixels),
            Err(PhotoProblem::TooManyPixels {
                width: 1200,
                height: 900,
                max_pixels: 1_000_000
            })
        );
        // Within the pixel count, but more memory than allowed to decode (3 bytes a pixel).
        let little_memory = PhotoLimits {
            max_decode_bytes: 1_000_000,
            ..limits
        };
        assert_eq!(
            check_photo(&png(600, 600), little_memory),
            Err(PhotoProblem::TooCostly { limit: 1_000_000 })
        );
    }

    #[test]
    fn refusals_say_what_the_file_is() {
        let limits = PhotoLimits::default();
        let bmp = b"BM\x36\x00\x0c\x00\x00\x00".to_vec();
        assert_eq!(
            check_photo(&bmp, limits),
            Err(PhotoProblem::WrongFormat("a BMP image"))
        );
        assert_eq!(check_photo(b"", limits), Err(PhotoProblem::Empty));
        assert_eq!(
            check_photo(&png(300, 900), limits),
            Err(PhotoProblem::TooSmall {
                width: 300,
                height: 900,
                min: 512
            })
        );
        let big = PhotoLimits {
            max_bytes: 10,
            ..limits
        };
        assert!(matches!(
            check_photo(&png(1024, 1024), big),
            Err(PhotoProblem::TooLarge { .. })
        ));
        assert_eq!(
            check_photo(&[0xFF, 0xD8, 0xFF], limits),
            Err(PhotoProblem::Truncated("JPEG"))
        );
    }
}

/// The longest caption a photo may have, in characters.
pub const MAX_CAPTION_CHARS: usize = 500;

/// A client's caption of a photo, trimmed: one line of printable text, 1 to
/// [`MAX_CAPTION_CHARS`] characters.
pub fn parse_caption(text: &str) -> Result<String, String> {
    let caption = text.trim();
    if caption.is_empty() {
        return Err("a caption must not be empty".into());
    }
    if caption.chars().count() > MAX_CAPTION_CHARS {
        return Err(format!(
            "a caption has at most {MAX_CAPTION_CHARS} characters"
        ));
    }
    if caption.chars().any(char::is_control) {
        return Err("a caption is one line of text, without control characters".into());
    }
    Ok(caption.to_owned())
}

#[cfg(test)]
mod caption_tests {
    use super::*;

    #[test]
    fn captions_are_one_trimmed_line_of_bounded_length() {
        assert_eq!(
            parse_caption("  in a red coat \n").unwrap(),
            "in a red coat"
        );
        assert!(parse_caption("   ").is_err());
        assert!(parse_caption("two\nlines").is_err());
        assert!(parse_caption(&"x".repeat(MAX_CAPTION_CHARS)).is_ok());
        assert!(parse_caption(&"é".repeat(MAX_CAPTION_CHARS + 1)).is_err());
    }
}
