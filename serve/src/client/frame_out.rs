//! Where a client's frames go: a new directory of JPEGs, MJPEG on stdout or an `.mjpeg` file,
//! each complete or absent (staged, renamed by `finish`; dropped unfinished, nothing is left).

use std::io::Write;
use std::path::{Path, PathBuf};

use lipsync_stages::io::staged::{check_new_dir, check_new_file, StagedDir, StagedFile};

use crate::client::ClientError;

/// A frame output that cannot be made or completed.
#[derive(Debug, thiserror::Error)]
pub enum FrameOutError {
    /// The path cannot be used, or the output not moved into place.
    #[error(transparent)]
    Path(#[from] lipsync_stages::io::staged::StagedError),
    /// Writing or renaming failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Frames written by the client: a directory built under a temporary name, stdout or a file
/// (temporary sibling, renamed when complete).
pub enum FrameOut {
    /// Frames are counted only.
    None,
    /// A new directory of `NNNNNN.jpg`, renamed into place when complete.
    Dir {
        /// The staged directory.
        dir: StagedDir,
        /// Name buffer.
        name: String,
    },
    /// Concatenated JPEGs on a stream (stdout).
    Stream(Box<dyn Write + Send>),
    /// Concatenated JPEGs in a file, written under a temporary name and renamed when complete.
    File {
        /// The staged file.
        staged: StagedFile,
        /// Its buffered writer.
        file: std::io::BufWriter<std::fs::File>,
    },
}

impl FrameOut {
    /// The writer for `output` (`None`: count only; `-`: stdout; `*.mjpeg`: a file; else a
    /// new directory), checked before anything streams.
    pub fn open(output: Option<&Path>) -> Result<Self, FrameOutError> {
        let Some(path) = output else { return Ok(FrameOut::None) };
        if path == Path::new("-") {
            return Ok(FrameOut::Stream(Box::new(std::io::BufWriter::new(std::io::stdout()))));
        }
        check_new_file(path).map_err(FrameOutError::Path)?;
        if path.extension().is_some_and(|e| e == "mjpeg" || e == "mjpg") {
            let mut staged = StagedFile::create(path).map_err(FrameOutError::Path)?;
            let file = staged
                .file()
                .try_clone()
                .map_err(|source| FrameOutError::Io { path: staged.tmp_path().to_path_buf(), source })?;
            return Ok(FrameOut::File { staged, file: std::io::BufWriter::new(file) });
        }
        check_new_dir(path).map_err(FrameOutError::Path)?;
        Ok(FrameOut::Dir { dir: StagedDir::create(path).map_err(FrameOutError::Path)?, name: String::new() })
    }

    /// Writes frame `index`.
    pub fn write(&mut self, index: u32, jpeg: &[u8]) -> Result<(), ClientError> {
        let io = |what: String| move |source| ClientError::Io { what, source };
        match self {
            FrameOut::None => Ok(()),
            FrameOut::Dir { dir, name } => {
                use std::fmt::Write as _;
                name.clear();
                let _ = write!(name, "{index:06}.jpg");
                let p = dir.dir().join(&*name);
                std::fs::write(&p, jpeg).map_err(io(format!("writing {}", p.display())))
            }
            FrameOut::Stream(w) => w.write_all(jpeg).map_err(io("writing to stdout".into())),
            FrameOut::File { file, staged } => {
                file.write_all(jpeg).map_err(io(format!("writing {}", staged.tmp_path().display())))
            }
        }
    }

    /// Completes the output (renames it into place).
    pub fn finish(self) -> Result<(), FrameOutError> {
        match self {
            FrameOut::None => Ok(()),
            FrameOut::Dir { mut dir, .. } => dir.commit().map_err(FrameOutError::Path),
            FrameOut::Stream(mut w) => w.flush().map_err(|source| FrameOutError::Io { path: "stdout".into(), source }),
            FrameOut::File { staged, file } => {
                let path = staged.tmp_path().to_path_buf();
                file.into_inner().map_err(|e| FrameOutError::Io { path, source: e.into_error() })?;
                staged.commit().map_err(FrameOutError::Path)
            }
        }
    }
}
