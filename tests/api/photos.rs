//! Photo uploads under hostile input: pictures that are cut short, lie about their size or
//! inflate to gigabytes, files over the limits, bodies over the limit, and more uploads at once
//! than allowed. Every file is streamed to disk, and nothing of it is left there afterwards.

use crate::backend_tests;
use crate::support::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A body sent chunk by chunk (chunked transfer encoding, no length announced), as a client
/// streaming a large file sends it.
fn streamed(chunks: Vec<Vec<u8>>) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, std::io::Error>),
    ))
}

async fn kept_photos(app: &TestApp, avatar: &str) -> Vec<Value> {
    app.get_json(&format!("/v1/avatars/{avatar}/photos")).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

/// Where uploads are written while they arrive.
fn partial_dir(app: &TestApp) -> PathBuf {
    app.app.state().config.avatars.storage_dir.join(".partial")
}

fn partial_files(app: &TestApp) -> usize {
    std::fs::read_dir(partial_dir(app)).map_or(0, |entries| entries.count())
}

/// Waits until no upload's temporary file is left.
async fn wait_for_no_partial_files(app: &TestApp) {
    eventually("the temporary upload files to be removed")
        .until(async || (partial_files(app) == 0).then_some(()))
        .await;
}

/// A 1-bit greyscale PNG of `width`×`height`, all black: a decompression bomb, as its pixels
/// compress about a thousand to one. Written by hand (one fixed-Huffman deflate block of
/// repeats) so that making it never holds the pixels.
fn blank_png(width: u32, height: u32) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        count: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, count: u32) {
            self.acc |= value << self.count;
            self.count += count;
            while self.count >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.count -= 8;
            }
        }
        /// A Huffman code, which deflate stores most significant bit first.
        fn code(&mut self, code: u32, count: u32) {
            self.put(code.reverse_bits() >> (32 - count), count);
        }
    }
    let raw = (1 + width.div_ceil(8) as u64) * u64::from(height);
    let mut bits = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        count: 0,
    };
    bits.put(1, 1); // the final block
    bits.put(1, 2); // fixed Huffman codes
    bits.code(0x30, 8); // literal 0
    let mut left = raw - 1;
    while left >= 258 {
        bits.code(0xC5, 8); // length 258
        bits.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        bits.code(0x30, 8);
    }
    bits.code(0, 7); // end of block
    if bits.count > 0 {
        bits.out.push(bits.acc as u8);
    }
    let adler = (((raw % 65521) as u32) << 16) | 1;
    bits.out.extend_from_slice(&adler.to_be_bytes());

    let mut png = png_header(width, height, 1, 0);
    chunk(&mut png, b"IDAT", &bits.out);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// A PNG's signature and header chunk alone: 33 bytes.
fn png_header(width: u32, height: u32, bit_depth: u8, colour_type: u8) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, colour_type, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    png
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    png.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// A JPEG stored `width`×`height` with an Exif segment giving `orientation`.
fn oriented_jpeg(width: u32, height: u32, orientation: u16) -> Vec<u8> {
    use image::ImageEncoder;
    let pixels: Vec<u8> = (0..width * height * 3)
        .map(|i| (i / 5 % 253) as u8)
        .collect();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .write_image(&pixels, width, height, image::ExtendedColorType::Rgb8)
        .unwrap();
    // APP1 "Exif": a big-endian TIFF header and one IFD with the Orientation tag (SHORT).
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
    exif.extend_from_slice(&1u16.to_be_bytes());
    exif.extend_from_slice(&0x0112u16.to_be_bytes());
    exif.extend_from_slice(&3u16.to_be_bytes());
    exif.extend_from_slice(&1u32.to_be_bytes());
    exif.extend_from_slice(&orientation.to_be_bytes());
    exif.extend_from_slice(&[0; 6]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&(exif.len() as u16 + 2).to_be_bytes());
    out.extend_from_slice(&exif);
    out.extend_from_slice(&jpeg[2..]);
    out
}

