"""Compare ONNX Runtime's OpenVINO EP with the default CPU EP on the UNet, fp32.

Uses the stock `onnxruntime` wheel (1.31.1 in .venv) plus Intel's *plugin*
execution provider package `onnxruntime-ep-openvino` (it bundles OpenVINO and
TBB; ~160 MB), registered at run time with
`onnxruntime.register_execution_provider_library`. Nothing else is needed.

Install the plugin outside the project venv and run, e.g.:

    .venv/bin/pip install --no-deps --target /tmp/ovplug onnxruntime-ep-openvino==1.8.1
    PYTHONPATH=/tmp/ovplug .venv/bin/python scripts/openvino_check.py

(`--plugin-lib PATH` points at libonnxruntime_providers_openvino_plugin.so
directly instead of importing `onnxruntime_ep_openvino`.)

Batch 1, `--threads` threads for both EPs (OpenVINO via load_config:
INFERENCE_NUM_THREADS, one stream, f32 precision, LATENCY hint; the whole graph
must go to OpenVINO, CPU fallback disabled). The two sessions are timed in
interleaved rounds so machine noise hits both alike. Exits 1 with a message
if OpenVINO cannot be loaded.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def load_openvino(plugin_lib):
    """Register the plugin EP; return the OpenVINO CPU OrtEpDevice."""
    try:
        if plugin_lib is None:
            import onnxruntime_ep_openvino as ovep
            plugin_lib = ovep.get_library_path()
        ort.register_execution_provider_library("openvino_ep", plugin_lib)
    except Exception as e:  # ImportError, FileNotFoundError, ORT load failure
        sys.exit(f"error: cannot load the OpenVINO EP plugin: {e}\n"
                 "install it: pip install --target /tmp/ovplug onnxruntime-ep-openvino "
                 "and run with PYTHONPATH=/tmp/ovplug (see the docstring)")
    devs = [d for d in ort.get_ep_devices()
            if d.ep_name == "OpenVINOExecutionProvider" and d.ep_metadata.get("ov_device") == "CPU"]
    if not devs:
        sys.exit("error: OpenVINO EP registered but it offers no CPU device")
    return devs[0]


def session(model, threads, ov_device=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if ov_device is not None:
        # fail instead of silently running unsupported nodes on the CPU EP
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        # this plugin ignores num_of_threads/num_streams/precision: use load_config
        cfg = {"CPU": {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1",
                       "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}}
        so.add_provider_for_devices([ov_device], {"load_config": json.dumps(cfg)})
        return ort.InferenceSession(model, sess_options=so)
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/full/unet.onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="runs per round per EP")
    ap.add_argument("--plugin-lib", help="path to libonnxruntime_providers_openvino_plugin.so")
    a = ap.parse_args()

    ov_dev = load_openvino(a.plugin_lib)
    print(f"onnxruntime {ort.__version__}; OpenVINO EP {ov_dev.ep_metadata.get('version')} "
          f"from {ov_dev.ep_metadata.get('library_path')}")
    t = time.perf_counter()
    cpu = session(a.model, a.threads)
    t_cpu = time.perf_counter() - t
    t = time.perf_counter()
    try:
        ov = session(a.model, a.threads, ov_dev)
    except Exception as e:
        sys.exit(f"error: OpenVINO session creation failed: {e}")
    t_ov = time.perf_counter() - t
    print(f"session load: cpu {t_cpu:.2f}s, openvino {t_ov:.2f}s (compile); "
          f"providers: {ov.get_providers()}")

    rng = np.random.default_rng(0)
    feeds = {"input": rng.random((1, 6, 320, 320), dtype=np.float32),
             "audio": rng.standard_normal((1, 32, 16, 16), dtype=np.float32)}
    sess = {"cpu": cpu, "openvino": ov}
    outs = {k: s.run(None, feeds)[0] for k, s in sess.items()}  # warm-up
    for s in sess.values():
        for _ in range(2):
            s.run(None, feeds)
    diff = float(np.max(np.abs(outs["cpu"] - outs["openvino"])))

    per_round = {k: [] for k in sess}
    for r in range(a.rounds):
        order = list(sess) if r % 2 == 0 else list(sess)[::-1]
        for k in order:
            t = time.perf_counter()
            for _ in range(a.runs):
                sess[k].run(None, feeds)
            per_round[k].append((time.perf_counter() - t) * 1000 / a.runs)
        print(f"round {r + 1}: " + ", ".join(f"{k} {per_round[k][-1]:.1f} ms" for k in sess))

    med = {k: statistics.median(v) for k, v in per_round.items()}
    for k in sess:
        print(f"{k:9s} median {med[k]:7.1f} ms/frame  {1000 / med[k]:6.2f} frames/s  "
              f"(min {min(per_round[k]):.1f}, max {max(per_round[k]):.1f})")
    ratios = [c / o for c, o in zip(per_round["cpu"], per_round["openvino"])]
    print(f"speed-up openvino vs cpu: {med['cpu'] / med['openvino']:.2f}x "
          f"(per-round {min(ratios):.2f}..{max(ratios):.2f})")
    print(f"max abs diff of outputs: {diff:.3g} (output range "
          f"{outs['cpu'].min():.3g}..{outs['cpu'].max():.3g})")


if __name__ == "__main__":
    main()
