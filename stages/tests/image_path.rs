//! The image path against OpenCV and the Python reference's dumps.

use std::path::PathBuf;

use lipsync_stages::frame::BgrFrame;
use lipsync_stages::image_io::read_image;
use lipsync_stages::resize::CubicResizer;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

fn load(rel: &str) -> BgrFrame {
    let mut f = BgrFrame::default();
    read_image(&fixture(rel), &mut f).unwrap_or_else(|e| panic!("{rel}: {e}"));
    f
}

/// Bit for bit against OpenCV's own INTER_CUBIC algorithm; within one level on a few percent
/// of values against the IPP-accelerated path that `cv2.resize` takes by default.
#[test]
fn cubic_resize_matches_opencv() {
    let cases: Vec<(String, usize, usize)> =
        serde_json::from_str(&std::fs::read_to_string(fixture("resize/cases.json")).unwrap()).unwrap();
    let mut r = CubicResizer::new();
    for (name, w, h) in cases {
        let src = load(&format!("resize/{name}.png"));
        let mut got = BgrFrame::new(w, h);
        r.resize(&src.data, src.width, src.height, src.stride(), &mut got.data, w, h, w * 3);
        let generic = load(&format!("resize/{name}_{w}x{h}_generic.png"));
        assert!(got.data == generic.data, "{name} -> {w}x{h}: differs from OpenCV's generic resize");
        let ipp = load(&format!("resize/{name}_{w}x{h}.png"));
        let diffs: Vec<i32> = got.data.iter().zip(&ipp.data).map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs()).collect();
        let max = diffs.iter().copied().max().unwrap();
        let off = diffs.iter().filter(|&&d| d > 0).count() as f64 / diffs.len() as f64;
        assert!(max <= 1 && off < 0.1, "{name} -> {w}x{h}: max diff {max}, {:.2}% differ", off * 100.0);
    }
}