backend_tests!(pictures_cut_short_lying_or_inflating_are_refused_by_name);
async fn pictures_cut_short_lying_or_inflating_are_refused_by_name(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let good = photo(1, 640, 512);
    let cut = good[..24].to_vec();
    let second = photo(2, 640, 512);
    let cut_halfway = second[..second.len() / 2].to_vec();
    // Signature and IHDR alone, claiming 100000x100000 RGB pixels.
    let liar = png_header(100_000, 100_000, 8, 2);
    assert_eq!(liar.len(), 33);
    let bomb = blank_png(20_000, 20_000);
    assert!(bomb.len() < 1 << 20, "the bomb is {} bytes", bomb.len());
    let mut damaged = photo(3, 640, 512);
    let middle = damaged.len() / 2;
    for byte in &mut damaged[middle..middle + 32] {
        *byte ^= 0x5A;
    }

    let started = Instant::now();
    let response = upload(
        app,
        &avatar,
        &[
            ("good.png", good),
            ("cut.png", cut),
            ("halfway.png", cut_halfway),
            ("liar.png", liar),
            ("bomb.png", bomb),
            ("damaged.png", damaged),
        ],
    )
    .await;
    let elapsed = started.elapsed();
    let body = validation_problem(response).await;
    let errors = refusals(&body);
    assert_eq!(errors.len(), 5, "{errors:?}");
    let expect = [
        ("files[1] (cut.png)", "truncated"),
        ("files[2] (halfway.png)", "truncated"),
        ("files[3] (liar.png)", "12000 px"),
        ("files[4] (bomb.png)", "12000 px"),
        ("files[5] (damaged.png)", "damaged"),
    ];
    for ((field, message), (want_field, want_words)) in errors.iter().zip(expect) {
        assert_eq!(field, want_field, "{errors:?}");
        assert!(message.contains(want_words), "{field}: {message}");
    }
    // The bomb was refused from its header (its message names the side limit), quickly.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let kept = kept_photos(app, &avatar).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["file_name"], "good.png");
    assert_eq!(body["accepted"], json!([kept[0]["id"]]));
    wait_for_no_partial_files(app).await;
}

