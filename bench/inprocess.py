"""The limit: the decoder in process, no server, on the cores this process may use.

    taskset -c 0 .venv/bin/python -m bench.inprocess models/mnist-vae/1 --duration 5 --json

Three measurements per batch size, each back-to-back calls for `--duration` seconds in all
(in interleaved bursts, see `measure`):

- `onnxruntime`: the decoder session alone (latents in, logits out), opened by the service's own
  `Runtime.load` (same session options: 1 intra-op thread, spinning off). The limit the
  service's ratios are taken against.
- `pipeline`: what the service computes for Sample without any gRPC: the seeded prior draw and
  the decoder run to uint8 images (in the graph where the version has the image output, else
  the numpy sigmoid and rounding), all with the service's functions. The gap
  between it and the service is the transport and the glue.
- `servicer`: the servicer's Sample (uint8) awaited directly on an event loop, with the real
  model, batcher and executor: the service's own Python without gRPC (and without serializing
  the reply). Service minus this is what gRPC costs; this minus `pipeline` is the glue.
- `torch`: PyTorch eager (`torch.inference_mode`, one thread per usable core), the decoder
  rebuilt from the ONNX file's own weights, so it is the very network the service runs (its
  parity with ONNX Runtime is recorded). What a hand-rolled PyTorch server would compute.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from service.model.runtime import Runtime
from service.sampling import prior_latents
from service.settings import Settings

WARMUP_S = 0.2
ROUNDS = 5  # each point is measured in this many bursts, interleaved with the other points

# (kind, batch size, calls of that batch one `fn()` makes, fn)
Case = tuple[str, int, int, Callable[[], object]]


def burst(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    """Calls of `fn` back to back for `seconds`: (calls, elapsed seconds)."""
    calls = 0
    start = now = time.perf_counter()
    end = start + seconds
    while now < end:
        fn()
        calls += 1
        now = time.perf_counter()
    return calls, now - start


def measure(cases: list[Case], duration: float) -> dict[str, list[dict[str, Any]]]:
    """Every case for `duration` seconds in all, in ROUNDS interleaved bursts (a shared machine
    drifts: interleaving spreads the drift over all cases), after a warm-up of each. A point's
    figure is its best burst: the most this machine gave it."""
    for *_, fn in cases:
        burst(fn, WARMUP_S)
    bursts: list[list[tuple[int, float]]] = [[] for _ in cases]
    for _ in range(ROUNDS):
        for i, (*_, fn) in enumerate(cases):
            bursts[i].append(burst(fn, duration / ROUNDS))
    result: dict[str, list[dict[str, Any]]] = {}
    for (kind, batch, repeats, _), runs in zip(cases, bursts, strict=True):
        rates = [batch * repeats * calls / elapsed for calls, elapsed in runs]
        best = max(range(ROUNDS), key=lambda r: rates[r])
        calls, elapsed = runs[best]
        result.setdefault(kind, []).append(
            {
                "batch": batch,
                "images_per_s": rates[best],
                "us_per_call": 1e6 * elapsed / (calls * repeats),
                "images_per_s_rounds": rates,
            }
        )
    return result


def version_settings(version_dir: Path, **overrides: Any) -> Settings:
    """The service's settings for serving `<repo>/<name>/<version>/` on the CPU provider."""
    return Settings(
        model_repo=version_dir.parent.parent,
        model_name=version_dir.parent.name,
        model_version=int(version_dir.name),
        provider="cpu",
        **overrides,
    )


def open_runtime(version_dir: Path, precision: str = "fp32") -> Runtime:
    settings = version_settings(version_dir, inference_workers=1, precision=precision)
    return Runtime.load(version_dir, settings)


def onnxruntime_cases(runtime: Runtime, sizes: list[int]) -> list[Case]:
    session, name = runtime.decoder, runtime.decoder.get_inputs()[0].name
    rng = np.random.default_rng(0)
    cases: list[Case] = []
    for n in sizes:
        feed = {name: rng.standard_normal((n, runtime.latent_size), dtype=np.float32)}
        logits = [session.get_outputs()[0].name]  # the network alone, not its uint8 tail
        cases.append(("onnxruntime", n, 1, partial(session.run, logits, feed)))
    return cases


def pipeline_cases(runtime: Runtime, sizes: list[int]) -> list[Case]:
    def sample(n: int) -> np.ndarray:
        latents = prior_latents(n, runtime.latent_size, 1, 1.0)
        return runtime.decode_uint8_sync(latents)

    return [("pipeline", n, 1, partial(sample, n)) for n in sizes]


class NoDeadline:
    """The one thing the servicer asks of a gRPC context on the success path."""

    def time_remaining(self) -> None:
        return None


