#!/usr/bin/env python3
"""Starts MLServer as an Open Inference Protocol (KServe v2) server for ONNX models, with the
onnxruntime runtime in scripts/v2server/: what lipsync's remote backend talks to in its tests
and benchmark, and the quickest way to try `--provider remote` without Triton.

    .venv/bin/python scripts/v2_server.py --model unet=models/full/unet.onnx \
        [--grpc-port 8001] [--http-port 8080] [--threads 2] [--delay-ms 0] [--dir DIR]

Each model's metadata (names, FP32 or UINT8, shapes with -1 for dynamic axes) is read from its
ONNX file.
Runs in the foreground until stopped (SIGTERM/SIGINT stop MLServer).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent


DATATYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.UINT8: "UINT8"}


def tensors(values):
    out = []
    for v in values:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
        datatype = DATATYPES.get(v.type.tensor_type.elem_type)
        if datatype is None:
            sys.exit(f"v2_server: tensor `{v.name}` has a type this server does not map (FP32 and UINT8 only)")
        out.append({"name": v.name, "datatype": datatype, "shape": dims})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH.onnx (repeatable)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--delay-ms", type=float, default=0)
    ap.add_argument("--dir", help="where to write the server's settings (default: a temporary directory)")
    args = ap.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lipsync-v2-"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "v2server" / "lipsync_v2.py", root / "lipsync_v2.py")
    (root / "settings.json").write_text(json.dumps({
        "host": args.host, "grpc_port": args.grpc_port, "http_port": args.http_port, "metrics_endpoint": None,
        "parallel_workers": 0, "debug": False, "grpc_max_message_length": 512 << 20,
    }))
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not name or not path or not os.path.isfile(path):
            sys.exit(f"v2_server: --model {spec}: expected NAME=PATH to an existing .onnx file")
        m = onnx.load(path, load_external_data=False)
        init = {i.name for i in m.graph.initializer}
        inputs = [i for i in m.graph.input if i.name not in init]
        d = root / name
        d.mkdir(exist_ok=True)
        (d / "model-settings.json").write_text(json.dumps({
            "name": name,
            "implementation": "lipsync_v2.OnnxModel",
            "inputs": tensors(inputs),
            "outputs": tensors(m.graph.output),
            "parameters": {"uri": str(Path(path).resolve()),
                           "extra": {"threads": args.threads, "delay_ms": args.delay_ms}},
        }))
    mlserver = Path(sys.executable).parent / "mlserver"
    os.chdir(root)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.execv(str(mlserver), [str(mlserver), "start", str(root)])


if __name__ == "__main__":
    main()
