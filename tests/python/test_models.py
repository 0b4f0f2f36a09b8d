"""Model generator checks: parameter counts of the full-size graphs (docs/spec.md section 8) and the
input/output signature of both sizes, run through ONNX Runtime with a dynamic batch."""

import sys
import unittest
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import make_models as mm  # noqa: E402

UNET_PARAMS = 12_186_935
ENCODER_PARAMS = 2_812_672
UNET_CONV_MACS = 4_885_839_872


def run(model, feeds, out):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, sess.run([out], feeds)[0]


def signature(sess):
    def desc(v):
        return [(x.name, [d if isinstance(d, int) else "N" for d in x.shape], x.type) for x in v]

    return desc(sess.get_inputs()), desc(sess.get_outputs())


UNET_SIG = (
    [("input", ["N", 6, 320, 320], "tensor(float)"), ("audio", ["N", 32, 16, 16], "tensor(float)")],
    [("output", ["N", 3, 320, 320], "tensor(float)")],
)
ENC_SIG = ([("mel_spectrogram", ["N", 1, 80, 16], "tensor(float)")], [("audio_features", ["N", 512], "tensor(float)")])


class ModelTests(unittest.TestCase):
    def check_unet(self, tiny):
        model, params, _ = mm.build_unet(tiny, 328, calibrated=tiny)
        rng = np.random.default_rng(0)
        feeds = {"input": rng.random((2, 6, 320, 320), np.float32),
                 "audio": rng.random((2, 32, 16, 16), np.float32)}
        sess, out = run(model, feeds, "output")
        self.assertEqual(signature(sess), UNET_SIG)
        self.assertEqual(out.shape, (2, 3, 320, 320))
        self.assertTrue(np.all((out >= 0) & (out <= 1)))
        return params

    def check_encoder(self, tiny):
        model, params, _ = mm.build_encoder(tiny, 428, calibrated=tiny)
        feeds = {"mel_spectrogram": mm.synthetic_mel(np.random.default_rng(0), 3)}
        sess, out = run(model, feeds, "audio_features")
        self.assertEqual(signature(sess), ENC_SIG)
        self.assertEqual(out.shape, (3, 512))
        return params

    def test_full_unet_structure(self):
        self.assertEqual(self.check_unet(False), UNET_PARAMS)

    def test_full_unet_is_synctalk_328_ave(self):
        """The audio branch keeps 16x16 through conv4 and goes to 10x10 in conv5 (stride 2,
        padding 3): 4,885,839,872 conv MACs per frame; parameters carry unet_328.py's names."""
        model, _, _ = mm.build_unet(False, 328, calibrated=False)
        macs = mm.conv_macs(model, {"input": [1, 6, 320, 320], "audio": [1, 32, 16, 16]})
        self.assertEqual(macs, UNET_CONV_MACS)
        shapes = {i.name: list(i.dims) for i in model.graph.initializer}
        for name, shape in [
            ("audio_model.conv1.conv.0.weight", [64, 32, 1, 1]),
            ("audio_model.conv3.weight", [256, 128, 3, 3]),
            ("audio_model.bn3.running_var", [256]),
            ("audio_model.conv5.weight", [512, 256, 3, 3]),
            ("audio_model.conv7.conv.7.bias", [512]),
            ("inc.inconv.0.conv.3.weight", [12, 1, 3, 3]),
            ("down5.maxpool_conv.0.double_conv.1.conv.6.weight", [512, 1024, 1, 1]),
            ("fuse_conv.0.double_conv.0.conv.0.weight", [2048, 1024, 1, 1]),
            ("up5.conv.double_conv.1.conv.7.running_mean", [16]),
            ("outc.conv.weight", [3, 16, 1, 1]),
        ]:
            self.assertEqual(shapes.get(name), shape, name)
        conv5 = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "audio_model.conv5.weight")
        attrs = {a.name: list(a.ints) for a in conv5.attribute}
        self.assertEqual((attrs["strides"], attrs["pads"]), ([2, 2], [3, 3, 3, 3]))
        conv3 = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "audio_model.conv3.weight")
        self.assertEqual({a.name: list(a.ints) for a in conv3.attribute}["strides"], [1, 1])

    def test_full_encoder_structure(self):
        self.assertEqual(self.check_encoder(False), ENCODER_PARAMS)

    def test_tiny_models_same_io(self):
        self.assertLess(self.check_unet(True), 100_000)
        self.assertLess(self.check_encoder(True), 100_000)

    def test_tiny_unet_output_not_saturated_on_a_face(self):
        model, _, feeds = mm.build_unet(True, 328)
        _, out = run(model, feeds, "output")
        self.assertGreater(out.std(), 0.05)

    def test_committed_fixture_models_have_the_signature(self):
        for name, sig in (("unet.onnx", UNET_SIG), ("audio_encoder.onnx", ENC_SIG)):
            sess = ort.InferenceSession(str(ROOT / "tests/fixtures/models" / name),
                                        providers=["CPUExecutionProvider"])
            self.assertEqual(signature(sess), sig)


if __name__ == "__main__":
    unittest.main()
