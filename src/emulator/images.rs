//! Generated images in the format a request asked for (`output_format`): PNG from the
//! emulator's own streaming writer ([`super::png`]), JPEG and WebP from the `image` crate.
//! Every format draws the same picture ([`super::png::painter`]) at the size reported.

use image::ExtendedColorType;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;

use super::png;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// The format an `output_format` names. Without one the emulator draws PNG: FAL's
    /// defaults differ by endpoint (`jpeg` on FLUX.1), and PNG is what callers that name
    /// none have always received from the emulator.
    pub fn from_output_format(output_format: Option<&str>) -> Self {
        match output_format {
            Some("jpeg" | "jpg") => Self::Jpeg,
            Some("webp") => Self::Webp,
            _ => Self::Png,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// As FAL names its output files (`….jpeg`, not `….jpg`).
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }
}

/// The emulator's picture for `seed` and `prompt`, `width`×`height`, encoded as `format`.
///
/// PNG streams row by row. The JPEG and WebP encoders take the whole picture, 3 bytes a
/// pixel: callers bound that by checking the size against `max_image_pixels` first.
pub(crate) fn render(
    format: ImageFormat,
    width: u32,
    height: u32,
    seed: u64,
    prompt: &str,
) -> Result<Vec<u8>, String> {
    type Encode = fn(&mut Vec<u8>, &[u8], u32, u32) -> image::ImageResult<()>;
    let encode: Encode = match format {
        ImageFormat::Png => return Ok(png::render(width, height, seed, prompt)),
        ImageFormat::Jpeg => |out, pixels, w, h| {
            JpegEncoder::new_with_quality(out, JPEG_QUALITY).encode(
                pixels,
                w,
                h,
                ExtendedColorType::Rgb8,
            )
        },
        ImageFormat::Webp => |out, pixels, w, h| {
            WebPEncoder::new_lossless(out).encode(pixels, w, h, ExtendedColorType::Rgb8)
        },
    };
    let stride = 3 * width as usize;
    let mut pixels = vec![0u8; stride * height as usize];
    let mut paint = png::painter(width, height, seed, prompt);
    for (y, row) in pixels.chunks_exact_mut(stride.max(1)).enumerate() {
        paint(y as u32, row);
    }
    let mut out = Vec::new();
    encode(&mut out, &pixels, width, height)
        .map_err(|e| format!("encoding the image as {format:?}: {e}"))?;
    Ok(out)
}

const JPEG_QUALITY: u8 = 90;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format_decodes_to_the_same_size() {
        for (format, expected) in [
            (ImageFormat::Png, image::ImageFormat::Png),
            (ImageFormat::Jpeg, image::ImageFormat::Jpeg),
            (ImageFormat::Webp, image::ImageFormat::WebP),
        ] {
            let bytes = render(format, 96, 64, 7, "format").unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), expected);
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (96, 64), "{format:?}");
        }
    }

    #[test]
    fn output_formats_name_formats() {
        assert_eq!(
            ImageFormat::from_output_format(Some("jpeg")),
            ImageFormat::Jpeg
        );
        assert_eq!(
            ImageFormat::from_output_format(Some("webp")),
            ImageFormat::Webp
        );
        assert_eq!(
            ImageFormat::from_output_format(Some("png")),
            ImageFormat::Png
        );
        assert_eq!(ImageFormat::from_output_format(None), ImageFormat::Png);
    }
}
