//! The training archive: a ZIP of the avatar's photos, stored without compression (photos are
//! compressed already), built in memory.

use std::io::{Cursor, Write};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// One file of the archive.
pub struct Entry<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// A ZIP archive of `entries`, in order, each stored as it is.
pub fn zip(entries: &[Entry<'_>]) -> Result<Vec<u8>, zip::result::ZipError> {
    let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    for entry in entries {
        writer.start_file(entry.name, stored)?;
        writer.write_all(entry.bytes)?;
    }
    Ok(writer.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn archives_round_trip_stored_in_order() {
        let archive = zip(&[
            Entry {
                name: "01.jpg",
                bytes: b"first photo",
            },
            Entry {
                name: "02.png",
                bytes: b"second",
            },
        ])
        .unwrap();
        let mut read = zip::ZipArchive::new(Cursor::new(archive)).unwrap();
        assert_eq!(read.len(), 2);
        for (index, (name, bytes)) in [("01.jpg", &b"first photo"[..]), ("02.png", b"second")]
            .into_iter()
            .enumerate()
        {
            let mut file = read.by_index(index).unwrap();
            assert_eq!(file.name().unwrap(), name);
            assert_eq!(file.compression(), CompressionMethod::Stored);
            let mut content = Vec::new();
            file.read_to_end(&mut content).unwrap();
            assert_eq!(content, bytes);
        }
    }
}
