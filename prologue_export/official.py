"""Import the authors' released checkpoints (hub repo `Zyriix/prologue`) into our format.

The released folders are `accelerate` save_state directories (OFFICIAL_MODEL.md §1): only the
`model*.safetensors` files are read (the rest are pickles and are never opened). Which slot holds
what:

- tokenizer encoder + quantizers: `model_2.safetensors` (EMA), decoder: `model_3.safetensors` (EMA);
- AR: `model.safetensors` of an `ar-*` folder (non-EMA; `model_1` is the EMA copy).

Key mapping: our submodules keep the release's names below the top-level prefix, so the mapping
is a prefix rename (`OFFICIAL_PREFIXES`). `module.` / `_orig_mod.` wrappers are stripped; the
legacy and constant entries the release's loaders drop are ignored; anything else unknown is an
error. Sizes that tensor shapes reveal are read off them and must agree with the configuration
(from `--official-config` or `--preset`): a contradiction is an error, never a silent fix.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_state_strict, read_tensors, save_checkpoint
from .model import PrologueModel
from .config import ARConfig, ConfigError, ModelConfig, TokenizerConfig, TransformerSize, model_preset

# official top-level prefix -> ours
TOKENIZER_PREFIXES = {
    "enc.": "encoder.",
    "quantizer.": "visual_quantizer.",
    "semantic_quantizer.": "prologue_quantizer.",
    "semantic_enc.": "prologue_encoder.",
    "dec.": "decoder.",
}
AR_PREFIXES = {"bos_emb.": "class_emb.", "semantic_emb.": "token_emb.", "ar_model.": "transformer."}
OFFICIAL_PREFIXES = {"tokenizer": TOKENIZER_PREFIXES, "ar": AR_PREFIXES}

# Entries the official loaders drop on purpose, and constant buffers we re-create.
IGNORED_KEYS = ("logit_mask", "uncond_ar_labels")
IGNORED_SUFFIXES = ("pos_select_mask", "codebook_size_per_pos")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

ENCODER_SLOT = "model_2.safetensors"
DECODER_SLOT = "model_3.safetensors"
AR_SLOT = "model.safetensors"
# `prologue-onestage-joint`: the paper's OneStage row uses the non-EMA tokenizer and the
# class-conditional AR trained jointly, stored in the tokenizer folder itself.
ONESTAGE_SLOTS = ("model.safetensors", "model_1.safetensors", "model_5.safetensors")


class OfficialImportError(CheckpointError):
    """The released files and the configuration given cannot be converted."""


def strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.split(".")[-1] in IGNORED_SUFFIXES


def map_key(key: str, component: str) -> typing.Optional[str]:
    """Official state-dict key -> our key (None for ignored entries). Unknown keys raise."""
    key = strip_wrappers(key)
    if is_ignored(key):
        return None
    for official, ours in OFFICIAL_PREFIXES[component].items():
        if key.startswith(official):
            return ours + key[len(official) :]
    raise OfficialImportError(f"unexpected {component} tensor {key!r}: not part of the released model layout")


def map_state(state: typing.Dict[str, torch.Tensor], component: str, source: str) -> typing.Dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        ours = map_key(key, component)
        if ours is None:
            continue
        if ours in out:
            raise OfficialImportError(f"{source}: tensor {key!r} appears twice (with and without a wrapper prefix)")
        out[ours] = tensor.float() if tensor.is_floating_point() else tensor
    return out


# ---------------------------------------------------------------------------------------------
# official resolved config -> ModelConfig


def config_from_official(data: dict, with_ar: bool = True) -> ModelConfig:
    """Our ModelConfig from the release's resolved config (as in `fixture_a/config.json`)."""
    rc = data.get("resolved_config", data)
    try:
        _check_supported(rc, with_ar)
        enc, dec = rc["Encoder"], rc["Decoder"]
        if not rc.get("Prologue", False):
            variant = "2d"
        elif "SemanticEncoder" in rc or rc.get("share_semantic_encoder") is False:
            variant = "post"
        else:
            variant = "prologue"
        grid_theta = float(dec["rope_theta"] if dec["rope_input_type"] == "hw" else dec["rope_ctx_theta"])
        seq_theta = float(enc["rope_theta"] if enc.get("context_type") == "concat" else 10000.0)
        z_len = int(rc["z_len"]) if variant != "2d" else 0
        sq = rc.get("SemanticQuantizer", {})
        tok = TokenizerConfig(
            variant=variant,
            image_size=int(rc["image_size"]),
            patch_size=int(rc["patch_size"]),
            channels=int(rc["num_channels"]),
            encoder=TransformerSize(int(enc["dim"]), int(enc["layer_num"]), int(enc["heads"])),
            decoder=TransformerSize(int(dec["dim"]), int(dec["layer_num"]), int(dec["heads"])),
            visual_codebook_size=int(rc["Quantizer"]["codebook_size"]),
            prologue_codebook_size=int(sq["codebook_size"]) if variant != "2d" else 0,
            num_prologue_tokens=z_len,
            prologue_encoder=(
                TransformerSize(int(rc["SemanticEncoder"]["dim"]), int(rc["SemanticEncoder"]["layer_num"]),
                                int(rc["SemanticEncoder"]["heads"]))
                if variant == "post" else None
            ),
            code_dim=int(rc["z_dim"]),
            cond_dim=int(rc["cond_emb_dim"]),
            mlp_ratio=str(enc["mlp_ratio"]),
            prologue_encoder_mlp_ratio=str(rc["SemanticEncoder"]["mlp_ratio"]) if variant == "post" else "11/4",
            rope_axes=[int(a) for a in enc["rope_axes_dim"]],
            rope_theta_grid=grid_theta,
            rope_theta_seq=seq_theta,
            prologue_softmax_temperature=float(sq.get("temperature", 0.1)) if variant != "2d" else 0.1,
            vq_beta=float(rc["Quantizer"].get("vq_beta", 0.25)),
        )
        ar = None
        if with_ar:
            a = rc["ARModel"]
            ar = ARConfig(
                dim=int(a["dim"]), layers=int(a["layer_num"]), heads=int(a["heads"]),
                mlp_ratio=str(a["mlp_ratio"]), rope_axes=[int(x) for x in a["rope_axes_dim"]],
                rope_theta=float(a["rope_theta"]), cond_dim=int(a.get("cond_dim", rc["cond_emb_dim"])),
            )
        return ModelConfig(num_classes=int(rc["num_classes"]) - 1, tokenizer=tok, ar=ar).validate()
    except ConfigError as exc:
        raise OfficialImportError(f"the official config does not describe a valid model: {exc}") from None
    except KeyError as exc:
        raise OfficialImportError(f"official config lacks the entry {exc.args[0]!r}: pass the resolved config "
                           "(a JSON like fixture_a/config.json or official_keys/*.json)") from None


