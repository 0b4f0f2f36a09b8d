//! Frame buffers shared between stages: packed BGR u8 images that callers recycle.

/// A packed BGR u8 image (`width * 3` bytes per row, no padding), as OpenCV holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgrFrame {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

impl BgrFrame {
    /// A black frame.
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height, data: vec![0; width * height * 3] }
    }

    /// Reshapes the frame, reusing its allocation when large enough.
    pub fn reshape(&mut self, width: usize, height: usize) {
        self.width = width;
        self.height = height;
        self.data.resize(width * height * 3, 0);
    }

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.width * 3
    }

    /// Copies `other` into this frame (reusing the allocation).
    pub fn copy_from(&mut self, other: &BgrFrame) {
        self.width = other.width;
        self.height = other.height;
        self.data.clear();
        self.data.extend_from_slice(&other.data);
    }
}
