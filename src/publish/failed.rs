//! `--failed FILE`: every message that was not published, in the record format and input order.

use super::*;

/// The `--failed` file: created (truncated) before anything is sent, so a path that cannot
/// be written fails at once, and an empty file means every message was published.
pub(super) struct FailedFile {
    pub(super) path: std::path::PathBuf,
    pub(super) file: tokio::io::BufWriter<tokio::fs::File>,
}

impl FailedFile {
    pub(super) async fn create(path: &Path) -> anyhow::Result<FailedFile> {
        let file = tokio::fs::File::create(path).await.map_err(|e| {
            Exit::new(
                code::USAGE,
                anyhow!("cannot create --failed file {}: {e}", path.display()),
            )
        })?;
        Ok(FailedFile {
            path: path.to_owned(),
            file: tokio::io::BufWriter::new(file),
        })
    }

    pub(super) async fn write(&mut self, msg: &Message) -> std::io::Result<()> {
        let mut line = msg.record_line();
        line.push('\n');
        self.file.write_all(line.as_bytes()).await
    }

    pub(super) async fn close(mut self) -> std::io::Result<()> {
        self.file.flush().await?;
        self.file.get_ref().sync_all().await
    }
}