backend_tests!(an_exif_rotated_jpeg_reports_its_displayed_size);
async fn an_exif_rotated_jpeg_reports_its_displayed_size(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    // Stored 600x800, shown turned a quarter (Exif orientation 6): 800x600.
    let response = upload(
        app,
        &avatar,
        &[
            ("turned.jpg", oriented_jpeg(600, 800, 6)),
            ("upright.jpg", oriented_jpeg(600, 800, 1)),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    let items = body["items"].as_array().unwrap();
    assert_eq!(items[0]["content_type"], "image/jpeg");
    assert_eq!(
        (&items[0]["width"], &items[0]["height"]),
        (&json!(800), &json!(600))
    );
    assert_eq!(
        (&items[1]["width"], &items[1]["height"]),
        (&json!(600), &json!(800))
    );
    let id = items[0]["id"].as_str().unwrap();
    let one = app
        .get_json(&format!("/v1/avatars/{avatar}/photos/{id}"))
        .await;
    assert_eq!((&one["width"], &one["height"]), (&json!(800), &json!(600)));
}

backend_tests!(
    a_file_over_the_size_limit_is_refused_by_name_and_the_others_kept,
    |config| {
        config.avatars.max_photo_bytes = 100_000;
        config.avatars.max_photos = 10;
        config.avatars.max_upload_bytes = 16 << 20;
    }
);
async fn a_file_over_the_size_limit_is_refused_by_name_and_the_others_kept(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let first = photo(1, 640, 512);
    let last = photo(2, 512, 640);
    assert!(first.len() < 100_000 && last.len() < 100_000);
    // Far larger than the limit, and than ten photos of the largest size together.
    let boundary = new_boundary();
    let mut opening = multipart(&boundary, &[("first.png", first)]);
    opening.truncate(opening.len() - format!("--{boundary}--\r\n").len());
    let mut chunks = vec![opening];
    chunks.push(part_head(&boundary, "huge.png"));
    chunks.push(b"\x89PNG\r\n\x1a\n".to_vec());
    chunks.extend((0..48).map(|_| vec![0x42u8; 64 << 10]));
    chunks.push(b"\r\n".to_vec());
    chunks.push(multipart(&boundary, &[("last.png", last)]));
    let response = post_photo_form(app, &avatar, &boundary, streamed(chunks)).await;
    let body = validation_problem(response).await;
    let errors = refusals(&body);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "files[1] (huge.png)");
    assert!(
        errors[0].1.contains(&format!("{} bytes", 8 + (48 << 16)))
            && errors[0].1.contains("limit is 100000"),
        "{errors:?}"
    );
    let kept = kept_photos(app, &avatar).await;
    let names: Vec<&str> = kept
        .iter()
        .map(|p| p["file_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first.png", "last.png"]);
    assert_eq!(body["accepted"].as_array().unwrap().len(), 2);
    wait_for_no_partial_files(app).await;
}

backend_tests!(
    a_body_over_the_upload_limit_is_413_and_nothing_is_kept,
    |config| {
        config.avatars.max_photo_bytes = 50_000;
        config.avatars.max_upload_bytes = 60_000;
    }
);
async fn a_body_over_the_upload_limit_is_413_and_nothing_is_kept(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let photos: Vec<(String, Vec<u8>)> = (0..8)
        .map(|n| (format!("p{n}.png"), photo(n, 640, 512)))
        .collect();
    let files: Vec<(&str, Vec<u8>)> = photos
        .iter()
        .map(|(name, bytes)| (name.as_str(), bytes.clone()))
        .collect();
    let boundary = new_boundary();
    let body = multipart(&boundary, &files);
    assert!(
        body.len() > 60_000 && body.len() < 200_000,
        "{}",
        body.len()
    );

    // Announced by its length: refused before a byte is read.
    let response = post_photo_form(app, &avatar, &boundary, body.clone()).await;
    let problem_doc = problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(
        problem_doc["detail"].as_str().unwrap().contains("60000"),
        "{problem_doc}"
    );

    // Streamed without a length: refused once the limit is crossed.
    let chunks: Vec<Vec<u8>> = body.chunks(4096).map(<[u8]>::to_vec).collect();
    let response = post_photo_form(app, &avatar, &boundary, streamed(chunks)).await;
    problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert!(kept_photos(app, &avatar).await.is_empty());
    wait_for_no_partial_files(app).await;

    // Within the limit, the same photos go through.
    let response = upload(app, &avatar, &files[..2]).await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// One upload at a time, so that a second is refused while the first is under way.
fn one_upload_at_a_time(config: &mut falgate::config::Config) {
    config.avatars.upload_concurrency = 1;
}

/// An upload under way: its first file is half sent, and the rest waits on `more`.
struct HalfSent {
    boundary: String,
    more: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    response: tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
}

/// Starts uploading `photo` as `name` to `path` and waits until its file is on disk.
async fn half_sent_upload(app: &TestApp, path: &str, name: &str, photo: &[u8]) -> HalfSent {
    let boundary = new_boundary();
    let (more, rest) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let mut first = part_head(&boundary, name);
    first.extend_from_slice(&photo[..photo.len() / 2]);
    more.send(Ok(first)).await.unwrap();
    let body =
        reqwest::Body::wrap_stream(futures_util::stream::unfold(rest, |mut rest| async move {
            rest.recv().await.map(|chunk| (chunk, rest))
        }));
    let response = tokio::spawn(
        app.request(Method::POST, path)
            .header("content-type", multipart_content_type(&boundary))
            .body(body)
            .send(),
    );
    eventually(format_args!("the upload of {name} to be written to disk"))
        .until(async || (partial_files(app) == 1).then_some(()))
        .await;
    HalfSent {
        boundary,
        more,
        response,
    }
}

/// POSTs a form with no file to `path`.
async fn upload_nothing(app: &TestApp, path: &str) -> reqwest::Response {
    let boundary = new_boundary();
    app.post_raw(
        path,
        Some(&multipart_content_type(&boundary)),
        multipart(&boundary, &[]),
    )
    .await
}

backend_tests!(
    a_second_upload_at_once_is_refused_until_the_first_is_done,
    one_upload_at_a_time
);
async fn a_second_upload_at_once_is_refused_until_the_first_is_done(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let path = format!("/v1/avatars/{avatar}/photos");
    let good = photo(7, 640, 512);
    let slow = half_sent_upload(app, &path, "slow.png", &good).await;

    // Another is refused at once, saying when to come back; an empty form would be a 422
    // had it been let in.
    let response = upload_nothing(app, &path).await;
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let busy = problem(response, StatusCode::SERVICE_UNAVAILABLE, "busy").await;
    assert!(
        busy["detail"].as_str().unwrap().contains("upload"),
        "{busy}"
    );

    // The first one finishes and is kept; its slot is free again.
    let mut tail = good[good.len() / 2..].to_vec();
    tail.extend_from_slice(format!("\r\n--{}--\r\n", slow.boundary).as_bytes());
    slow.more.send(Ok(tail)).await.unwrap();
    drop(slow.more);
    let response = slow.response.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = upload_nothing(app, &path).await;
    validation_problem(response).await;
    wait_for_no_partial_files(app).await;
    assert_eq!(kept_photos(app, &avatar).await.len(), 1);
}

backend_tests!(
    an_abandoned_upload_leaves_no_file_behind_and_frees_its_slot,
    one_upload_at_a_time
);
async fn an_abandoned_upload_leaves_no_file_behind_and_frees_its_slot(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let path = format!("/v1/avatars/{avatar}/photos");
    let abandoned = half_sent_upload(app, &path, "abandoned.png", &photo(7, 640, 512)).await;
    abandoned
        .more
        .send(Err(std::io::Error::other("the client gave up")))
        .await
        .unwrap();
    assert!(abandoned.response.await.unwrap().is_err());
    wait_for_no_partial_files(app).await;
    let response = upload(app, &avatar, &[("after.png", photo(8, 640, 512))]).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(kept_photos(app, &avatar).await.len(), 1);
}

backend_tests!(a_form_that_never_reaches_a_file_is_refused_not_buffered);
async fn a_form_that_never_reaches_a_file_is_refused_not_buffered(app: &TestApp) {
    let avatar = id_of(&create_avatar(app, "character").await);
    let boundary = new_boundary();
    // A preamble past the 1 MiB allowed that never names a part: the parser would have to
    // keep all of it.
    let body = vec![b'x'; 3 << 19];
    let response = post_photo_form(app, &avatar, &boundary, body).await;
    let problem = problem(response, StatusCode::BAD_REQUEST, "bad_request").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("neither files nor part headers"),
        "{problem}"
    );
    assert!(kept_photos(app, &avatar).await.is_empty());
}
