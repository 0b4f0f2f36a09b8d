"""The Python reference against docs/spec.md: seed mel data, the worked frame-count table, the
ping-pong template order and the per-frame audio rows."""

import json
import sys
import unittest
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import reference as ref  # noqa: E402
from avatar_io import ping_pong  # noqa: E402

SEED = ROOT / "tests" / "fixtures" / "seed-mel"


class ReferenceTests(unittest.TestCase):
    def test_mel_matches_seed_references(self):
        for name in ("ref_correct.json", "ref_video.json"):
            data = json.loads((SEED / name).read_text())
            mel = ref.melspectrogram(np.array(data["audio"], np.float32))
            want = np.array(data["mel_spectrogram"], np.float32)
            self.assertEqual(mel.shape, want.shape)
            self.assertLessEqual(float(np.abs(mel - want).max()), 1e-5, name)

    def test_worked_frame_counts(self):
        for n, t, l, frames in [(3000, 16, 2, 4), (10240, 52, 13, 15), (14720, 74, 20, 22),
                                (16000, 81, 22, 24), (25600, 129, 37, 39)]:
            mel = ref.melspectrogram(np.zeros(n, np.float32))
            self.assertEqual(mel.shape[0], t)
            self.assertEqual(ref.num_windows(t), l)
            self.assertEqual(len(ref.windows(mel)), l)
            self.assertEqual(l + 2, frames)

    def test_too_short_audio_is_an_error(self):
        with self.assertRaises(SystemExit):
            ref.num_windows(15)

    def test_ping_pong(self):
        self.assertEqual([ping_pong(i, 5) for i in range(13)], [1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3])
        self.assertEqual([ping_pong(i, 2) for i in range(4)], [1, 0, 1, 0])
        self.assertEqual([ping_pong(i, 1) for i in range(3)], [0, 0, 0])
        self.assertEqual([ping_pong(i, 5, 3) for i in range(4)], [4, 0, 1, 2])

    def test_frame_audio_rows(self):
        f = np.arange(10 * 512, dtype=np.float32).reshape(10, 512) + 1
        a = ref.frame_audio(f, 0).reshape(16, 512)
        self.assertTrue(np.all(a[:8] == 0))
        np.testing.assert_array_equal(a[8:], f[:8])
        a = ref.frame_audio(f, 9).reshape(16, 512)
        np.testing.assert_array_equal(a[:9], f[1:10])
        self.assertTrue(np.all(a[9:] == 0))


if __name__ == "__main__":
    unittest.main()
