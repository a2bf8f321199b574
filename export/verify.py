"""Bundle verification: ONNX Runtime against the torch model (optimum-style).

1. Every axis the manifest declares dynamic is symbolic in the ONNX file, every static one fixed.
2. Each graph on fresh random inputs (sizes other than the export sample's) against torch, with
   the tolerances in `TOLERANCES`; the prologue generator's ids may differ only where torch's
   top-2 cosine margin is below `NEAR_TIE`; ar_step's sampled tokens must be identical.
3. Whole generations through ONNX Runtime (the runtime's own loop) give the same tokens as the
   torch reference sampler for the same seed: with CFG, without, and with a fixed prologue.
Any failure raises `VerificationError` naming the graph, the check and the numbers.
"""

from __future__ import annotations

import typing
import numpy as np
import torch

from ..ar import write_kv
from ..checkpoint import load_checkpoint
from ..config import migrate_config
from ..model import PrologueModel
from ..runtime.bundle import Bundle, BundleError
from ..runtime.errors import PrologueError
from ..runtime.loop import Noise, TokenLoop
from ..runtime.onnx_backend import OrtBackend
from ..sampling import sample
from ..runtime.contract import AR_STEP, DECODER, PROLOGUE_GENERATOR, cache_feeds, step_feeds
from ..runtime.settings import SamplingConfig, max_top_k
from ..tokenizer import uint8_to_images
from .graphs import ARStepContract, DecoderModule, PrologueGeneratorModule

# max abs error allowed against torch, per graph output (fp32 graphs)
TOLERANCES = {"fp32": {"image_float": 1e-4, "logits": 1e-4, "kv": 1e-4}}
NEAR_TIE = 1e-4  # ids/tokens may differ only where the top-2 margin in torch is below this


class VerificationError(PrologueError, RuntimeError):
    """An exported bundle that does not reproduce its checkpoint."""


def check_dynamic_axes(bundle: Bundle) -> dict:
    import onnx

    result = {}
    for name, graph in bundle.graphs.items():
        proto = onnx.load_model_from_string(bundle.read_verified(graph["file"]))  # the checked bytes; weights unneeded
        declared = {s["name"]: s["shape"] for s in graph["inputs"] + graph["outputs"]}
        values = list(proto.graph.input) + list(proto.graph.output)
        for value in values:
            if value.name not in declared:
                continue
            dims = value.type.tensor_type.shape.dim
            want = declared[value.name]
            if len(dims) != len(want):
                raise VerificationError(f"{name}: {value.name} has rank {len(dims)} in the file, {len(want)} declared")
            for i, (dim, w) in enumerate(zip(dims, want)):
                if isinstance(w, str) and dim.HasField("dim_value"):
                    raise VerificationError(f"{name}: axis {i} of {value.name} is declared dynamic ({w!r}) but the "
                                            f"file fixes it to {dim.dim_value}")
                if isinstance(w, int) and dim.HasField("dim_value") and dim.dim_value != w:
                    raise VerificationError(f"{name}: axis {i} of {value.name} is {dim.dim_value}, declared {w}")
                if isinstance(w, int) and not dim.HasField("dim_value"):
                    raise VerificationError(f"{name}: axis {i} of {value.name} is declared static ({w}) but symbolic")
        result[name] = "ok"
    return result


def _batch(backend: OrtBackend) -> int:
    """The batch checked: 3 (not the export sample's 2), or less when the bundle serves less."""
    return min(3, backend.bundle.max_batch)


def _max_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise VerificationError(message)


@torch.no_grad()
def check_decoder(model: PrologueModel, backend: OrtBackend, tol: dict, rng: np.random.Generator) -> dict:
    t = model.config.tokenizer
    ids = rng.integers(0, t.visual_codebook_size, (_batch(backend), t.num_visual_tokens))
    ref_u8, ref_f = DecoderModule(model)(torch.from_numpy(ids))
    got_u8, got_f = backend.run(DECODER, {"visual_ids": ids})
    err = _max_err(got_f, ref_f)
    _require(err <= tol["image_float"], f"decoder: image_float differs from torch by {err:.3g} > {tol['image_float']}")
    diff = np.abs(got_u8.astype(int) - ref_u8.numpy().astype(int))
    y = 127.5 * ref_f.double().numpy() + 128
    near = np.abs(y - np.round(y)) < 1e3 * tol["image_float"]
    _require(diff.max() <= 1 and bool(np.all(near[diff == 1])),
             f"decoder: uint8 image differs from torch by up to {diff.max()} away from rounding boundaries")
    return {"image_float_max_err": err, "uint8_pixels_off_by_one": int((diff == 1).sum())}


