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
(from `--official-config` or `--preset`): a contradiction is an error, never a silent fix. All of
that is decided from the files' safetensors headers (names, shapes, dtypes, sizes) before any
tensor data is read; `--official-config` is strict JSON (`runtime.files.read_json`) checked field
by field (`config_from_official`).
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, TensorInfo, check_state, dtype_name, load_state_strict, read_header,
                         read_tensors, save_checkpoint)
from .model import PrologueModel
from .config import ARConfig, ConfigError, ModelConfig, TokenizerConfig, TransformerSize, model_preset
from .runtime.errors import short_repr
from .runtime.files import FileFormatError, read_json, shown

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

# The release's weights are float32 (OFFICIAL_MODEL.md §1); bfloat16 / float16 copies are widened
# to float32 (exactly). The ignored legacy/constant entries (`pos_select_mask`: X x K_v floats, 16 MiB
# in the largest release) are read but dropped: at most this many bytes of them per file.
OFFICIAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_IGNORED_BYTES = 64 * 1024**2


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


def map_names(keys: typing.Iterable[str], component: str, source: str) -> typing.Dict[str, str]:
    """Official key -> our key of every entry that is not ignored."""
    out: typing.Dict[str, str] = {}
    taken: typing.Set[str] = set()  # a set: a header of 100k names must not cost 100k^2
    for key in keys:
        ours = map_key(key, component)
        if ours is None:
            continue
        if ours in taken:
            raise OfficialImportError(f"{source}: tensor {key!r} appears twice (with and without a wrapper prefix)")
        out[key] = ours
        taken.add(ours)
    return out


def map_state(state: typing.Dict[str, torch.Tensor], component: str, source: str) -> typing.Dict[str, torch.Tensor]:
    return {ours: state[key].float() if state[key].is_floating_point() else state[key]
            for key, ours in map_names(state, component, source).items()}


def map_header(file: Path, component: str) -> typing.Dict[str, TensorInfo]:
    """The mapped header of a released file (our key -> `TensorInfo`), refused before any read if a
    weight's dtype is not `OFFICIAL_DTYPES` or the ignored entries exceed `MAX_IGNORED_BYTES`."""
    return map_table(read_header(file), file, component)


def map_table(table: typing.Dict[str, TensorInfo], file: Path, component: str) -> typing.Dict[str, TensorInfo]:
    """`map_header` of a header already read (`read_header`, or `read_tensors`' check)."""
    names = map_names(table, component, str(file))
    ignored = sum(info.end - info.begin for key, info in table.items() if key not in names)
    if ignored > MAX_IGNORED_BYTES:
        raise OfficialImportError(f"{shown(file)}: its ignored legacy entries hold {ignored} bytes "
                                  f"(at most {MAX_IGNORED_BYTES // 1024**2} MiB); not a released file")
    for key in names:
        if table[key].dtype not in OFFICIAL_DTYPES:
            raise OfficialImportError(f"{shown(file)}: tensor {short_repr(key)} is {dtype_name(table[key].dtype)}; the released "
                                      "weights are float32 (bfloat16 and float16 are widened to float32)")
    return {ours: table[key] for key, ours in names.items()}


# ---------------------------------------------------------------------------------------------
# official resolved config -> ModelConfig


_MISSING = object()
MAX_LIST = 16  # rope_axes_dim: three sizes
_KINDS = {  # type -> (what the message says, test)
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: (type(v) is int and abs(v) < 1e300) or (type(v) is float and math.isfinite(v))),
    str: ("a string", lambda v: type(v) is str), bool: ("true or false", lambda v: type(v) is bool),
    list: (f"a list of at most {MAX_LIST} integers", lambda v: type(v) is list and len(v) <= MAX_LIST
           and all(_KINDS[int][1](x) for x in v)),
    dict: ("an object", lambda v: isinstance(v, dict)), None: ("anything", lambda v: True),
}


class _Fields:
    """One object of the release's resolved config, read field by field: `get(key, kind)` checks the
    type (a ConfigError naming the field, e.g. `Encoder.dim`); a missing required key is a KeyError."""

    def __init__(self, data, path: str = ""):
        if not isinstance(data, dict):
            raise ConfigError(f"{path.rstrip('.') or 'the config'} must be an object, got {type(data).__name__}")
        self.data, self.path = data, path

    def get(self, key: str, kind: typing.Optional[type] = None, default=_MISSING):
        if key not in self.data and default is _MISSING:
            raise KeyError(self.path + key)
        value = self.data.get(key, default)
        if not _KINDS[kind][1](value):
            raise ConfigError(f"{self.path}{key} must be {_KINDS[kind][0]}, got {short_repr(value, 60)}")
        return float(value) if kind is float else value

    def section(self, key: str, default=_MISSING) -> "_Fields":
        return _Fields(self.get(key, dict, default), f"{self.path}{key}.")

    def size(self) -> TransformerSize:
        return TransformerSize(self.get("dim", int), self.get("layer_num", int), self.get("heads", int))