def servicer_cases(version_dir: Path, sizes: list[int]) -> tuple[list[Case], Callable[[], None]]:
    """The servicer's Sample called directly on an event loop: the service's own Python (codec,
    seeds, batcher, executor hop, metrics) and the inference, without gRPC. Returns the cases
    and what closes them."""
    import uvloop

    from service.metrics import Metrics
    from service.model.served import open_model
    from service.proto.vae.v1 import vae_pb2
    from service.servicer import VaeServicer, pinned

    settings = version_settings(version_dir)  # default workers: the CPUs this process may use
    metrics = Metrics()
    model = open_model(settings, metrics)
    model.warm_up()
    servicer = VaeServicer(pinned(model), metrics, max_items=settings.max_items_per_request)
    loop = uvloop.new_event_loop()
    context: Any = NoDeadline()

    async def calls(request: vae_pb2.SampleRequest, k: int) -> None:
        for _ in range(k):
            await servicer.Sample(request, context)

    def run_calls(request: vae_pb2.SampleRequest, k: int) -> None:
        loop.run_until_complete(calls(request, k))

    cases: list[Case] = []
    for n in sizes:
        request = vae_pb2.SampleRequest(count=n, format=vae_pb2.IMAGE_FORMAT_UINT8)
        k = max(1, 64 // n)  # several calls per loop entry: entering the loop costs little
        cases.append(("servicer", n, k, partial(run_calls, request, k)))

    def close() -> None:
        loop.run_until_complete(model.close())
        loop.close()

    return cases, close


def torch_cases(version_dir: Path, runtime: Runtime, sizes: list[int]) -> tuple[list[Case], dict]:
    """PyTorch eager cases, and what to record about them (version, threads, parity)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from export.model import Decoder, VAEConfig

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    decoder = Decoder(VAEConfig.from_dict(manifest["config"])).eval()
    graph = onnx.load(str(version_dir / manifest["decoder"]["path"])).graph
    own = decoder.state_dict()  # the ONNX names are the module's own; the rest: the uint8 tail
    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
        for t in graph.initializer
        if t.name in own
    }
    decoder.load_state_dict(weights)  # strict: every parameter found
    rng = np.random.default_rng(0)
    check = rng.standard_normal((257, runtime.latent_size), dtype=np.float32)
    logits = runtime.decoder.get_outputs()[0].name
    (reference,) = runtime.decoder.run([logits], {runtime.decoder.get_inputs()[0].name: check})

    def forward(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return decoder(z)

    parity = float(np.abs(forward(torch.from_numpy(check)).numpy() - reference).max())
    cases: list[Case] = []
    for n in sizes:
        z = torch.from_numpy(rng.standard_normal((n, runtime.latent_size), dtype=np.float32))
        cases.append(("torch", n, 1, partial(forward, z)))
    info = {"version": torch.__version__, "threads": threads, "max_abs_diff_vs_onnxruntime": parity}
    return cases, info


def run(
    version_dir: Path,
    sizes: list[int],
    duration: float,
    torch: bool,
    *,
    only_ort: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Every kind (`only_ort`: ONNX Runtime alone) at every batch size."""
    runtime = open_runtime(version_dir, precision)
    cases = onnxruntime_cases(runtime, sizes)
    if only_ort:
        points = measure(cases, duration)
        runtime.close()
        return {"cpus": sorted(os.sched_getaffinity(0)), "rounds": ROUNDS, **_grouped(points)}
    cases += pipeline_cases(runtime, sizes)
    servicer, close_servicer = servicer_cases(version_dir, sizes)
    cases += servicer
    torch_info: dict[str, Any] = {}
    if torch:
        try:
            torch_cases_, torch_info = torch_cases(version_dir, runtime, sizes)
            cases += torch_cases_
        except ImportError as exc:  # torch is in the train extra
            torch_info = {"error": f"PyTorch not installed ({exc}): pip install -e '.[train]'"}
    points = measure(cases, duration)
    runtime_info = {"providers": list(runtime.info.providers), "intra_op_threads": 1}
    runtime.close()
    close_servicer()
    result: dict[str, Any] = {
        "cpus": sorted(os.sched_getaffinity(0)),
        "rounds": ROUNDS,
        **_grouped(points),
    }
    result["onnxruntime"].update(runtime_info)
    if torch:
        result["torch"] = {**torch_info, "points": points.get("torch", [])}
    return result


def _grouped(points: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {kind: {"points": kind_points} for kind, kind_points in points.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path, help="<repo>/<name>/<version>/")
    parser.add_argument("--sizes", default="1,64,1024", help="batch sizes, comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds a point")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch eager")
    parser.add_argument("--only-onnxruntime", action="store_true", help="the session alone")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--precision", default="fp32", help="a variant the manifest lists (--only-onnxruntime)"
    )
    args = parser.parse_args(argv)
    if args.precision != "fp32" and not args.only_onnxruntime:
        parser.error("--precision other than fp32 measures ONNX Runtime alone: --only-onnxruntime")
    sizes = [int(s) for s in args.sizes.split(",")]
    result = run(
        args.version_dir,
        sizes,
        args.duration,
        torch=not args.no_torch,
        only_ort=args.only_onnxruntime,
        precision=args.precision,
    )
    if args.json:
        print(json.dumps(result))
        return
    for kind in ("onnxruntime", "pipeline", "servicer", "torch"):
        for p in result.get(kind, {}).get("points", []):
            print(
                f"{kind:12} batch {p['batch']:5}: {p['images_per_s']:12,.0f} images/s "
                f"{p['us_per_call']:10.1f} us a call"
            )


if __name__ == "__main__":
    main()