def _check_supported(rc: dict, with_ar: bool) -> None:
    def need(where: str, value, expected):
        if value != expected:
            raise OfficialImportError(f"unsupported official config: {where} = {value!r} (this package implements {expected!r})")

    need("norm_layer", rc.get("norm_layer", "RMSNorm"), "RMSNorm")
    need("ffn_type", rc.get("ffn_type", "geglu"), "geglu")
    need("rope", rc.get("rope", True), True)
    need("abs_pos", rc.get("abs_pos", False), False)
    need("ae_no_label", rc.get("ae_no_label", True), True)
    if rc.get("Prologue", False) and not rc.get("use_eos", True):
        raise OfficialImportError("unsupported official config: Prologue without use_eos")
    enc = rc.get("Encoder", {})
    if not rc.get("Prologue", False) and enc.get("context_type") == "concat":
        raise OfficialImportError("the 1-D baseline tokenizer (`1d-tokenizer`) is not supported by this package")
    # The release reads this flag only when `Prologue` is true (`Prologue and not
    # share_semantic_codebook`, models.py:710, 717, 862, 906): the 2d / 1d configs ship it as
    # True, and it changes nothing there.
    if rc.get("Prologue", False) and rc.get("share_semantic_codebook", False):
        raise OfficialImportError("unsupported official config: share_semantic_codebook = True")
    if with_ar:
        a = rc.get("ARModel", {})
        need("ARModel.conditional_injection", a.get("conditional_injection", "llamagen"), "llamagen")
        need("ARModel.tied_embedding", a.get("tied_embedding", False), False)
        need("ARModel.input_layer", a.get("input_layer", False), False)


# ---------------------------------------------------------------------------------------------
# facts readable from tensor shapes


