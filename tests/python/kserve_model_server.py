"""KServe's own ModelServer (the `kserve` package, v2 REST, and with --grpc its
`inference.GRPCInferenceService` too), serving one model whose output is a
deterministic function of each row, so a test can tell whose row is whose. Listens on
ports the OS picked, printed first as `listen=127.0.0.1:PORT` (REST) and, with --grpc,
`grpc=127.0.0.1:PORT`; it is ready when its /v2/health/ready says so.

Usage: kserve_model_server.py MODEL_NAME [--grpc]
"""
import socket
import sys

import numpy as np

name = sys.argv[1]
grpc = "--grpc" in sys.argv[2:]
sys.argv = sys.argv[:1]  # kserve parses the command line on import
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402


class RowFeatures(Model):
    """Per row: [characters, sum of code points, position-weighted sum], FP32."""

    def __init__(self, model_name):
        super().__init__(model_name)
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        texts = [t.decode() if isinstance(t, bytes) else str(t)
                 for t in payload.inputs[0].as_numpy().reshape(-1)]
        rows = np.array([[len(t), sum(map(ord, t)),
                          sum((i + 1) * ord(c) for i, c in enumerate(t))] for t in texts],
                        dtype=np.float32)
        out = InferOutput(name="features", shape=list(rows.shape), datatype="FP32")
        # Over gRPC, raw inputs get raw outputs (what tritonclient reads); REST stays JSON.
        out.set_data_from_numpy(rows, binary_data=payload.from_grpc
                                and payload.use_binary_outputs)
        return InferResponse(model_name=self.name, infer_outputs=[out],
                             response_id=payload.id)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
print(f"listen=127.0.0.1:{port}", flush=True)
grpc_port = free_port() if grpc else None
if grpc:
    print(f"grpc=127.0.0.1:{grpc_port}", flush=True)
ModelServer(http_port=port, enable_grpc=grpc, grpc_port=grpc_port or 8081,
            workers=1).start([RowFeatures(name)])
