//! SyncTalk_2D dataset directories: `full_body_img/N.jpg` frames and `landmarks/N.lms` files
//! (110 lines of `x y`), converted to crop boxes as docs/spec.md section 3 states.

use std::path::{Path, PathBuf};

use crate::crop::CropBox;

/// Errors reading a SyncTalk_2D dataset directory.
#[derive(Debug, thiserror::Error)]
pub enum SyncTalkError {
    /// A required sub-directory is missing.
    #[error(
        "{0} is not a SyncTalk_2D dataset directory: missing {1}/ (expected full_body_img/N.jpg and landmarks/N.lms)"
    )]
    Layout(PathBuf, &'static str),
    /// No frames were found.
    #[error("no frames in {0} (expected full_body_img/0.jpg, 1.jpg, ...)")]
    NoFrames(PathBuf),
    /// Frame numbers are not 0..n-1.
    #[error("frame files in {dir} are not numbered 0..{n}: {name} is out of sequence")]
    Sequence {
        /// The frames directory.
        dir: PathBuf,
        /// Number of frames.
        n: usize,
        /// The first file out of sequence.
        name: String,
    },
    /// A landmark file is missing.
    #[error("missing landmark file {0} for frame {1}")]
    MissingLandmarks(PathBuf, usize),
    /// A landmark file is malformed.
    #[error("bad landmark file {path}, line {line}: {message} (expected 110 lines of `x y`)")]
    BadLandmarks {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// I/O failure.
    #[error("could not read {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Listing frames failed.
    #[error(transparent)]
    Video(#[from] crate::io::video::VideoError),
}

/// Number of landmarks per `.lms` file.
pub const LANDMARKS: usize = 110;

/// Parses an `.lms` file into points, each coordinate read as f32 (as SyncTalk does).
pub fn parse_lms(path: &Path) -> Result<Vec<(f32, f32)>, SyncTalkError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SyncTalkError::Io { path: path.to_path_buf(), source })?;
    let bad = |line: usize, message: String| SyncTalkError::BadLandmarks { path: path.to_path_buf(), line, message };
    let mut points = Vec::with_capacity(LANDMARKS);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let mut coord = |axis: &str| -> Result<f32, SyncTalkError> {
            let s = parts.next().ok_or_else(|| bad(i + 1, format!("missing {axis}")))?;
            let v: f32 = s.parse().map_err(|_| bad(i + 1, format!("{axis} `{s}` is not a number")))?;
            if !v.is_finite() {
                return Err(bad(i + 1, format!("{axis} `{s}` is not finite")));
            }
            Ok(v)
        };
        let x = coord("x")?;
        let y = coord("y")?;
        points.push((x, y));
    }
    if points.len() != LANDMARKS {
        return Err(bad(points.len(), format!("found {} points", points.len())));
    }
    Ok(points)
}

/// The crop box of a landmark set: `xmin = lms[1].x, xmax = lms[31].x, ymin = lms[52].y,
/// ymax = ymin + (xmax - xmin)`, each value truncated to an integer first.
pub fn box_from_landmarks(lms: &[(f32, f32)]) -> CropBox {
    let t = |v: f32| v.trunc() as i64;
    let x1 = t(lms[1].0);
    let x2 = t(lms[31].0);
    let y1 = t(lms[52].1);
    CropBox { x1, y1, x2, y2: y1 + (x2 - x1) }
}

/// A SyncTalk_2D dataset: frame files in order and one box per frame.
#[derive(Debug, Clone)]
pub struct SyncTalkDataset {
    /// `full_body_img/0.jpg`, `1.jpg`, ... in order.
    pub frames: Vec<PathBuf>,
    /// One box per frame, from its landmarks.
    pub boxes: Vec<CropBox>,
}

/// Reads a dataset directory: frames must be numbered `0..n-1`, each with its `.lms`.
pub fn read_dataset(dir: &Path) -> Result<SyncTalkDataset, SyncTalkError> {
    let img_dir = dir.join("full_body_img");
    let lms_dir = dir.join("landmarks");
    if !img_dir.is_dir() {
        return Err(SyncTalkError::Layout(dir.to_path_buf(), "full_body_img"));
    }
    if !lms_dir.is_dir() {
        return Err(SyncTalkError::Layout(dir.to_path_buf(), "landmarks"));
    }
    let frames = crate::io::video::frame_files(&img_dir)?;
    if frames.is_empty() {
        return Err(SyncTalkError::NoFrames(img_dir));
    }
    let mut boxes = Vec::with_capacity(frames.len());
    for (i, frame) in frames.iter().enumerate() {
        let stem = frame.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        if stem.parse::<usize>().ok() != Some(i) {
            return Err(SyncTalkError::Sequence {
                dir: img_dir.clone(),
                n: frames.len(),
                name: frame.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_string(),
            });
        }
        let lms = lms_dir.join(format!("{i}.lms"));
        if !lms.is_file() {
            return Err(SyncTalkError::MissingLandmarks(lms, i));
        }
        boxes.push(box_from_landmarks(&parse_lms(&lms)?));
    }
    Ok(SyncTalkDataset { frames, boxes })
}