def shape_facts(tok: typing.Dict[str, torch.Tensor], ar: typing.Optional[typing.Dict[str, torch.Tensor]]) -> typing.Dict[str, typing.Any]:
    """Sizes that the (mapped) tensors reveal, keyed by config field path."""
    facts: typing.Dict[str, typing.Any] = {}

    def stack(prefix: str, field: str, state):
        if f"{prefix}.cond_proj.0.weight" not in state:
            return
        layers = {int(k.split(".")[2]) for k in state if k.startswith(f"{prefix}.layers.")}
        dim = state[f"{prefix}.cond_proj.0.weight"].shape  # [C, N]
        q_norm = state.get(f"{prefix}.layers.0.attn1.q_norm.weight")
        width = state[f"{prefix}.layers.0.attn1.to_q.weight"].shape[0] if layers else None
        facts[f"{field}.layers"] = len(layers)
        if width is not None:
            facts[f"{field}.dim"] = width
            facts[f"{field}.heads"] = width // q_norm.shape[0]
        facts[f"{field}.cond_dim"] = dim[0]
        facts[f"{field}.num_classes"] = dim[1] - 1

    stack("encoder", "tokenizer.encoder", tok)
    stack("decoder", "tokenizer.decoder", tok)
    stack("prologue_encoder", "tokenizer.prologue_encoder", tok)
    if "visual_quantizer.embedding.weight" in tok:
        k, z = tok["visual_quantizer.embedding.weight"].shape
        facts["tokenizer.visual_codebook_size"] = k
        facts["tokenizer.code_dim"] = z
    if "encoder.input_layer.weight" in tok:
        facts["tokenizer.patch_dim"] = tok["encoder.input_layer.weight"].shape[1]
    has_pq = "prologue_quantizer.embedding.weight" in tok
    facts["tokenizer.variant"] = "post" if "prologue_encoder.cond_proj.0.weight" in tok else ("prologue" if has_pq else "2d")
    if has_pq:
        facts["tokenizer.prologue_codebook_size"] = tok["prologue_quantizer.embedding.weight"].shape[0]
        q = tok.get("encoder.learnable_query", tok.get("prologue_encoder.learnable_query"))
        if q is not None:
            facts["tokenizer.num_prologue_tokens"] = q.shape[1]
    if ar is not None:
        stack("transformer", "ar", ar)
        if "token_emb.weight" in ar:
            facts["ar.vocab_size"] = ar["token_emb.weight"].shape[0]
        if "class_emb.weight" in ar:
            facts["ar.num_classes"] = ar["class_emb.weight"].shape[0] - 1
    return facts


def config_facts(cfg: ModelConfig) -> typing.Dict[str, typing.Any]:
    """The same facts as `shape_facts`, computed from a config."""
    t = cfg.tokenizer
    facts: typing.Dict[str, typing.Any] = {
        "tokenizer.variant": t.variant,
        "tokenizer.visual_codebook_size": t.visual_codebook_size,
        "tokenizer.code_dim": t.code_dim,
        "tokenizer.patch_dim": t.patch_dim,
    }
    stacks = [("tokenizer.encoder", t.encoder), ("tokenizer.decoder", t.decoder)]
    if t.prologue_encoder is not None:
        stacks.append(("tokenizer.prologue_encoder", t.prologue_encoder))
    if t.has_prologue:
        facts["tokenizer.prologue_codebook_size"] = t.prologue_codebook_size
        facts["tokenizer.num_prologue_tokens"] = t.num_prologue_tokens
    for name, size in stacks:
        facts.update({f"{name}.dim": size.dim, f"{name}.layers": size.layers, f"{name}.heads": size.heads,
                      f"{name}.cond_dim": t.cond_dim, f"{name}.num_classes": cfg.num_classes})
    if cfg.ar is not None:
        a = cfg.ar
        facts.update({"ar.dim": a.dim, "ar.layers": a.layers, "ar.heads": a.heads, "ar.cond_dim": a.cond_dim,
                      "ar.num_classes": cfg.num_classes, "ar.vocab_size": cfg.vocab().vocab_size})
    return facts


def compare_facts(found: dict, configured: dict, what: str) -> None:
    clashes = [f"{k}: files say {found[k]!r}, {what} says {configured[k]!r}"
               for k in sorted(found) if k in configured and found[k] != configured[k]]
    if clashes:
        raise OfficialImportError("the released files contradict the configuration:\n  " + "\n  ".join(clashes))


# ---------------------------------------------------------------------------------------------


def _slot(folder: Path, name: str, meaning: str) -> Path:
    file = folder / name
    if not file.is_file():
        present = sorted(p.name for p in folder.glob("model*.safetensors")) if folder.is_dir() else []
        raise OfficialImportError(
            f"{file} not found: the {meaning} lives in {name} of a released folder"
            + (f" (this folder has: {', '.join(present)})" if present else f" ({folder} has no model*.safetensors)")
        )
    return file


def inference_slots(with_ar: bool, onestage: bool = False) -> typing.List[typing.Tuple[str, str, str, str]]:
    """(folder, file, component, what it holds) of every file an import reads, in reading order.

    folder: "tokenizer" or "ar" (the `ar-*` folder); OneStage reads its AR from its tokenizer folder.
    The one owner of which released file is read (`cli/hub.py` builds its downloads from it).
    """
    if onestage:
        slots = [("tokenizer", ONESTAGE_SLOTS[0], "tokenizer", "OneStage encoder (non-EMA)"),
                 ("tokenizer", ONESTAGE_SLOTS[1], "tokenizer", "OneStage decoder (non-EMA)")]
        ar = ("tokenizer", ONESTAGE_SLOTS[2], "ar", "OneStage class-conditional AR (non-EMA)")
    else:
        slots = [("tokenizer", ENCODER_SLOT, "tokenizer", "EMA encoder"), ("tokenizer", DECODER_SLOT, "tokenizer", "EMA decoder")]
        ar = ("ar", AR_SLOT, "ar", "non-EMA AR model (what the paper's numbers used)")
    return slots + [ar] if with_ar else slots


