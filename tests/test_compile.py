"""One torch.compile smoke test per model: compiled (inductor) training forwards match eager."""

import torch
import torch.nn.functional as F

from prologue_export.checkpoint import PrologueModel
from prologue_export.config import model_preset

from .conftest import randomize_


def test_tokenizer_compiles():
    model = randomize_(PrologueModel(model_preset("tiny")), seed=5)
    tok = model.tokenizer
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    eager = tok(images)
    compiled = torch.compile(tok)(images)
    assert torch.allclose(eager["reconstruction"], compiled["reconstruction"], atol=1e-4)
    assert torch.equal(eager["visual_ids"], compiled["visual_ids"])
    compiled["reconstruction"].square().mean().backward()  # the backward graph compiles too
    assert tok.decoder.out.weight.grad is not None


def test_ar_compiles():
    model = randomize_(PrologueModel(model_preset("tiny")), seed=6)
    ar, vocab = model.ar, model.config.vocab()
    g = torch.Generator().manual_seed(0)
    seq = torch.cat([
        torch.randint(0, vocab.prologue_codebook_size, (2, vocab.num_prologue_tokens), generator=g) + vocab.prologue_offset,
        torch.full((2, 1), vocab.eos_id),
        torch.randint(0, vocab.visual_codebook_size, (2, vocab.num_visual_tokens), generator=g),
    ], dim=1)
    classes = torch.tensor([3, ar.null_class])
    eager = ar(seq, classes)
    compiled_ar = torch.compile(ar)
    out = compiled_ar(seq, classes)
    assert torch.allclose(eager, out, atol=1e-4)
    F.cross_entropy(out.flatten(0, 1), seq.flatten()).backward()
    assert ar.token_emb.weight.grad is not None
