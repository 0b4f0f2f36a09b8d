"""Static int8 quantization of a lip-sync UNet with ONNX Runtime (QDQ: per-channel symmetric
int8 weights, uint8 activations).

`lipsync model quantize` runs this (it carries a copy inside the binary) after it has written
calibration inputs made by the engine's own prep and audio features:

    python quantize_unet.py --model unet.onnx --calib DIR --out unet.int8.onnx \
        [--image-input input] [--audio-input audio]

DIR holds `images.npy` ([N, 6, S, S] f32) and `audio.npy` ([N, 32, 16, 16] f32). Only the op
types ONNX Runtime's CPU provider runs in int8 are quantized; the rest stay fp32 and are listed
as excluded. The last line on stdout is a JSON summary. Errors exit 2 with one line on stderr.
"""

import argparse
import json
import os
import sys
import tempfile

# Op types with int8 (QDQ) kernels or fusions in ONNX Runtime's CPU provider.
INT8_OPS = [
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "Resize", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Relu", "Clip", "Transpose", "Reshape",
]


def fail(message):
    print(f"quantize_unet: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--image-input", default="input")
    ap.add_argument("--audio-input", default="audio")
    args = ap.parse_args()

    try:
        import numpy as np
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        fail(f"this Python lacks onnxruntime.quantization ({e}); run scripts/setup.sh or pass --python")

    try:
        images = np.load(os.path.join(args.calib, "images.npy"), mmap_mode="r")
        audio = np.load(os.path.join(args.calib, "audio.npy"), mmap_mode="r")
    except (OSError, ValueError) as e:
        fail(f"calibration data unreadable: {e}")
    if images.ndim != 4 or images.shape[1] != 6 or audio.shape[1:] != (32, 16, 16) \
            or images.shape[0] != audio.shape[0] or images.shape[0] == 0:
        fail(f"calibration shapes {images.shape} and {audio.shape}: expected [N,6,S,S] and [N,32,16,16]")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= images.shape[0]:
                return None
            i = self.i
            self.i += 1
            return {args.image_input: np.ascontiguousarray(images[i:i + 1], dtype=np.float32),
                    args.audio_input: np.ascontiguousarray(audio[i:i + 1], dtype=np.float32)}

        def rewind(self):
            self.i = 0

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        # Folds BatchNormalization into Conv and infers shapes, as ONNX Runtime recommends.
        try:
            quant_pre_process(args.model, pre, skip_symbolic_shape=True)
            model = onnx.load(pre)
        except Exception as e:  # noqa: BLE001 (onnx and onnxruntime raise several types)
            fail(f"{args.model} could not be prepared for quantization: {e}")
        present = sorted({n.op_type for n in model.graph.node})
        quantized = [op for op in present if op in INT8_OPS]
        excluded = [op for op in present if op not in INT8_OPS]
        quantize_static(
            pre,
            args.out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # uint8 activations with int8 weights (U8S8): on this project's x86 CPU the full UNet ran
            # 1.35-1.5x faster than fp32 this way, and 2.3x slower than fp32 with int8 (S8S8)
            # activations (docs/avatar.md, "Quantized UNet").
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=quantized,
            # (CalibMaxIntermediateOutputs, which would bound the calibrator's memory, fails with "No
            # data is collected" when it divides the sample count, in onnxruntime 1.31.1.)
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    print(json.dumps({"samples": int(images.shape[0]), "quantized_ops": quantized, "excluded_ops": excluded}))


if __name__ == "__main__":
    main()