@torch.no_grad()
def check_prologue_generator(model: PrologueModel, backend: OrtBackend, rng: np.random.Generator) -> dict:
    t = model.config.tokenizer
    images = rng.integers(0, 256, (_batch(backend), t.channels, t.image_size, t.image_size), dtype=np.uint8)
    ref_p, ref_v = PrologueGeneratorModule(model)(torch.from_numpy(images))
    got_p, got_v = backend.run(PROLOGUE_GENERATOR, {"image": images})
    x = uint8_to_images(torch.from_numpy(images))
    hidden = model.tokenizer.encoder_hidden(x)
    report = {}
    for name, ref, got, quant, h in (
        ("visual_ids", ref_v, got_v, model.tokenizer.visual_quantizer, hidden["visual"]),
        ("prologue_ids", ref_p, got_p, model.tokenizer.prologue_quantizer, hidden.get("prologue")),
    ):
        if quant is None:
            continue
        top2 = torch.topk(quant.cosine_logits(h)[1], 2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1]).numpy()
        wrong = got != ref.numpy()
        _require(bool(np.all(margin[wrong] < NEAR_TIE)),
                 f"prologue_generator: {int(wrong.sum())} {name} differ from torch away from ties")
        report[f"{name}_mismatches_at_ties"] = int(wrong.sum())
    return report


@torch.no_grad()
def check_ar_step(model: PrologueModel, backend: OrtBackend, tol: dict, rng: np.random.Generator) -> dict:
    ar, v = model.ar, model.config.vocab()
    B, T = _batch(backend), 4
    classes = rng.integers(0, model.config.num_classes, B)
    rows = np.concatenate([classes, np.full(B, model.config.null_class)])
    ids = rng.integers(0, v.vocab_size, (2 * B, T))
    ids[:, 0] = rows + v.vocab_size
    k = np.zeros((ar.cfg.layers, 2 * B, ar.cfg.heads, v.seq_len, ar.cfg.head_dim), np.float32)
    vv = np.zeros_like(k)
    contract = ARStepContract(model, max_batch=max(B, 2))  # the torch module; its contract's axes do not matter
    module = contract.module()
    report = {"logits_max_err": 0.0, "kv_max_err": 0.0, "token_mismatches": 0}
    start = 0
    steps = ((T, dict(cfg_scale=2.5, temperature=1.0, top_k=0, top_p=0.0)),
             (1, dict(cfg_scale=1.7, temperature=0.8, top_k=5, top_p=0.9)),
             (1, dict(cfg_scale=3.0, temperature=1.2, top_k=0, top_p=0.7)))
    for n, sampling in steps:
        feed = ids[:, :n] if start == 0 else rng.integers(0, v.vocab_size, (2 * B, n))
        uniform = rng.random((B, v.vocab_size), dtype=np.float32)
        feeds = {**step_feeds(input_ids=feed, start_pos=start, uniform=uniform, **sampling), **cache_feeds(k, vv)}
        ref = module(*[torch.from_numpy(np.asarray(feeds[s.name])) for s in contract.inputs])
        got = backend.run(AR_STEP, feeds)
        report["logits_max_err"] = max(report["logits_max_err"], _max_err(got[3], ref[3]))
        report["kv_max_err"] = max(report["kv_max_err"], _max_err(got[1], ref[1]), _max_err(got[2], ref[2]))
        report["token_mismatches"] += int((got[0] != ref[0].numpy()).sum())  # must stay 0: no tie margin here
        write_kv(k, vv, ref[1].numpy(), ref[2].numpy(), start)
        start += n
    _require(report["logits_max_err"] <= tol["logits"],
             f"ar_step: logits differ from torch by {report['logits_max_err']:.3g} > {tol['logits']}")
    _require(report["kv_max_err"] <= tol["kv"], f"ar_step: K/V differ from torch by {report['kv_max_err']:.3g} > {tol['kv']}")
    _require(report["token_mismatches"] == 0, "ar_step: sampled tokens differ from torch")
    return report


VERIFY_TOP_K = 20  # the top-k of the no-CFG case; at most what the graph keeps (`max_top_k`: the smallest codebook)


def generation_cases(model: PrologueModel) -> typing.List[typing.Tuple[str, dict, bool]]:
    vocab = model.config.vocab()
    top_k = min(VERIFY_TOP_K, max_top_k(vocab))  # a 16-code prologue codebook keeps 16
    cases = [("cfg_split" if vocab.has_prologue else "cfg_cosine",
              {"semantic_cfg_schedule": "constant", "semantic_cfg_scale": 0.7, "visual_cfg_schedule": "cosine",
               "visual_cfg_scale": 3.0, "visual_cfg_power": 0.5} if vocab.has_prologue
              else {"cfg": 4.0, "cfg_schedule": "cosine", "cfg_power": 1.5}, False),
             ("no_cfg_temperatures_topk",
              {"cfg": 0.0, "semantic_temperature": 0.8, "temperature": 0.9, "topK": top_k}, False)]
    if model.config.vocab().has_prologue:
        cases.append(("fixed_prologue", {"cfg": 2.0}, True))
    return cases


