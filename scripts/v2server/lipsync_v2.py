"""An MLServer runtime that runs an ONNX model with onnxruntime (CPU): the Open Inference
Protocol server of lipsync's remote-backend tests, benchmark and docs/scaling.md.

Model settings `parameters.extra`: `threads` (intra-op threads, default 1) and `delay_ms`
(added to every inference, to play a slow server; default 0).
"""

import asyncio

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("threads", 1))
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.delay = float(extra.get("delay_ms", 0)) / 1000.0
        self.session = ort.InferenceSession(self.settings.parameters.uri, opts, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: np.ascontiguousarray(NumpyCodec.decode_input(i)) for i in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        outs = self.session.run(names, feeds)
        if self.delay:
            await asyncio.sleep(self.delay)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name=n, payload=o) for n, o in zip(names, outs)],
        )
