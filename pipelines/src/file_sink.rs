//! Render's sinks: a directory of numbered frames (built under a temporary name, renamed when
//! complete), an MJPEG stream on stdout, or nothing (the encode stage writes the video file).

use std::io::Write;
use std::path::PathBuf;

use lipsync_stages::io::staged::{check_new_dir, check_new_file, StagedDir};

use crate::graph::sink::{FrameSink, SinkError};
use crate::job::FrameJob;

/// Image format of a frames directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// `000000.jpg`, ...
    Jpeg,
    /// `000000.png`, ... (lossless)
    Png,
    /// `000000.bgr`, ... raw BGR24 bytes, plus `frames.json` with the size.
    Raw,
}

impl ImageFormat {
    fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Raw => "bgr",
        }
    }
}

/// Where render's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A new directory of numbered frames (built under a temporary name, renamed when complete).
    Dir {
        /// The directory (must not exist, or be empty).
        path: PathBuf,
        /// Frame format.
        format: ImageFormat,
    },
    /// Concatenated JPEGs (an MJPEG stream) on standard output.
    Stdout,
    /// An H.264 `.mp4`/`.mkv`/`.mov` with the audio muxed (temporary file, renamed).
    Video(PathBuf),
}

impl Output {
    /// Checks the output location before anything runs.
    pub fn check(&self) -> Result<(), SinkError> {
        match self {
            Output::Dir { path, .. } => check_new_dir(path).map_err(SinkError::Output),
            Output::Stdout => Ok(()),
            Output::Video(path) => check_new_file(path).map_err(SinkError::Output),
        }
    }

    /// The sink for this output.
    pub fn sink(&self) -> Result<Box<dyn FrameSink>, SinkError> {
        Ok(match self {
            Output::Dir { path, format } => {
                let dir = StagedDir::create(path).map_err(SinkError::Output)?;
                let file = dir.dir().join("000000.ext");
                Box::new(DirSink {
                    dir,
                    format: *format,
                    size: (0, 0),
                    frames: 0,
                    file,
                    name: String::with_capacity(32),
                })
            }
            Output::Stdout => Box::new(StdoutSink(std::io::BufWriter::new(std::io::stdout()))),
            Output::Video(_) => Box::new(NoSink),
        })
    }
}

/// Frames as numbered files in a staged directory.
struct DirSink {
    dir: StagedDir,
    format: ImageFormat,
    size: (usize, usize),
    frames: usize,
    file: PathBuf,
    name: String,
}

impl FrameSink for DirSink {
    fn frame(&mut self, job: &FrameJob) -> Result<(), SinkError> {
        use std::fmt::Write as _;
        self.name.clear();
        let _ = write!(self.name, "{:06}.{}", job.index, self.format.ext());
        self.file.set_file_name(&self.name);
        let bytes: &[u8] = if self.format == ImageFormat::Raw { &job.frame.data } else { &job.encoded };
        std::fs::write(&self.file, bytes)
            .map_err(|source| SinkError::Io { what: self.file.display().to_string(), source })?;
        self.size = (job.frame.width, job.frame.height);
        self.frames += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        if self.format == ImageFormat::Raw {
            let (w, h) = self.size;
            let meta = serde_json::json!({"format": "bgr24", "width": w, "height": h, "frames": self.frames});
            let path = self.dir.dir().join("frames.json");
            std::fs::write(&path, format!("{meta}\n"))
                .map_err(|source| SinkError::Io { what: path.display().to_string(), source })?;
        }
        self.dir.commit().map_err(SinkError::Output)
    }
}

/// Concatenated encoded frames on stdout.
struct StdoutSink(std::io::BufWriter<std::io::Stdout>);

impl FrameSink for StdoutSink {
    fn frame(&mut self, job: &FrameJob) -> Result<(), SinkError> {
        self.0.write_all(&job.encoded).map_err(|source| SinkError::Io { what: "stdout".into(), source })
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        self.0.flush().map_err(|source| SinkError::Io { what: "stdout".into(), source })
    }
}

/// The video file is written by the encode stage.
struct NoSink;

impl FrameSink for NoSink {
    fn frame(&mut self, _job: &FrameJob) -> Result<(), SinkError> {
        Ok(())
    }
}
