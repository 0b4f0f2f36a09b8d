#!/usr/bin/env python3
"""Build architecture-faithful SyncTalk_2D "328 / ave" ONNX models with seeded random weights.

No trained weights can be downloaded here, so this script writes the two graphs of docs/spec.md
section 8 with the real layer structure (onnx + numpy only, no torch):

* ``unet.onnx``: ``input`` [N,6,320,320] + ``audio`` [N,32,16,16] -> ``output`` [N,3,320,320]
  (12,186,935 parameters: conv weights/biases + BatchNorm gamma/beta; 4,885,839,872 conv MACs
  per frame). Its initializers are named after SyncTalk_2D's modules (``unet_328.py``:
  ``audio_model.conv3.weight``, ``down1.maxpool_conv.0.double_conv.0.conv.3.weight``,
  ``up5.conv.double_conv.1.conv.7.running_var``, ``outc.conv.bias``...), so a trained
  checkpoint's state dict maps onto it one to one.
* ``audio_encoder.onnx``: ``mel_spectrogram`` [N,1,80,16] -> ``audio_features`` [N,512]
  (2,812,672 parameters, the Wav2Lip SyncNet audio tower).

BatchNorm running statistics are calibrated layer by layer with ONNX Runtime on a real face
crop (scikit-image's ``astronaut``) so activations stay O(1); the last conv is scaled so the
sigmoid output is spread out (std well above 0.05), not saturated.

``--tiny`` writes models with the same names, I/O names and shapes but a few small layers, for
fast tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BN_EPS = 1e-5


class Graph:
    """A tiny ONNX graph builder that tracks parameters and BatchNorm layers to calibrate."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.n = 0
        self.params = 0
        # (input tensor name, param prefix) of each BatchNorm, in topological order.
        self.bns: list[tuple[str, str]] = []
        # Parameter prefix of each conv's output tensor.
        self.conv_prefix: dict[str, str] = {}

    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}_{self.n}"

    def init(self, name: str, value: np.ndarray, param: bool) -> str:
        self.inits[name] = value.astype(np.float32)
        if param:
            self.params += value.size
        return name

    def conv(self, x, cin, cout, k, stride=1, pad=0, group=1, bias=False, name=None):
        """A conv whose parameters are ``NAME.weight`` (and ``NAME.bias``)."""
        n = self.name("conv")
        p = name or n
        fan_in = (cin // group) * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        if group > 1 and k == 3:
            # Depthwise filters: mostly a smoothing kernel with a little noise, like trained
            # ones. Zero-mean random 3x3 filters are high-pass: layer after layer they would
            # amplify pixel noise relative to image content.
            blur = np.outer([1, 2, 1], [1, 2, 1]) / 16.0
            w = blur[None, None] * self.rng.normal(1.0, 0.2, (cout, 1, 1, 1)) + w * 0.1
        ins = [x, self.init(p + ".weight", w, True)]
        if bias:
            ins.append(self.init(p + ".bias", self.rng.standard_normal(cout) * 0.01, True))
        strides = list(stride) if isinstance(stride, (tuple, list)) else [stride, stride]
        self.nodes.append(
            helper.make_node(
                "Conv", ins, [n], name=n, kernel_shape=[k, k], strides=strides,
                pads=[pad] * 4, group=group,
            )
        )
        self.conv_prefix[n] = p
        return n

    def bn(self, x, c, name=None):
        """A BatchNorm whose parameters are PyTorch's ``NAME.weight``, ``.bias``,
        ``.running_mean`` and ``.running_var``."""
        n = self.name("bn")
        p = name or n
        gamma = self.init(p + ".weight", np.ones(c), True)
        # A positive shift keeps most units on the linear side of the following ReLU: random
        # deep ReLU + BatchNorm networks are otherwise chaotic (a one-level change of a few
        # input pixels rewrites the whole output), which trained networks are not.
        beta = self.init(p + ".bias", 3.0 + self.rng.standard_normal(c) * 0.05, True)
        mean = self.init(p + ".running_mean", np.zeros(c), False)
        var = self.init(p + ".running_var", np.ones(c), False)
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, gamma, beta, mean, var], [n], name=n,
                             epsilon=BN_EPS)
        )
        self.bns.append((x, p))
        return n

    def op(self, kind, ins, **attrs):
        n = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, ins, [n], name=n, **attrs))
        return n

    def relu(self, x):
        return self.op("Relu", [x])

    def up2(self, x):
        """nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)."""
        scales = self.init(self.name("scales"), np.array([1, 1, 2, 2], np.float32), False)
        return self.op("Resize", [x, "", scales], mode="linear",
                       coordinate_transformation_mode="align_corners")

    def resize(self, x, factor: float):
        scales = self.init(self.name("scales"), np.array([1, 1, factor, factor], np.float32), False)
        return self.op("Resize", [x, "", scales], mode="linear",
                       coordinate_transformation_mode="align_corners")

    # --- SyncTalk_2D building blocks (unet_328.py) -------------------------------------------
    def inverted_residual(self, x, inp, oup, stride, use_res, name, expand=2):
        """``InvertedResidual``: ``NAME.conv.{0,1,3,4,6,7}`` (conv, BN, ReLU, dw conv, BN, ReLU,
        conv, BN)."""
        hid = inp * expand
        c = name + ".conv."
        y = self.relu(self.bn(self.conv(x, inp, hid, 1, name=c + "0"), hid, name=c + "1"))
        y = self.relu(self.bn(self.conv(y, hid, hid, 3, stride, 1, group=hid, name=c + "3"), hid, name=c + "4"))
        y = self.bn(self.conv(y, hid, oup, 1, name=c + "6"), oup, name=c + "7")
        return self.op("Add", [x, y]) if use_res else y

    def double_conv_dw(self, x, cin, cout, stride, name):
        """``DoubleConvDW``: ``NAME.double_conv.0`` and ``.1``."""
        y = self.inverted_residual(x, cin, cout, stride, False, name + ".double_conv.0")
        return self.inverted_residual(y, cout, cout, 1, True, name + ".double_conv.1")

    def up(self, x, skip, cin, cout, name):
        """``Up``: bilinear x2, concat with the skip, ``NAME.conv`` (a DoubleConvDW)."""
        y = self.up2(x)
        y = self.op("Concat", [y, skip], axis=1)
        return self.double_conv_dw(y, cin, cout, 1, name + ".conv")

    def conv_bn_relu(self, x, cin, cout, k, stride, pad, residual=False, name=None):
        """Wav2Lip ``Conv2d``: conv (with bias) + BN (+ residual) + ReLU, as ``NAME.conv_block.0``
        and ``.1``."""
        c = name + ".conv_block." if name else None
        y = self.bn(self.conv(x, cin, cout, k, stride, pad, bias=True, name=c and c + "0"), cout, name=c and c + "1")
        if residual:
            y = self.op("Add", [y, x])
        return self.relu(y)


