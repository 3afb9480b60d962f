//! falgate's own file storage: training photos and copies of trained LoRA files live here, not
//! only at FAL. A directory by default; each write lands in a temporary file first and is
//! renamed into place, so a crash never leaves half a file under a real key, and the
//! temporary files a crash leaves are swept at the next start.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where files are written before they are moved under their key.
const PARTIAL_DIR: &str = ".partial";
/// Temporary files older than this at start are a crash's leftovers: a LoRA download, the
/// longest write, is given 30 minutes.
const STALE_PARTIAL: Duration = Duration::from_secs(2 * 3600);

#[derive(Debug, Clone)]
pub struct Blobs {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("file storage: {0}")]
pub struct BlobError(String);

impl Blobs {
    /// Opens (creating if needed) the storage directory. Called once at start.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| BlobError(format!("cannot create {}: {e}", root.display())))?;
        let blobs = Self { root };
        blobs.sweep_partials(STALE_PARTIAL);
        Ok(blobs)
    }

    /// Removes temporary files older than `age`: what a killed process left half written.
    /// Younger ones may belong to another replica sharing the directory.
    fn sweep_partials(&self, age: Duration) {
        let Ok(entries) = std::fs::read_dir(self.root.join(PARTIAL_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified.elapsed().is_ok_and(|elapsed| elapsed >= age));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        // Keys are made by us from ids; refuse anything that could leave the root anyway.
        let fine = !key.is_empty()
            && key
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
        if !fine {
            return Err(BlobError(format!("bad key `{key}`")));
        }
        Ok(self.root.join(Path::new(key)))
    }

    pub async fn put(&self, key: &str, bytes: &[u8]) -> Result<(), BlobError> {
        let mut writer = self.writer().await?;
        writer.write(bytes).await?;
        writer.finish(key).await
    }

    /// Starts a file whose key is known only once its bytes are (it may name their hash): the
    /// bytes go to a temporary file, and [`BlobWriter::finish`] moves it under its key.
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        let dir = self.root.join(PARTIAL_DIR);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| BlobError(e.to_string()))?;
        let path = dir.join(uuid::Uuid::new_v4().simple().to_string());
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| BlobError(e.to_string()))?;
        Ok(BlobWriter {
            blobs: self.clone(),
            file: Some(file),
            path,
            written: 0,
        })
    }

    pub async fn get(&self, key: &str) -> Result<Vec<u8>, BlobError> {
        tokio::fs::read(self.path(key)?)
            .await
            .map_err(|e| BlobError(format!("{key}: {e}")))
    }

    /// The file's size in bytes.
    pub async fn size(&self, key: &str) -> Result<u64, BlobError> {
        let metadata = tokio::fs::metadata(self.path(key)?)
            .await
            .map_err(|e| BlobError(format!("{key}: {e}")))?;
        Ok(metadata.len())
    }

    /// The file as a streamed body, or `None` when there is no such file.
    pub async fn stream(&self, key: &str) -> Option<axum::body::Body> {
        Some(axum::body::Body::from_stream(self.chunks(key).await?))
    }

    /// The file's bytes in chunks, or `None` when there is no such file.
    pub async fn chunks(
        &self,
        key: &str,
    ) -> Option<impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static>
    {
        let file = tokio::fs::File::open(self.path(key).ok()?).await.ok()?;
        Some(futures_util::stream::unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = vec![0u8; 256 * 1024];
            match file.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buffer)), file))
                }
                Err(err) => Some((Err(err), file)),
            }
        }))
    }

    /// Removes a file; a file already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BlobError(e.to_string())),
        }
    }
}

/// A file being written; dropped before [`finish`](Self::finish), it leaves nothing behind.
pub struct BlobWriter {
    blobs: Blobs,
    file: Option<tokio::fs::File>,
    path: PathBuf,
    written: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        use tokio::io::AsyncWriteExt;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| BlobError("the file is already finished".into()))?;
        file.write_all(chunk)
            .await
            .map_err(|e| BlobError(e.to_string()))?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// How many bytes have been written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Hands the bytes written so far to the file system, so that the temporary file can be
    /// read through [`path`](Self::path) before it is finished.
    pub async fn flush(&mut self) -> Result<(), BlobError> {
        use tokio::io::AsyncWriteExt;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| BlobError("the file is already finished".into()))?;
        file.flush().await.map_err(|e| BlobError(e.to_string()))
    }

    /// Where the unfinished file is; it goes away when the writer is dropped unfinished.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the bytes to disk and moves them under `key`.
    pub async fn finish(mut self, key: &str) -> Result<(), BlobError> {
        let target = self.blobs.path(key)?;
        let file = self
            .file
            .take()
            .ok_or_else(|| BlobError("the file is already finished".into()))?;
        file.sync_all()
            .await
            .map_err(|e| BlobError(e.to_string()))?;
        drop(file);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| BlobError(e.to_string()))?;
        }
        let moved = tokio::fs::rename(&self.path, &target)
            .await
            .map_err(|e| BlobError(e.to_string()));
        if moved.is_ok() {
            self.path = PathBuf::new();
        }
        moved
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            // Unfinished: the temporary file is removed (a blocking unlink is quick).
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_round_trip_and_keys_stay_inside() {
        let root =
            std::env::temp_dir().join(format!("falgate-blobs-{}", uuid::Uuid::new_v4().simple()));
        let blobs = Blobs::open(&root).unwrap();
        blobs.put("photos/a/b.jpg", b"bytes").await.unwrap();
        assert_eq!(blobs.get("photos/a/b.jpg").await.unwrap(), b"bytes");
        blobs.delete("photos/a/b.jpg").await.unwrap();
        blobs.delete("photos/a/b.jpg").await.unwrap();
        assert!(blobs.get("photos/a/b.jpg").await.is_err());
        for bad in ["../escape", "/abs", "a//b", "a/./b", "a b"] {
            assert!(blobs.put(bad, b"x").await.is_err(), "{bad}");
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test]
    async fn written_files_appear_only_when_finished() {
        let root =
            std::env::temp_dir().join(format!("falgate-blobs-{}", uuid::Uuid::new_v4().simple()));
        let blobs = Blobs::open(&root).unwrap();
        let partial_files = || std::fs::read_dir(root.join(".partial")).unwrap().count();

        let mut writer = blobs.writer().await.unwrap();
        writer.write(b"first ").await.unwrap();
        writer.write(b"second").await.unwrap();
        assert_eq!(writer.written(), 12);
        writer.finish("loras/a/weights.safetensors").await.unwrap();
        assert_eq!(
            blobs.get("loras/a/weights.safetensors").await.unwrap(),
            b"first second"
        );
        assert_eq!(partial_files(), 0);

        // Abandoned halfway (a failed download): nothing is left, under any key.
        let mut writer = blobs.writer().await.unwrap();
        writer.write(b"half").await.unwrap();
        assert_eq!(partial_files(), 1);
        drop(writer);
        assert_eq!(partial_files(), 0);

        let writer = blobs.writer().await.unwrap();
        assert!(writer.finish("../escape").await.is_err());
        assert_eq!(partial_files(), 0);

        // What a killed process left behind goes at the next start, once it is old enough.
        let mut writer = blobs.writer().await.unwrap();
        writer.write(b"left behind").await.unwrap();
        std::mem::forget(writer);
        blobs.sweep_partials(Duration::from_secs(3600));
        assert_eq!(partial_files(), 1, "young: maybe another replica's");
        blobs.sweep_partials(Duration::ZERO);
        assert_eq!(partial_files(), 0);
        let _ = std::fs::remove_dir_all(root);
    }
}