def _generations(model: PrologueModel, bundle: Bundle, backend: OrtBackend, classes: np.ndarray, seed: int):
    """(case name, settings, torch sampler tokens, ONNX Runtime tokens) for every generation case."""
    v = model.config.vocab()
    for name, settings, fixed in generation_cases(model):
        prologue = None
        if fixed:
            first = sample(model.ar, classes, settings, seed=seed + 100)
            prologue = (first[:, :v.num_prologue_tokens] - v.prologue_offset).cpu().numpy()
        ref = sample(model.ar, classes, settings, seed=seed, prologue_ids=prologue).cpu().numpy()
        make_state = lambda rows, batch: backend.ar_state(rows, batch, bundle.ar_cache_shape(rows))  # noqa: E731
        noise = Noise(len(classes), v.seq_len, v.vocab_size, seed=seed)
        got = TokenLoop(make_state, bundle.vocab, bundle.num_classes, classes, SamplingConfig.coerce(settings), noise,
                        prologue_ids=prologue).run()
        yield name, settings, ref, got


@torch.no_grad()
def check_generation(model: PrologueModel, bundle: Bundle, backend: OrtBackend, seed: int = 0) -> dict:
    classes = np.arange(_batch(backend)) % model.config.num_classes
    report = {}
    for name, settings, ref, got in _generations(model, bundle, backend, classes, seed):
        same = int((got == ref).all(axis=1).sum())
        _require(same == len(classes), f"generation '{name}': ONNX Runtime tokens differ from the torch sampler in "
                 f"{len(classes) - same} of {len(classes)} sequences (seed {seed})")
        report[name] = {"sequences": len(classes), "identical": same, "settings": settings}
    return report


@torch.no_grad()
def quantized_agreement(model: PrologueModel, bundle: Bundle, graph: str, seed: int = 0) -> dict:
    """Token agreement of a weight-only quantized AR graph with the fp32 torch sampler (reported,
    not required: quantized weights change the distribution)."""
    backend = OrtBackend(bundle, "cpu", ar_graph=graph)
    classes = np.arange(min(4, bundle.max_batch)) % model.config.num_classes
    return {name: {"token_agreement": float((got == ref).mean()), "sequences_identical": int((got == ref).all(1).sum()),
                   "sequences": len(classes)}
            for name, _, ref, got in _generations(model, bundle, backend, classes, seed)}


def verify_bundle(bundle_dir, model: typing.Optional[PrologueModel] = None, checkpoint=None, log=print,
                  digest: typing.Optional[str] = None) -> dict:
    """Verify a bundle against its checkpoint; returns the report (also stored in the manifest).
    `digest`: the sha256 its manifest must have (`Bundle(path, digest=...)`)."""
    if model is None:
        if checkpoint is None:
            raise VerificationError("verification needs the checkpoint the bundle came from (--checkpoint CKPT)")
        model = load_checkpoint(checkpoint)
    model.eval()
    try:
        bundle = Bundle(bundle_dir, digest=digest)
    except BundleError as exc:
        raise VerificationError(str(exc)) from None
    if migrate_config(bundle.manifest["model"]) != model.config.to_dict():  # a version-1 config is the same model
        raise VerificationError(f"{bundle_dir} was exported from a model with another config than the checkpoint")
    tol = TOLERANCES[bundle.precision]
    backend = OrtBackend(bundle, "cpu")
    rng = np.random.default_rng(1234)
    report = {"tolerances": {**tol, "near_tie": NEAR_TIE}, "provider": backend.providers[0]}
    log("[verify] dynamic axes ...")
    report["dynamic_axes"] = check_dynamic_axes(bundle)
    try:
        log("[verify] decoder vs torch ...")
        report["decoder"] = check_decoder(model, backend, tol, rng)
        log("[verify] prologue_generator vs torch ...")
        report["prologue_generator"] = check_prologue_generator(model, backend, rng)
        if model.ar is not None:
            log("[verify] ar_step vs torch ...")
            report["ar_step"] = check_ar_step(model, backend, tol, rng)
            log("[verify] whole generations, ONNX Runtime vs torch sampler ...")
            report["generation"] = check_generation(model, bundle, backend)
            for graph in sorted(g for g in bundle.graphs if g.startswith("ar_step_")):
                log(f"[verify] {graph}: token agreement with fp32 (reported) ...")
                report[graph] = quantized_agreement(model, bundle, graph)
    except BundleError as exc:
        raise VerificationError(str(exc)) from None
    report["passed"] = True
    return report