def read_official_config(path) -> dict:
    """The release's resolved config file as strict JSON (`runtime.files.read_json`: bounded size and
    nesting, no NaN, UTF-8, an object); a one-line OfficialImportError otherwise."""
    try:
        return read_json(path, f"the official config {shown(path)}")
    except FileFormatError as exc:
        raise OfficialImportError(str(exc)) from None


def config_from_official(data: dict, with_ar: bool = True) -> ModelConfig:
    """Our ModelConfig from the release's resolved config (as in `fixture_a/config.json`), every field
    read with its type checked and the result validated (`ModelConfig.validate`: ranges)."""
    try:
        top = _Fields(data)
        rc = top.section("resolved_config") if "resolved_config" in top.data else top
        _check_supported(rc, with_ar)
        return _model_config(rc, with_ar).validate()
    except ConfigError as exc:
        raise OfficialImportError(f"the official config does not describe a valid model: {exc}") from None
    except KeyError as exc:
        raise OfficialImportError(f"official config lacks the entry {exc.args[0]!r}: pass the resolved config "
                           "(a JSON like fixture_a/config.json or official_keys/*.json)") from None


def _model_config(rc: _Fields, with_ar: bool) -> ModelConfig:
    enc, dec = rc.section("Encoder"), rc.section("Decoder")
    if not rc.get("Prologue", bool, False):
        variant = "2d"
    elif "SemanticEncoder" in rc.data or rc.get("share_semantic_encoder", bool, True) is False:
        variant = "post"
    else:
        variant = "prologue"
    grid_theta = dec.get("rope_theta", float) if dec.get("rope_input_type") == "hw" else dec.get("rope_ctx_theta", float)
    seq_theta = enc.get("rope_theta", float) if enc.get("context_type", None, None) == "concat" else 10000.0
    sq = rc.section("SemanticQuantizer", {})
    post = rc.section("SemanticEncoder") if variant == "post" else None
    q = rc.section("Quantizer")
    tok = TokenizerConfig(
        variant=variant, image_size=rc.get("image_size", int), patch_size=rc.get("patch_size", int),
        channels=rc.get("num_channels", int), encoder=enc.size(), decoder=dec.size(),
        visual_codebook_size=q.get("codebook_size", int),
        prologue_codebook_size=sq.get("codebook_size", int) if variant != "2d" else 0,
        num_prologue_tokens=rc.get("z_len", int) if variant != "2d" else 0,
        prologue_encoder=post.size() if post else None, code_dim=rc.get("z_dim", int),
        cond_dim=rc.get("cond_emb_dim", int), mlp_ratio=enc.get("mlp_ratio", str),
        prologue_encoder_mlp_ratio=post.get("mlp_ratio", str) if post else "11/4",
        rope_axes=enc.get("rope_axes_dim", list), rope_theta_grid=grid_theta, rope_theta_seq=seq_theta,
        prologue_softmax_temperature=sq.get("temperature", float, 0.1) if variant != "2d" else 0.1,
        vq_beta=q.get("vq_beta", float, 0.25),
    )
    ar = None
    if with_ar:
        a = rc.section("ARModel")
        size = a.size()
        ar = ARConfig(dim=size.dim, layers=size.layers, heads=size.heads, mlp_ratio=a.get("mlp_ratio", str),
                      rope_axes=a.get("rope_axes_dim", list), rope_theta=a.get("rope_theta", float),
                      cond_dim=a.get("cond_dim", int, rc.get("cond_emb_dim", int)))
    return ModelConfig(num_classes=rc.get("num_classes", int) - 1, tokenizer=tok, ar=ar)


