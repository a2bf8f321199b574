"""`PrologueModel`: the tokenizer and (optionally) the AR model, built from one ModelConfig."""

from __future__ import annotations

import typing

from torch import nn

from .ar import ARModel
from .config import ModelConfig
from .tokenizer import Tokenizer


class PrologueModel(nn.Module):
    """`tokenizer` + optional `ar`, built from one ModelConfig."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tokenizer = Tokenizer(config.tokenizer, config.num_classes)
        self.ar = ARModel(config.ar, config.vocab(), config.num_classes) if config.ar is not None else None

    @classmethod
    def from_parts(cls, config: ModelConfig, tokenizer: nn.Module, ar: typing.Optional[nn.Module] = None) -> "PrologueModel":
        """Assemble a model from existing modules (no new parameters are allocated)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = config.validate()
        model.tokenizer = tokenizer
        model.ar = ar
        return model

    def components(self) -> typing.Dict[str, nn.Module]:
        out = {"tokenizer": self.tokenizer}
        if self.ar is not None:
            out["ar"] = self.ar
        return out


def unwrap(module: nn.Module) -> nn.Module:
    """The module under torch.compile / DDP wrappers, so saved keys carry no `_orig_mod.`/`module.`."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module
