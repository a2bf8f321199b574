"""`prologue serve` under load: images/s and p50/p95 latency with 1, 8 and 32 concurrent clients,
with and without request batching, on the tiny and mid bundles.

    python bench/serve_bench.py                                   # tiny and mid, 3 interleaved rounds
    python bench/serve_bench.py --presets tiny --rounds 1 --clients 1,8
    python bench/serve_bench.py --folder DIR                      # reuse DIR/bundle_<preset> (runtime_bench.build_bundle)

For each preset a random-weight model is exported (bench/runtime_bench.py's `build_bundle`, max
batch 8). Two servers run as separate processes (`prologue serve --backend cpu`, one with
`--no-batching`), side by side; only one is loaded at a time. Each measurement sends
`--requests` requests (at least 2 a client) of `--images` images each from `clients` concurrent
asyncio clients (httpx) in this process: images/s = images / wall time from the first request to
the last answer; latency = each request's time to its answer. Rounds interleave the two servers
and the client counts, so that machine noise hits both alike; the table gives the median over
rounds and the batched / unbatched ratio per round. The same (class, seed) requests go to both
servers, and their PNGs are compared (batching must not change an image). No assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

MODES = ("batched", "unbatched")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, batching: bool, window_ms: float):
    """(process, url) of a `prologue serve` process, once it answers /healthz."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "prologue_export.cli", "serve", "--bundle", str(bundle), "--port", str(port),
           "--backend", "cpu", "--log-level", "warning", "--max-queue", "1024", "--batch-window-ms", str(window_ms)]
    if not batching:
        cmd.append("--no-batching")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prologue serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("prologue serve did not start within 120 s")


def pixel_digest(png: bytes) -> str:
    """sha256 of a PNG's decoded pixels as uint8 [H, W, C] (comparable with a raw array's bytes)."""
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)))
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


async def load(url: str, clients: int, requests: int, images: int, first_seed: int, pixels: bool = False) -> dict:
    """`requests` requests from `clients` concurrent clients; images/s, latencies, digests by seed
    (of the PNG bytes, or with `pixels` of the decoded pixels)."""
    import httpx

    todo = list(range(requests))
    latencies, digests = [], {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client():
            while todo:
                i = todo.pop()
                seed = first_seed + i
                body = {"class_ids": [seed % 10], "n": images, "seed": seed}
                t0 = time.perf_counter()
                response = await http.post(url + "/v1/generate", json=body)
                latencies.append(time.perf_counter() - t0)
                response.raise_for_status()
                pngs = [base64.b64decode(im) for im in response.json()["images"]]
                digests[seed] = pixel_digest(pngs[0]) if pixels and images == 1 else hashlib.sha256(b"".join(pngs)).hexdigest()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"img_s": requests * images / wall, "p50_ms": float(np.percentile(latencies, 50)) * 1e3,
            "p95_ms": float(np.percentile(latencies, 95)) * 1e3, "wall_s": wall, "digests": digests}


def bench_preset(bundle: Path, args) -> list:
    servers = {mode: start_server(bundle, mode == "batched", args.window_ms) for mode in MODES}
    clients_list = [int(c) for c in args.clients.split(",")]
    runs = {(mode, c): [] for mode in MODES for c in clients_list}
    try:
        for mode in MODES:  # warm-up: sessions built, first calls made
            asyncio.run(load(servers[mode][1], 2, 4, args.images, 10**6))
        for r in range(args.rounds):
            for c in clients_list:
                n = max(args.requests, 2 * c)
                order = MODES if r % 2 == 0 else MODES[::-1]
                for mode in order:
                    runs[(mode, c)].append(asyncio.run(load(servers[mode][1], c, n, args.images, 1000 * r)))
                    print(f"  round {r} clients {c:>2} {mode:<9} {runs[(mode, c)][-1]['img_s']:7.2f} img/s", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    rows = []
    for c in clients_list:
        b, u = runs[("batched", c)], runs[("unbatched", c)]
        same = all(rb["digests"] == ru["digests"] for rb, ru in zip(b, u))
        ratios = [rb["img_s"] / ru["img_s"] for rb, ru in zip(b, u)]
        row = {"clients": c, "requests": max(args.requests, 2 * c), "images_per_request": args.images,
               "images_identical": same, "ratio_per_round": ratios, "ratio_median": float(np.median(ratios))}
        for mode, rs in (("batched", b), ("unbatched", u)):
            for key in ("img_s", "p50_ms", "p95_ms"):
                row[f"{mode}_{key}"] = float(np.median([x[key] for x in rs]))
            row[f"{mode}_img_s_per_round"] = [x["img_s"] for x in rs]
        rows.append(row)
    return rows


def load_parser(doc: str) -> argparse.ArgumentParser:
    """The options every load benchmark of a server shares (this one and triton_bench.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement (at least 2 a client)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", help="reuse (or build into) this folder's bundle_<preset>")
    return parser


def preset_bundles(args):
    """(preset, bundle, folder) for each of `--presets`: the random-weight bundle of runtime_bench's
    `build_bundle` in `--folder` (built when missing) or in a temporary folder removed at the end."""
    from runtime_bench import build_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        for preset in args.presets.split(","):
            bundle = folder / f"bundle_{preset}"
            if not (bundle / "manifest.json").exists():
                print(f"building the {preset} bundle", flush=True)
                build_bundle(preset, folder)
            print(f"{preset}: {bundle}", flush=True)
            yield preset, bundle, folder


def main(argv=None) -> int:
    parser = load_parser(__doc__)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--window-ms", dest="window_ms", type=float, default=10.0, help="the batched server's window")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_bench.json"))
    args = parser.parse_args(argv)
    from runtime_bench import save_json

    rows = []
    for preset, bundle, _ in preset_bundles(args):
        rows += [{"preset": preset, **row} for row in bench_preset(bundle, args)]
    print(f"{'preset':<6}{'clients':>8}{'batched img/s':>15}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'unbatched img/s':>17}{'p50 ms':>9}{'p95 ms':>9}{'ratio':>7}{'same':>6}")
    for r in rows:
        print(f"{r['preset']:<6}{r['clients']:>8}{r['batched_img_s']:>15.2f}{r['batched_p50_ms']:>9.0f}"
              f"{r['batched_p95_ms']:>9.0f}{r['unbatched_img_s']:>17.2f}{r['unbatched_p50_ms']:>9.0f}"
              f"{r['unbatched_p95_ms']:>9.0f}{r['ratio_median']:>7.2f}{str(r['images_identical']):>6}")
    print("ratio = batched / unbatched images/s, median of the per-round ratios; per round:")
    for r in rows:
        print(f"{r['preset']:<6}{r['clients']:>8}  " + " ".join(f"{x:.2f}" for x in r["ratio_per_round"]))
    save_json(args.out, rows, window_ms=args.window_ms, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