def unet_full(g: Graph, x: str, audio: str) -> str:
    """SyncTalk_2D ``Model(mode='ave')`` at 328 (``unet_328.py``), with its module names."""
    ch = [32, 64, 128, 256, 512]
    ir, dc = g.inverted_residual, g.double_conv_dw
    # AudioConvAve: 16x16 through conv4; conv5 (stride 2, padding 3) takes it to 10x10.
    m = "audio_model."
    a = ir(audio, ch[0], ch[1], 1, False, m + "conv1")
    a = ir(a, ch[1], ch[2], 1, False, m + "conv2")
    a = g.relu(g.bn(g.conv(a, ch[2], ch[3], 3, 1, 1, bias=True, name=m + "conv3"), ch[3], name=m + "bn3"))
    a = ir(a, ch[3], ch[3], 1, True, m + "conv4")
    a = g.relu(g.bn(g.conv(a, ch[3], ch[4], 3, 2, 3, bias=True, name=m + "conv5"), ch[4], name=m + "bn5"))
    a = ir(a, ch[4], ch[4], 1, True, m + "conv6")
    a = ir(a, ch[4], ch[4], 1, True, m + "conv7")

    x1 = ir(x, 6, ch[0], 1, False, "inc.inconv.0")  # 320
    x2 = dc(x1, ch[0], ch[0], 2, "down1.maxpool_conv.0")  # 160
    x3 = dc(x2, ch[0], ch[1], 2, "down2.maxpool_conv.0")  # 80
    x4 = dc(x3, ch[1], ch[2], 2, "down3.maxpool_conv.0")  # 40
    x5 = dc(x4, ch[2], ch[3], 2, "down4.maxpool_conv.0")  # 20
    x6 = dc(x5, ch[3], ch[4], 2, "down5.maxpool_conv.0")  # 10

    y = g.op("Concat", [x6, a], axis=1)
    y = dc(y, ch[4] * 2, ch[4], 1, "fuse_conv.0")
    y = dc(y, ch[4], ch[3], 1, "fuse_conv.1")
    y = g.up(y, x5, ch[4], ch[3] // 2, "up1")  # 256+256 -> 128
    y = g.up(y, x4, ch[3], ch[2] // 2, "up2")  # 128+128 -> 64
    y = g.up(y, x3, ch[2], ch[1] // 2, "up3")  # 64+64 -> 32
    y = g.up(y, x2, ch[1], ch[0], "up4")  # 32+32 -> 32
    y = g.up(y, x1, ch[1], ch[0] // 2, "up5")  # 32+32 -> 16
    return g.conv(y, ch[0] // 2, 3, 1, bias=True, name="outc.conv")


def unet_tiny(g: Graph, x: str, audio: str) -> str:
    s1 = g.relu(g.bn(g.conv(x, 6, 8, 3, 4, 1), 8))  # 80
    s2 = g.relu(g.bn(g.conv(s1, 8, 16, 3, 2, 1), 16))  # 40
    a = g.relu(g.bn(g.conv(audio, 32, 16, 3, 1, 1, bias=True), 16))  # 16
    a = g.resize(a, 2.5)  # 40
    y = g.op("Concat", [s2, a], axis=1)
    y = g.relu(g.bn(g.conv(y, 32, 16, 3, 1, 1), 16))
    y = g.up2(y)  # 80
    y = g.op("Concat", [y, s1], axis=1)
    y = g.relu(g.bn(g.conv(y, 24, 8, 3, 1, 1), 8))
    y = g.resize(y, 4.0)  # 320
    y = g.conv(y, 8, 3, 3, 1, 1, bias=True)
    return y


def encoder_full(g: Graph, x: str) -> str:
    """Wav2Lip's SyncNet audio tower, named ``audio_encoder.K.conv_block.{0,1}``."""
    layers = [
        (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
        (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
        (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
        (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
        (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
    ]
    y = x
    for k, (cin, cout, ks, stride, pad, res) in enumerate(layers):
        y = g.conv_bn_relu(y, cin, cout, ks, stride, pad, res, name=f"audio_encoder.{k}")
    return y


def encoder_tiny(g: Graph, x: str) -> str:
    c = g.conv_bn_relu
    y = c(x, 1, 16, 3, (2, 1), 1)
    y = c(y, 16, 32, 3, 2, 1)
    y = g.op("GlobalAveragePool", [y])
    return c(y, 32, 512, 1, 1, 0)


def conv_macs(model: onnx.ModelProto, inputs: dict[str, list[int]]) -> int:
    """Multiply-accumulates of every Conv for one sample of the given input shapes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in m.graph.input:
        for d, n in zip(v.type.tensor_type.shape.dim, inputs[v.name]):
            d.Clear()
            d.dim_value = n
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.output)}
    weights = {i.name: list(i.dims) for i in m.graph.initializer}
    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            cout, cin_per_group, kh, kw = weights[node.input[1]]
            _, _, h, w = shapes[node.output[0]]
            total += cout * cin_per_group * kh * kw * h * w
    return total


def to_model(g: Graph, inputs, outputs, doc: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes, "lipsync",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in g.inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="lipsync make_models.py", doc_string=doc)
    model.ir_version = 8
    return model


def run_to(g, inputs, outputs, feeds, names):
    """Runs the graph so far and returns the tensors ``names``."""
    import onnxruntime as ort

    model = to_model(g, inputs, [(n, None) for n in names], "calibration")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def calibrate(g: Graph, inputs, feeds, out_name: str, out_std: float | None) -> None:
    """Sets each BatchNorm's running stats from the data so activations stay O(1)."""
    for src, prefix in g.bns:
        (t,) = run_to(g, inputs, None, feeds, [src])
        axes = (0, 2, 3)
        g.inits[prefix + ".running_mean"] = t.mean(axis=axes).astype(np.float32)
        # Floor each channel's variance at a quarter of the layer's median: channels that see
        # nearly constant input (the masked half of the image is zeros) would otherwise be
        # divided by a tiny deviation and amplify any change of the input, making the random
        # network chaotic (a one-level change in a few pixels would change the whole output).
        var = t.var(axis=axes)
        floor = max(0.25 * float(np.median(var)), 1e-3)
        g.inits[prefix + ".running_var"] = np.maximum(var, floor).astype(np.float32)
    if out_std is not None:
        # Scale the final conv so the pre-sigmoid logits have mean 0 and the given std.
        (t,) = run_to(g, inputs, None, feeds, [out_name])
        p = g.conv_prefix[out_name]
        w, b = g.inits[p + ".weight"], g.inits[p + ".bias"]
        mean = t.mean(axis=(0, 2, 3))
        std = t.std(axis=(0, 2, 3)) + 1e-6
        scale = out_std / std
        g.inits[p + ".weight"] = (w * scale[:, None, None, None]).astype(np.float32)
        g.inits[p + ".bias"] = ((b - mean) * scale).astype(np.float32)


def face_input(batch: int) -> np.ndarray:
    """A real face crop (scikit-image astronaut) prepared as docs/spec.md section 4 describes."""
    import cv2
    from skimage import data

    rgb = data.astronaut()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    crops = []
    for i in range(batch):
        x1, y1 = 150 + 4 * i, 120 + 2 * i
        crop = bgr[y1:y1 + 170, x1:x1 + 170]
        c328 = cv2.resize(crop, (328, 328), interpolation=cv2.INTER_CUBIC)
        inner = c328[4:324, 4:324].copy()
        masked = inner.copy()
        masked[5:310, 5:315] = 0
        crops.append(np.concatenate([inner, masked], axis=2).transpose(2, 0, 1))
    return (np.stack(crops).astype(np.float32) / 255.0)


def synthetic_mel(rng, batch: int) -> np.ndarray:
    return np.clip(rng.standard_normal((batch, 1, 80, 16)) * 1.5 - 1.0, -4, 4).astype(np.float32)


def build_unet(tiny: bool, seed: int, calibrated: bool = True):
    g = Graph(seed)
    inputs = [("input", ["N", 6, 320, 320]), ("audio", ["N", 32, 16, 16])]
    logits = (unet_tiny if tiny else unet_full)(g, "input", "audio")
    feeds = {
        "input": face_input(4),
        "audio": np.abs(np.random.default_rng(seed + 1).standard_normal((4, 32, 16, 16))).astype(np.float32),
    }
    if calibrated:
        calibrate(g, inputs, feeds, logits, out_std=1.5)
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["output"], name="sigmoid_out"))
    model = to_model(g, inputs, [("output", ["N", 3, 320, 320])],
                     "SyncTalk_2D 328/ave UNet" + (" (tiny)" if tiny else ""))
    return model, g.params, feeds


def build_encoder(tiny: bool, seed: int, calibrated: bool = True):
    g = Graph(seed)
    inputs = [("mel_spectrogram", ["N", 1, 80, 16])]
    y = (encoder_tiny if tiny else encoder_full)(g, "mel_spectrogram")
    feeds = {"mel_spectrogram": synthetic_mel(np.random.default_rng(seed + 1), 16)}
    if calibrated:
        calibrate(g, inputs, feeds, y, out_std=None)
    g.nodes.append(helper.make_node("Flatten", [y], ["audio_features"], name="flatten_out", axis=1))
    model = to_model(g, inputs, [("audio_features", ["N", 512])],
                     "Wav2Lip SyncNet audio encoder" + (" (tiny)" if tiny else ""))
    return model, g.params, feeds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    ap.add_argument("--tiny", action="store_true", help="small models with the same I/O")
    ap.add_argument("--seed", type=int, default=328)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort

    size = "tiny" if args.tiny else "full"
    for what, build, out_name in [("unet", build_unet, "output"),
                                  ("audio_encoder", build_encoder, "audio_features")]:
        model, params, feeds = build(args.tiny, args.seed + (0 if what == "unet" else 100))
        onnx.checker.check_model(model)
        path = args.out / f"{what}.onnx"
        tmp = path.with_suffix(".onnx.tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = sess.run([out_name], feeds)
        print(f"{path} ({size}): {params:,} parameters; output {list(out.shape)} "
              f"mean {out.mean():.4f} std {out.std():.4f} min {out.min():.4f} max {out.max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