def _check_supported(rc: _Fields, with_ar: bool) -> None:
    def need(where: str, value, expected):
        if type(value) is not type(expected) or value != expected:
            raise OfficialImportError(f"unsupported official config: {where} = {short_repr(value, 60)} "
                                      f"(this package implements {expected!r})")

    need("norm_layer", rc.get("norm_layer", None, "RMSNorm"), "RMSNorm")
    need("ffn_type", rc.get("ffn_type", None, "geglu"), "geglu")
    need("rope", rc.get("rope", None, True), True)
    need("abs_pos", rc.get("abs_pos", None, False), False)
    need("ae_no_label", rc.get("ae_no_label", None, True), True)
    prologue = rc.get("Prologue", bool, False)
    if prologue and not rc.get("use_eos", bool, True):
        raise OfficialImportError("unsupported official config: Prologue without use_eos")
    enc = rc.section("Encoder", {})
    if not prologue and enc.get("context_type", None, None) == "concat":
        raise OfficialImportError("the 1-D baseline tokenizer (`1d-tokenizer`) is not supported by this package")
    # The release reads this flag only when `Prologue` is true (`Prologue and not
    # share_semantic_codebook`, models.py:710, 717, 862, 906): the 2d / 1d configs ship it as
    # True, and it changes nothing there.
    if prologue and rc.get("share_semantic_codebook", bool, False):
        raise OfficialImportError("unsupported official config: share_semantic_codebook = True")
    if with_ar:
        a = rc.section("ARModel", {})
        need("ARModel.conditional_injection", a.get("conditional_injection", None, "llamagen"), "llamagen")
        need("ARModel.tied_embedding", a.get("tied_embedding", None, False), False)
        need("ARModel.input_layer", a.get("input_layer", None, False), False)


# ---------------------------------------------------------------------------------------------
# facts readable from tensor shapes


def shape_facts(tok: typing.Mapping[str, typing.Any], ar: typing.Optional[typing.Mapping[str, typing.Any]]) -> typing.Dict[str, typing.Any]:
    """Sizes that the (mapped) tensors or `TensorInfo`s reveal, keyed by config field path."""
    facts: typing.Dict[str, typing.Any] = {}

    def shape(state, key: str, rank: int) -> typing.Tuple[int, ...]:
        found = tuple(state[key].shape)
        if len(found) != rank or 0 in found:
            raise OfficialImportError(f"tensor {key!r} has shape {list(found)}; the released layout has {rank} "
                                      "non-zero sizes there")
        return found

    def stack(prefix: str, field: str, state):
        if f"{prefix}.cond_proj.0.weight" not in state:
            return
        layers = {k.split(".")[2] for k in state if k.startswith(f"{prefix}.layers.")}
        dim = shape(state, f"{prefix}.cond_proj.0.weight", 2)  # [C, N]
        facts[f"{field}.layers"] = len(layers)
        if all(f"{prefix}.layers.0.attn1.{name}.weight" in state for name in ("to_q", "q_norm")):
            width = shape(state, f"{prefix}.layers.0.attn1.to_q.weight", 2)[0]
            facts[f"{field}.dim"] = width
            facts[f"{field}.heads"] = width // shape(state, f"{prefix}.layers.0.attn1.q_norm.weight", 1)[0]
        facts[f"{field}.cond_dim"] = dim[0]
        facts[f"{field}.num_classes"] = dim[1] - 1

    stack("encoder", "tokenizer.encoder", tok)
    stack("decoder", "tokenizer.decoder", tok)
    stack("prologue_encoder", "tokenizer.prologue_encoder", tok)
    if "visual_quantizer.embedding.weight" in tok:
        k, z = shape(tok, "visual_quantizer.embedding.weight", 2)
        facts["tokenizer.visual_codebook_size"] = k
        facts["tokenizer.code_dim"] = z
    if "encoder.input_layer.weight" in tok:
        facts["tokenizer.patch_dim"] = shape(tok, "encoder.input_layer.weight", 2)[1]
    has_pq = "prologue_quantizer.embedding.weight" in tok
    facts["tokenizer.variant"] = "post" if "prologue_encoder.cond_proj.0.weight" in tok else ("prologue" if has_pq else "2d")
    if has_pq:
        facts["tokenizer.prologue_codebook_size"] = shape(tok, "prologue_quantizer.embedding.weight", 2)[0]
        query = next((k for k in ("encoder.learnable_query", "prologue_encoder.learnable_query") if k in tok), None)
        if query is not None:
            facts["tokenizer.num_prologue_tokens"] = shape(tok, query, 3)[1]
    if ar is not None:
        stack("transformer", "ar", ar)
        if "token_emb.weight" in ar:
            facts["ar.vocab_size"] = shape(ar, "token_emb.weight", 2)[0]
        if "class_emb.weight" in ar:
            facts["ar.num_classes"] = shape(ar, "class_emb.weight", 2)[0] - 1
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
        raise OfficialImportError("the released files contradict the configuration: " + "; ".join(clashes))


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


