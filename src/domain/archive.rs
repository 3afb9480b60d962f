//! The training archive: a ZIP of the avatar's photos, stored without compression (photos are
//! compressed already), built in memory.

/// One file of the archive.
pub struct Entry<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// A ZIP archive of `entries`, in order. Fails past the classic ZIP limits (4 GiB, 65535
/// files), which a set of training photos never reaches.
pub fn zip(entries: &[Entry<'_>]) -> Result<Vec<u8>, &'static str> {
    if entries.len() > usize::from(u16::MAX) {
        return Err("too many files for a ZIP archive");
    }
    let mut out = Vec::new();
    let mut central = Vec::new();
    for entry in entries {
        let offset = u32::try_from(out.len()).map_err(|_| "archive over 4 GiB")?;
        let size = u32::try_from(entry.bytes.len()).map_err(|_| "file over 4 GiB")?;
        let name_len = u16::try_from(entry.name.len()).map_err(|_| "file name too long")?;
        let crc = crc32fast::hash(entry.bytes);
        // Local file header.
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&20u16.to_le_bytes()); // version needed
        out.extend_from_slice(&0x0800u16.to_le_bytes()); // UTF-8 names
        out.extend_from_slice(&0u16.to_le_bytes()); // stored
        out.extend_from_slice(&[0, 0, 0x21, 0]); // time 00:00, date 1980-01-01
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(entry.name.as_bytes());
        out.extend_from_slice(entry.bytes);
        // Central directory record.
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        central.extend_from_slice(&20u16.to_le_bytes()); // needed
        central.extend_from_slice(&0x0800u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&[0, 0, 0x21, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&name_len.to_le_bytes());
        central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(entry.name.as_bytes());
    }
    let central_offset = u32::try_from(out.len()).map_err(|_| "archive over 4 GiB")?;
    let central_size = u32::try_from(central.len()).map_err(|_| "archive over 4 GiB")?;
    out.extend_from_slice(&central);
    let count = entries.len() as u16;
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&central_size.to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    Ok(out)
}

/// The files of a ZIP archive written by [`zip`] (stored entries), by name: for tests and
/// checks, not a general reader.
pub fn unzip_stored(archive: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut at = 0;
    let le16 = |at: usize| -> Option<usize> {
        Some(u16::from_le_bytes(archive.get(at..at + 2)?.try_into().ok()?) as usize)
    };
    let le32 = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            archive.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    while le32(at)? == 0x0403_4b50 {
        let crc = le32(at + 14)?;
        let size = le32(at + 18)? as usize;
        let name_len = le16(at + 26)?;
        let extra = le16(at + 28)?;
        let name = String::from_utf8(archive.get(at + 30..at + 30 + name_len)?.to_vec()).ok()?;
        let start = at + 30 + name_len + extra;
        let bytes = archive.get(start..start + size)?.to_vec();
        if crc32fast::hash(&bytes) != crc {
            return None;
        }
        files.push((name, bytes));
        at = start + size;
    }
    Some(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_round_trip_with_checksums() {
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
        let files = unzip_stored(&archive).unwrap();
        assert_eq!(
            files,
            vec![
                ("01.jpg".into(), b"first photo".to_vec()),
                ("02.png".into(), b"second".to_vec())
            ]
        );
        // End of central directory: two entries.
        let tail = &archive[archive.len() - 22..];
        assert_eq!(&tail[..4], &0x0605_4b50u32.to_le_bytes());
        assert_eq!(u16::from_le_bytes([tail[10], tail[11]]), 2);
        let mut damaged = archive.clone();
        damaged[40] ^= 0xFF;
        assert!(unzip_stored(&damaged).is_none());
    }
}
