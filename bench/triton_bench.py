"""Triton Inference Server against `prologue serve` on the same bundle: images/s and p50/p95 latency
at 1, 8 and 32 concurrent clients, Triton with and without dynamic batching.

    bash scripts/get_triton.sh                       # once: the server in .triton/
    python bench/triton_bench.py                     # tiny and mid, 3 interleaved rounds
    python bench/triton_bench.py --presets tiny --rounds 1 --clients 1,8

For each preset a random-weight model is exported (bench/runtime_bench.py's `build_bundle`, max batch
8). One tritonserver (tests/triton_server.py: the nvidia-pytriton 0.7.0 build, CPU, 127.0.0.1) serves
two models written by `prologue triton --backend cpu`: `prologue` (dynamic batching, 10 ms queue
delay, as `prologue serve --batch-window-ms 10`) and `prologue_nobatch` (no dynamic_batching block);
one instance each. Beside it, `prologue serve --backend cpu` (batching on). Clients: Triton over gRPC
(tritonclient, one client per thread), `prologue serve` over HTTP (httpx, bench/serve_bench.py);
one image per request, each request its own seed. images/s = images / wall time from the first
request to the last answer. Rounds interleave the three targets and the client counts; the table
gives medians over rounds and the ratio to `prologue serve` per round. The same (class, seed)
requests go to every target and the images are compared. No assertions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

TARGETS = ("triton-batched", "triton-unbatched", "serve")
MODELS = {"triton-batched": "prologue", "triton-unbatched": "prologue_nobatch"}


def triton_load(address: str, model: str, clients: int, requests: int, first_seed: int) -> dict:
    import tritonclient.grpc as grpc

    todo = list(range(requests))
    latencies, digests = [], {}

    def client():
        conn = grpc.InferenceServerClient(address)
        while todo:
            try:
                i = todo.pop()
            except IndexError:
                return
            seed = first_seed + i
            cls = grpc.InferInput("class_id", [1, 1], "INT64")
            cls.set_data_from_numpy(np.array([[seed % 10]], dtype=np.int64))
            sd = grpc.InferInput("seed", [1, 1], "UINT64")
            sd.set_data_from_numpy(np.array([[seed]], dtype=np.uint64))
            t0 = time.perf_counter()
            image = conn.infer(model, [cls, sd]).as_numpy("image")
            latencies.append(time.perf_counter() - t0)
            digests[seed] = hashlib.sha256(np.ascontiguousarray(image[0]).tobytes()).hexdigest()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    return {"img_s": requests / wall, "p50_ms": float(np.percentile(latencies, 50)) * 1e3,
            "p95_ms": float(np.percentile(latencies, 95)) * 1e3, "wall_s": wall, "digests": digests}


def serve_load(url: str, clients: int, requests: int, first_seed: int) -> dict:
    """serve_bench's load, one image a request, with the digests of the decoded pixels."""
    from serve_bench import load

    return asyncio.run(load(url, clients, requests, 1, first_seed, pixels=True))


def write_repositories(bundle: Path, folder: Path):
    from prologue_export.serve.triton import RepositoryOptions, write_repository

    batched = write_repository(bundle, folder / "repo_batched", RepositoryOptions(backend="cpu"), force=True)
    unbatched = write_repository(bundle, folder / "repo_unbatched",
                                 RepositoryOptions(name="prologue_nobatch", backend="cpu", dynamic_batching=False),
                                 force=True)
    return [batched, unbatched]


def bench_preset(bundle: Path, folder: Path, args) -> list:
    from serve_bench import start_server

    from tests import triton_server

    clients_list = [int(c) for c in args.clients.split(",")]
    runs = {(t, c): [] for t in TARGETS for c in clients_list}
    repos = write_repositories(bundle, folder)
    serve_proc, url = start_server(bundle, True, 10.0)
    try:
        with triton_server.running_triton(repos, folder / "triton.log") as triton:
            def measure(target, clients, requests, seed):
                if target == "serve":
                    return serve_load(url, clients, requests, seed)
                return triton_load(triton.grpc, MODELS[target], clients, requests, seed)

            for target in TARGETS:  # warm-up
                measure(target, 2, 4, 10**6)
            for r in range(args.rounds):
                for c in clients_list:
                    n = max(args.requests, 2 * c)
                    order = TARGETS if r % 2 == 0 else TARGETS[::-1]
                    for target in order:
                        runs[(target, c)].append(measure(target, c, n, 1000 * r))
                        print(f"  round {r} clients {c:>2} {target:<16} {runs[(target, c)][-1]['img_s']:7.2f} img/s",
                              flush=True)
    finally:
        serve_proc.terminate()
        serve_proc.wait(30)
    rows = []
    for c in clients_list:
        s = runs[("serve", c)]
        row = {"clients": c, "requests": max(args.requests, 2 * c)}
        for target in TARGETS:
            rs = runs[(target, c)]
            row[f"{target}_img_s"] = float(np.median([x["img_s"] for x in rs]))
            row[f"{target}_p50_ms"] = float(np.median([x["p50_ms"] for x in rs]))
            row[f"{target}_p95_ms"] = float(np.median([x["p95_ms"] for x in rs]))
            row[f"{target}_img_s_per_round"] = [x["img_s"] for x in rs]
            row[f"{target}_vs_serve_per_round"] = [x["img_s"] / y["img_s"] for x, y in zip(rs, s)]
            row[f"{target}_vs_serve"] = float(np.median(row[f"{target}_vs_serve_per_round"]))
        row["images_identical"] = all(runs[(t, c)][i]["digests"] == s[i]["digests"]
                                      for t in TARGETS for i in range(len(s)))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from serve_bench import load_parser, preset_bundles

    parser = load_parser(__doc__)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "triton_bench.json"))
    args = parser.parse_args(argv)
    from runtime_bench import save_json

    from tests import triton_server

    missing = triton_server.why_missing()
    if missing:
        print(f"triton_bench: {missing}", file=sys.stderr)
        return 2
    rows = []
    for preset, bundle, folder in preset_bundles(args):
        work = folder / f"triton_{preset}"
        work.mkdir(exist_ok=True)
        rows += [{"preset": preset, **row} for row in bench_preset(bundle, work, args)]
    head = f"{'preset':<6}{'clients':>8}" + "".join(f"{t + ' img/s':>22}{'p50 ms':>9}" for t in TARGETS)
    print(head + f"{'batched/serve':>15}{'unbatched/serve':>17}{'same':>6}")
    for r in rows:
        line = f"{r['preset']:<6}{r['clients']:>8}" + "".join(
            f"{r[t + '_img_s']:>22.2f}{r[t + '_p50_ms']:>9.0f}" for t in TARGETS)
        print(line + f"{r['triton-batched_vs_serve']:>15.2f}{r['triton-unbatched_vs_serve']:>17.2f}"
                     f"{str(r['images_identical']):>6}")
    print("ratios: Triton images/s / prologue serve images/s, median of the per-round ratios")
    save_json(args.out, rows, rounds=args.rounds, triton="tritonserver 2.51 (nvidia-pytriton 0.7.0), CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