def _by_component(tokenizer_dir, ar_dir, onestage: bool, read) -> typing.Tuple[dict, typing.Optional[dict]]:
    """`read(file, component)` of every slot, the tokenizer's slots merged (they may not overlap)."""
    tok: typing.Dict[str, typing.Any] = {}
    ar = None
    for file, component, _holds in slot_files(tokenizer_dir, ar_dir, onestage):
        part = read(file, component)
        if component == "ar":
            ar = part
            continue
        overlap = set(part) & set(tok)
        if overlap:
            raise OfficialImportError(f"{file} repeats tensors of another slot: {sorted(overlap)[:4]}")
        tok.update(part)
    return tok, ar


def read_official_headers(tokenizer_dir, ar_dir=None, onestage: bool = False) -> typing.Tuple[dict, typing.Optional[dict]]:
    """What `read_official` returns, as `TensorInfo`s from the headers alone (no tensor data read)."""
    return _by_component(tokenizer_dir, ar_dir, onestage, map_header)


def read_official(tokenizer_dir, ar_dir=None, onestage: bool = False,
                  checked: typing.Optional[typing.Tuple[dict, typing.Optional[dict]]] = None
                  ) -> typing.Tuple[dict, typing.Optional[dict]]:
    """Mapped tokenizer (EMA encoder + EMA decoder) and AR (non-EMA) tensors, as float32.

    onestage: the OneStage folder's slots instead (non-EMA encoder/decoder, AR in `model_5`).
    checked: what `read_official_headers` returned and the model was checked against; each file's
    header is read again from the open file and must map to exactly that before any tensor data is
    read from it (a file swapped since its header was checked is refused, never read).
    """
    def read(file: Path, component: str) -> dict:
        def check(table: typing.Dict[str, TensorInfo]) -> None:
            mapped = map_table(table, file, component)
            if checked is not None:
                before = checked[1] if component == "ar" else checked[0]
                if before is None or any(before.get(key) != info for key, info in mapped.items()):
                    raise OfficialImportError(f"{shown(file)} changed since its header was checked; import again")

        return map_state(read_tensors(file, check=check), component, str(file))

    return _by_component(tokenizer_dir, ar_dir, onestage, read)


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
    with_ar = onestage or ar_dir is not None
    configs = []
    if official_config is not None:
        data = official_config if isinstance(official_config, dict) else read_official_config(official_config)
        configs.append(("the official config", config_from_official(data, with_ar=with_ar)))
    tok_info, ar_info = read_official_headers(tokenizer_dir, ar_dir, onestage=onestage)
    if preset is not None:
        found_classes = shape_facts(tok_info, None).get("tokenizer.encoder.num_classes")
        cfg = model_preset(preset, num_classes=found_classes)
        if not with_ar:
            cfg.ar = None
        configs.append((f"preset {preset!r}", cfg))
    if not configs:
        raise OfficialImportError("sizes such as heads, RoPE axes and image geometry are not in the tensors: "
                           "pass --official-config FILE (the resolved config JSON) or --preset NAME")
    found = shape_facts(tok_info, ar_info)
    for what, cfg in configs:
        compare_facts(found, config_facts(cfg), what)
    if len(configs) == 2 and configs[0][1].to_dict() != configs[1][1].to_dict():
        a, b = configs[0][1].to_dict(), configs[1][1].to_dict()
        diffs = sorted(_diff(a, b))
        raise OfficialImportError("--official-config and --preset disagree: " + "; ".join(diffs))
    config = configs[0][1]
    with torch.device("meta"):
        model = PrologueModel(config)
    parts = [(model.tokenizer, tok_info, f"tokenizer files in {tokenizer_dir}")]
    if with_ar:
        parts.append((model.ar, ar_info, f"AR file in {tokenizer_dir if onestage else ar_dir}"))
    try:
        for module, info, where in parts:  # names, shapes and dtypes, before any tensor is read
            check_state(module, info, where, OFFICIAL_DTYPES)
        tok_state, ar_state = read_official(tokenizer_dir, ar_dir, onestage=onestage, checked=(tok_info, ar_info))
        for (module, _info, where), state in zip(parts, (tok_state, ar_state)):
            load_state_strict(module, state, where)
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
