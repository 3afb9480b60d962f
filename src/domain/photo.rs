//! Training photos, judged by their bytes: the format from the magic number (never the file
//! name), the size, and the pixel dimensions read from the image header.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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
}

/// The limits a photo must meet (seed-features.md §1).
#[derive(Debug, Clone, Copy)]
pub struct PhotoLimits {
    pub max_bytes: usize,
    pub min_short_side: u32,
}

impl Default for PhotoLimits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            min_short_side: 512,
        }
    }
}

/// A photo that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPhoto {
    pub format: PhotoFormat,
    pub width: u32,
    pub height: u32,
    pub bytes: usize,
    pub sha256: String,
}

/// Why a photo is refused, in words that name what it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhotoProblem {
    #[error("the file is empty")]
    Empty,
    #[error("the file is {bytes} bytes; the limit is {limit}")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the file is {0}, not JPEG, PNG or WEBP")]
    WrongFormat(&'static str),
    #[error("the {0} header is damaged: its size cannot be read")]
    Unreadable(&'static str),
    #[error("the image is {width}x{height}; its shorter side must be at least {min} px")]
    TooSmall { width: u32, height: u32, min: u32 },
}

/// Checks one photo's bytes against the limits.
pub fn check_photo(bytes: &[u8], limits: PhotoLimits) -> Result<CheckedPhoto, PhotoProblem> {
    if bytes.is_empty() {
        return Err(PhotoProblem::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(PhotoProblem::TooLarge {
            bytes: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let format = sniff(bytes)?;
    let (width, height) = match format {
        PhotoFormat::Png => png_size(bytes),
        PhotoFormat::Jpeg => jpeg_size(bytes),
        PhotoFormat::Webp => webp_size(bytes),
    }
    .filter(|(w, h)| *w > 0 && *h > 0)
    .ok_or(PhotoProblem::Unreadable(match format {
        PhotoFormat::Png => "PNG",
        PhotoFormat::Jpeg => "JPEG",
        PhotoFormat::Webp => "WEBP",
    }))?;
    if width.min(height) < limits.min_short_side {
        return Err(PhotoProblem::TooSmall {
            width,
            height,
            min: limits.min_short_side,
        });
    }
    Ok(CheckedPhoto {
        format,
        width,
        height,
        bytes: bytes.len(),
        sha256: hex::encode(Sha256::digest(bytes)),
    })
}

fn sniff(bytes: &[u8]) -> Result<PhotoFormat, PhotoProblem> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Ok(PhotoFormat::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(PhotoFormat::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Ok(PhotoFormat::Webp)
    } else {
        Err(PhotoProblem::WrongFormat(identify_other(bytes)))
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

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    // The first chunk is IHDR: length, "IHDR", width, height.
    (bytes.get(12..16)? == b"IHDR").then_some(())?;
    Some((be32(bytes, 16)?, be32(bytes, 20)?))
}

fn jpeg_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let mut at = 2;
    loop {
        // Skip fill bytes before a marker.
        while *bytes.get(at)? == 0xFF && *bytes.get(at + 1)? == 0xFF {
            at += 1;
        }
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        let length = u16::from_be_bytes([*bytes.get(at + 2)?, *bytes.get(at + 3)?]) as usize;
        let is_frame = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_frame {
            let height = u16::from_be_bytes([*bytes.get(at + 5)?, *bytes.get(at + 6)?]);
            let width = u16::from_be_bytes([*bytes.get(at + 7)?, *bytes.get(at + 8)?]);
            return Some((u32::from(width), u32::from(height)));
        }
        if marker == 0xD9 || marker == 0xDA || length < 2 {
            return None;
        }
        at += 2 + length;
    }
}

fn webp_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let chunk = bytes.get(12..16)?;
    let le24 = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 3)?;
        Some(u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16)
    };
    match chunk {
        b"VP8 " => {
            // Frame tag (3 bytes), start code 9d 01 2a, then 14-bit width and height.
            (bytes.get(23..26)? == [0x9d, 0x01, 0x2a]).then_some(())?;
            let w = u16::from_le_bytes([*bytes.get(26)?, *bytes.get(27)?]) & 0x3FFF;
            let h = u16::from_le_bytes([*bytes.get(28)?, *bytes.get(29)?]) & 0x3FFF;
            Some((u32::from(w), u32::from(h)))
        }
        b"VP8L" => {
            (*bytes.get(20)? == 0x2F).then_some(())?;
            let bits = u32::from_le_bytes(bytes.get(21..25)?.try_into().ok()?);
            Some(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        }
        b"VP8X" => Some((le24(24)? + 1, le24(27)? + 1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        bytes
    }

    fn jpeg(width: u16, height: u16) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0x4A, 0x46];
        bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&[0x03; 10]);
        bytes
    }

    fn webp_vp8x(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        bytes.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
        bytes.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
        bytes
    }

    #[test]
    fn formats_and_sizes_come_from_the_bytes() {
        let limits = PhotoLimits::default();
        let p = check_photo(&png(1024, 768), limits).unwrap();
        assert_eq!((p.format, p.width, p.height), (PhotoFormat::Png, 1024, 768));
        let j = check_photo(&jpeg(600, 800), limits).unwrap();
        assert_eq!((j.format, j.width, j.height), (PhotoFormat::Jpeg, 600, 800));
        let w = check_photo(&webp_vp8x(2000, 1500), limits).unwrap();
        assert_eq!(
            (w.format, w.width, w.height),
            (PhotoFormat::Webp, 2000, 1500)
        );
        assert_eq!(p.sha256.len(), 64);
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
        let mut damaged = png(1024, 1024);
        damaged[12..16].copy_from_slice(b"XXXX");
        assert_eq!(
            check_photo(&damaged, limits),
            Err(PhotoProblem::Unreadable("PNG"))
        );
        assert_eq!(
            check_photo(&[0xFF, 0xD8, 0xFF], limits),
            Err(PhotoProblem::Unreadable("JPEG"))
        );
    }
}