def slot_files(tokenizer_dir, ar_dir=None, onestage: bool = False) -> typing.List[typing.Tuple[Path, str, str]]:
    """(file, component, what it holds) of the files an import of these folders reads; missing ones raise."""
    if onestage and ar_dir is not None:
        raise OfficialImportError("--onestage reads the AR from the tokenizer folder (model_5); do not pass --ar")
    folders = {"tokenizer": Path(tokenizer_dir), "ar": Path(ar_dir) if ar_dir is not None else None}
    return [(_slot(folders[folder], name, holds), component, holds)
            for folder, name, component, holds in inference_slots(onestage or ar_dir is not None, onestage)]


def read_official(tokenizer_dir, ar_dir=None, onestage: bool = False) -> typing.Tuple[dict, typing.Optional[dict]]:
    """Mapped tokenizer (EMA encoder + EMA decoder) and AR (non-EMA) tensors.

    onestage: the OneStage folder's slots instead (non-EMA encoder/decoder, AR in `model_5`).
    """
    tok: typing.Dict[str, torch.Tensor] = {}
    ar = None
    for file, component, _holds in slot_files(tokenizer_dir, ar_dir, onestage):
        part = map_state(read_tensors(file), component, str(file))
        if component == "ar":
            ar = part
            continue
        overlap = set(part) & set(tok)
        if overlap:
            raise OfficialImportError(f"{file} repeats tensors of another slot: {sorted(overlap)[:4]}")
        tok.update(part)
    return tok, ar


def folder_source(tokenizer_dir, ar_dir=None, onestage: bool = False) -> dict:
    """Provenance of a local-folder import, recorded in the checkpoint's config.json."""
    from .runtime.files import sha256_file

    files = [{"path": str(Path(file).resolve()), "holds": holds, "bytes": file.stat().st_size, "sha256": sha256_file(file)}
             for file, _component, holds in slot_files(tokenizer_dir, ar_dir, onestage)]
    return {"kind": "folders", "files": files}


def import_official(
    tokenizer_dir,
    out,
    ar_dir=None,
    official_config: typing.Optional[typing.Union[str, Path, dict]] = None,
    preset: typing.Optional[str] = None,
    onestage: bool = False,
    source: typing.Optional[dict] = None,
) -> PrologueModel:
    """Convert released folders into our checkpoint at `out`; returns the loaded model.

    source: provenance to record in config.json (`cli/hub.py` passes repo, commit, sha256); by
    default the folders' files with their sha256.
    """
    tok_state, ar_state = read_official(tokenizer_dir, ar_dir, onestage=onestage)
    with_ar = ar_state is not None
    configs = []
    if official_config is not None:
        data = official_config
        if not isinstance(data, dict):
            try:
                data = json.loads(Path(official_config).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise OfficialImportError(f"cannot read the official config {official_config}: {exc}") from None
        configs.append(("the official config", config_from_official(data, with_ar=with_ar)))
    if preset is not None:
        found_classes = shape_facts(tok_state, None).get("tokenizer.encoder.num_classes")
        cfg = model_preset(preset, num_classes=found_classes)
        if not with_ar:
            cfg.ar = None
        configs.append((f"preset {preset!r}", cfg))
    if not configs:
        raise OfficialImportError("sizes such as heads, RoPE axes and image geometry are not in the tensors: "
                           "pass --official-config FILE (the resolved config JSON) or --preset NAME")
    found = shape_facts(tok_state, ar_state)
    for what, cfg in configs:
        compare_facts(found, config_facts(cfg), what)
    if len(configs) == 2 and configs[0][1].to_dict() != configs[1][1].to_dict():
        a, b = configs[0][1].to_dict(), configs[1][1].to_dict()
        diffs = sorted(_diff(a, b))
        raise OfficialImportError("--official-config and --preset disagree: " + "; ".join(diffs))
    config = configs[0][1]
    with torch.device("meta"):
        model = PrologueModel(config)
    try:
        load_state_strict(model.tokenizer, tok_state, f"tokenizer files in {tokenizer_dir}")
        if with_ar:
            load_state_strict(model.ar, ar_state, f"AR file in {tokenizer_dir if onestage else ar_dir}")
    except CheckpointError as exc:
        raise OfficialImportError(f"the released files do not fit the configured model: {exc}") from None
    model.eval()
    if source is None:
        source = folder_source(tokenizer_dir, ar_dir, onestage)
    save_checkpoint(model, out, source=source)
    return model


def _diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    elif a != b:
        yield f"{path}: {a!r} vs {b!r}"
