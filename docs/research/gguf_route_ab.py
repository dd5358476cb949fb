"""GGUF decode with one adapter by route, in one process: the routes take turns every 8 tokens inside
the same answers (`decode_rates`), each paired with the base's blocks on either side (issue 12; see
adapter-cost.md, "GGUF: the adapter inside the projection's own mul_mat").

    python docs/research/gguf_route_ab.py ~/.cache/edgelora/bench/adapters-x86-q8 2 12

"node" keeps the adapter in one graph node a projection, "matmul" (the default) runs it inside the
projection's mul_mat in a decode step. The bundle needs adapter `a` installed (bench/adapters.py
installs it).
"""

import sys
from pathlib import Path

import edgelora
from edgelora.runtime.engine import decode_rates
from edgelora.runtime.gguf import lora_route, set_lora_route

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402

bundle, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
e = edgelora.open_bundle(bundle).engine("gguf", threads=threads, n_ctx=1024)
activate = e._set_adapters


def routed(weights: dict, reset: bool = True) -> None:
    """A setting's route is read when llama.cpp builds its graph: set it, then make the engine build one."""
    set_lora_route(weights.pop("route", lora_route()))
    activate({}, reset=reset)
    activate(weights, reset=reset)


e._set_adapters = routed
was = lora_route()
try:
    rates = decode_rates(e, {"base": {}, "node": {"a": 1.0, "route": "node"}, "matmul": {"a": 1.0, "route": "matmul"}},
                         tokens=64, rounds=rounds, prompt=common.PROMPT)
finally:
    set_lora_route(was)
    e.close()
ms = 1e3 / rates["base"].tokens_per_second
print(f"{threads} threads, base {ms:.3f} ms a token; " + "; ".join(
    f"{k} {r.of_first:.4f}x ({r.of_first_ci[0]:.4f}-{r.of_first_ci[1]:.4f}), +{ms / r.of_first - ms:.3f} ms"
    for k, r in rates.items() if k != "base"))
