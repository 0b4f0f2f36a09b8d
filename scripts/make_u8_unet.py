#!/usr/bin/env python3
"""Wraps a lip-sync UNet so that its image input is uint8: a Cast to float and a Div by 255 in
front of the model, which give exactly the f32 tensor lipsync's prep makes (the 8-bit crop
over 255, zeros in the mask). With such a model on an inference server, `--provider remote`
sends the images as 614 KB of uint8 a frame instead of 2.46 MB of f32 (docs/scaling.md).

    .venv/bin/python scripts/make_u8_unet.py IN.onnx OUT.onnx [--image-input input]
"""

import argparse
import sys

import onnx
from onnx import TensorProto, helper


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--image-input", default="input")
    args = ap.parse_args()
    m = onnx.load(args.model)
    g = m.graph
    inp = next((i for i in g.input if i.name == args.image_input), None)
    if inp is None:
        sys.exit(f"make_u8_unet: {args.model} has no input `{args.image_input}`")
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        sys.exit(f"make_u8_unet: input `{args.image_input}` is not float")
    f32 = args.image_input + "_f32"
    for node in g.node:
        for k, name in enumerate(node.input):
            if name == args.image_input:
                node.input[k] = f32
    inp.type.tensor_type.elem_type = TensorProto.UINT8
    scale = helper.make_tensor(args.image_input + "_scale", TensorProto.FLOAT, [], [255.0])
    g.initializer.append(scale)
    cast = helper.make_node("Cast", [args.image_input], [args.image_input + "_cast"], to=TensorProto.FLOAT)
    div = helper.make_node("Div", [args.image_input + "_cast", scale.name], [f32])
    g.node.insert(0, div)
    g.node.insert(0, cast)
    onnx.checker.check_model(m)
    onnx.save(m, args.out)


if __name__ == "__main__":
    main()
