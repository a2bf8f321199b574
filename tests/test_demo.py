"""The demo pipeline end to end at a budget of seconds: train -> pretokenize -> train AR ->
export + verify -> runtime pictures."""

import json

import numpy as np
from PIL import Image

from prologue_export.cli import main
from prologue_export.runtime import Generator


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--data", "synthetic:256", "--out", str(out), "--scale", "0.01", "--no-compile",
               "--pretokenize-limit", "160", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["pictures"]) == {"class_grid", "reconstruction", "fixed_prologue"}
    assert set(report["seconds"]) == {"1 tokenizer", "2 pretokenize", "3 ar", "4 export + verify", "5 runtime pictures"}
    grid = np.asarray(Image.open(report["pictures"]["class_grid"]))
    assert grid.shape == (10 * 33 + 1, 8 * 33 + 1)  # one row per class, 8 per row, 32x32 grey
    assert np.asarray(Image.open(report["pictures"]["reconstruction"])).shape == (2 * 33 + 1, 8 * 33 + 1)
    assert np.asarray(Image.open(report["pictures"]["fixed_prologue"])).shape == (4 * 33 + 1, 8 * 33 + 1)
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["verification"]["passed"]
    gen = Generator.from_bundle(out / "bundle")
    a = gen.generate([1, 2], seed=3)
    b = gen.generate([1, 2], seed=3)
    assert a.shape == (2, 32, 32, 1) and np.array_equal(a, b)
    # the fixed-prologue rows share their prologue
    run = gen.start([0] * 3, seed=1, prologue_ids=np.zeros((3, 8), dtype=np.int64)).run()
    assert (run.tokens[:, :8] == 256).all()
    assert report["reused"] == [] and json.loads((out / "demo.json").read_text())["seconds"] == report["seconds"]
    # rerunning continues: training and pretokenizing find their output complete and keep the
    # first run's seconds; the export and the pictures are redone
    assert main(["demo", "--data", "synthetic:256", "--out", str(out), "--scale", "0.01", "--no-compile",
                 "--pretokenize-limit", "160", "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["reused"] == ["1 tokenizer", "2 pretokenize", "3 ar"]
    for stage in rerun["reused"]:
        assert rerun["seconds"][stage] == report["seconds"][stage]
    assert json.loads((out / "demo.json").read_text()) == rerun
