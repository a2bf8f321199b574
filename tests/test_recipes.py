"""Fast checks (no training) of the recipe bookkeeping: the demo's stage times across reruns, the
experiment's stages, resume rule and table, and the pretokenize stages."""

import json
import types

import numpy as np
import pytest
import torch

from prologue_export.cli import demo, experiment
from prologue_export.train import pretokenize as pt
from prologue_export.train.common import STATE_FILE, TrainError


# --------------------------------------------------------------------------- demo stage times


def test_stage_seconds_keeps_the_earlier_time_of_a_stage_done_before():
    earlier = {"1 tokenizer": 300.0, "3 ar": 500.0}
    assert demo.stage_seconds("1 tokenizer", 2.5, True, earlier) == (300.0, True)
    # a stage that did its work (or the rest of it) in this run reports this run's time
    assert demo.stage_seconds("3 ar", 120.0, False, earlier) == (120.0, False)
    assert demo.stage_seconds("2 pretokenize", 9.0, False, {}) == (9.0, False)
    # done before, but no earlier run recorded it: this run's time, still marked reused
    assert demo.stage_seconds("2 pretokenize", 1.5, True, earlier) == (1.5, True)


def test_earlier_seconds_reads_only_a_readable_report(tmp_path):
    path = tmp_path / "demo.json"
    assert demo.earlier_seconds(path) == {}
    path.write_text("{not json")
    assert demo.earlier_seconds(path) == {}
    path.write_text(json.dumps(["a list"]))
    assert demo.earlier_seconds(path) == {}
    path.write_text(json.dumps({"seconds": {"1 tokenizer": 12.5, "3 ar": 40, "bad": "x", "flag": True}}))
    assert demo.earlier_seconds(path) == {"1 tokenizer": 12.5, "3 ar": 40.0}


def test_stage_times_merge_reruns_and_survive_an_interruption(tmp_path):
    path = tmp_path / "demo.json"
    logs = []
    first = demo.StageTimes(path, logs.append)
    assert first.run("1 tokenizer", False, lambda: "ckpt") == "ckpt"
    first.seconds["1 tokenizer"] = 250.0  # as if it had trained for minutes
    first.run("2 pretokenize", False, lambda: None)
    # the run dies here: demo.json already holds the finished stages
    written = json.loads(path.read_text())
    assert written["seconds"] == {"1 tokenizer": 250.0, "2 pretokenize": first.seconds["2 pretokenize"]}
    assert written["reused"] == [] and written["out"] == str(tmp_path)

    logs.clear()
    second = demo.StageTimes(path, logs.append)
    second.run("1 tokenizer", True, lambda: None)
    second.run("2 pretokenize", True, lambda: None)
    second.run("3 ar", False, lambda: None)
    summary = second.summary()
    assert summary["seconds"]["1 tokenizer"] == 250.0
    assert summary["reused"] == ["1 tokenizer", "2 pretokenize"]
    assert list(summary["seconds"]) == ["1 tokenizer", "2 pretokenize", "3 ar"]
    assert summary["total_seconds"] == round(sum(summary["seconds"].values()), 1)
    assert any("already complete (250.0 s in an earlier run" in line for line in logs)
    assert json.loads(path.read_text())["seconds"] == summary["seconds"]


def test_demo_completeness_checks(tmp_path):
    run = tmp_path / "tokenizer"
    assert not demo.has_checkpoint(run) and not demo.training_done(run, 10)
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / STATE_FILE).write_text(json.dumps({"step": 5}))
    assert demo.has_checkpoint(run)
    assert not demo.training_done(run, 10) and demo.training_done(run, 5) and demo.training_done(run, 4)
    (run / "checkpoint" / STATE_FILE).write_text("{broken")
    assert not demo.training_done(run, 1)

    tokens = tmp_path / "tokens"
    assert not demo.pretokenize_done(tokens)
    tokens.mkdir()
    (tokens / pt.INDEX_FILE).write_text(json.dumps({"complete": False, "shards": []}))
    assert not demo.pretokenize_done(tokens)
    (tokens / pt.INDEX_FILE).write_text(json.dumps({"complete": True, "shards": []}))
    assert demo.pretokenize_done(tokens)


# --------------------------------------------------------------------------- experiment


def _row(variant, seed, rfid, g0, g3, acc, codes, isc, secs):
    gfid = {"fid": g0, **({"inception_score": isc} if isc else {})}
    return {"variant": variant, "seed": seed, "seconds": {}, "rfid": {"fid": rfid}, "gfid_nocfg": gfid,
            "gfid_cfg3": {"fid": g3}, "probe": {"test_accuracy": acc, "codes_used": codes}, "row_seconds": secs}


def test_experiment_table():
    results = {"budget": {"cfg": 3.0}, "rows": {
        "2d-s0": _row("2d", 0, 10.0, 40.0, 30.0, 0.4, 99, None, 600.0),
        "2d-s1": _row("2d", 1, 12.0, 44.0, 34.0, 0.5, 99, None, 660.0),
        "prologue-s0": _row("prologue", 0, 11.5, 41.25, 31.0, 0.205, 17, [3.5, 0.1], 720.0),
        "post-s0": {"variant": "post", "seed": 0, "seconds": {}, "rfid": {"fid": 1.0}},  # unfinished: left out
    }}
    assert experiment.table(results) == "\n".join([
        "| row | rFID | gFID no CFG | gFID CFG 3 | IS no CFG | probe top-1 | prologue codes used | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| 2d-s0 | 10.00 | 40.00 | 30.00 | n/a | 40.0% | - | 10.0 min |",
        "| 2d-s1 | 12.00 | 44.00 | 34.00 | n/a | 50.0% | - | 11.0 min |",
        "| prologue-s0 | 11.50 | 41.25 | 31.00 | 3.50 | 20.5% | 17 | 12.0 min |",
        "| 2d (mean of 2 seeds) | 11.00 | 42.00 | 32.00 | | 45.0% | | |",
    ])


def test_parse_rows_rejects_what_is_not_variant_seed():
    from prologue_export.config import ConfigError

    assert experiment.parse_rows("post:0") == (("post", 0),)
    for spec in ("2d", "2d:x", "2d:-1", "tiny:0", "prologue:0,,2d:1"):
        with pytest.raises(ConfigError, match="VARIANT:SEED"):
            experiment.parse_rows(spec)


def test_resume_or_restart(tmp_path):
    died = tmp_path / "died"
    (died / "images").mkdir(parents=True)
    assert experiment.resume_or_restart(died) is False and not died.exists()
    assert experiment.resume_or_restart(tmp_path / "new") is False
    ok = tmp_path / "ok"
    (ok / "checkpoint").mkdir(parents=True)
    (ok / "checkpoint" / STATE_FILE).write_text("{}")
    assert experiment.resume_or_restart(ok) is True and ok.is_dir()


class _FakeRun(experiment.ExperimentRun):
    """Every stage returns a canned value and is logged in `calls`: no training, no FID network."""

    def __init__(self, out, results):
        super().__init__(out=out, budget=experiment.budget(1.0), data=None, net=None, real=None, ref_stats=None,
                         channels=1, num_classes=10, results=results, log=lambda m: None)
        self.calls = []

    def tokenizer_stage(self, phase1, folder):
        self.calls.append("tokenizer")
        return str(folder / "tokenizer" / "checkpoint")

    def pretokenize_stage(self, folder):
        self.calls.append("pretokenize")
        return 256

    def ar_stage(self, phase3, folder):
        self.calls.append("ar")
        return str(folder / "ar" / "checkpoint")

    def rfid(self, tokenizer, folder):
        self.calls.append("rfid")
        return {"fid": 10.0, "n": 1}

    def gfid(self, folder, seed, cfg):
        self.calls.append(f"gfid{cfg:g}")
        return {"fid": 40.0 - cfg, "n": 1, "sampling": {"cfg": cfg}}

    def probe(self, tokenizer):
        self.calls.append("probe")
        return {"test_accuracy": 0.5, "codes_used": 7}


def test_experiment_row_runs_only_the_stages_not_recorded(tmp_path, monkeypatch):
    fake_model = types.SimpleNamespace(tokenizer=types.SimpleNamespace(eval=lambda: "tokenizer"))
    monkeypatch.setattr("prologue_export.checkpoint.load_checkpoint", lambda path: fake_model)
    monkeypatch.setattr(experiment, "_export", lambda folder: str(folder / "bundle"))
    # an earlier run finished phase 1 and pretokenizing, then died
    earlier = {"variant": "prologue", "seed": 0, "seconds": {"tokenizer": 100.0, "pretokenize": 5.0},
               "tokenizer": "t", "pretokenize": 256}
    run = _FakeRun(tmp_path, {"budget": experiment.budget(1.0), "rows": {"prologue-s0": earlier}})
    row = run.row("prologue", 0)
    assert run.calls == ["ar", "rfid", "gfid0", "gfid3", "probe"]
    assert set(row["seconds"]) == {"tokenizer", "pretokenize", "ar", "bundle", "rfid", "gfid_nocfg", "gfid_cfg3",
                                   "probe"}
    assert row["seconds"]["tokenizer"] == 100.0 and row["row_seconds"] >= 105.0
    assert json.loads((tmp_path / experiment.RESULTS_FILE).read_text())["rows"]["prologue-s0"] == row
    results = run.finish()
    assert "| prologue-s0 | 10.00 | 40.00 | 37.00 |" in results["table"]
    assert (tmp_path / "results.md").read_text() == results["table"] + "\n"
    run.calls.clear()
    run.row("prologue", 0)  # everything recorded: nothing runs again
    assert run.calls == []


# --------------------------------------------------------------------------- pretokenize stages


def test_pretokenize_open_index_refuses_other_inputs(tmp_path):
    source = {"data": "synthetic:10", "num_items": 10, "tokenizer_sha256": "ab", "crops": "ten", "shard_size": 4}
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "stray.txt").write_text("x")
    with pytest.raises(TrainError, match="already holds files and no index.json; choose a new folder"):
        pt._open_index(out, source, model=None, dataset=None)
    index = {"source": source, "complete": False, "shards": [{"index": 0}]}
    (out / pt.INDEX_FILE).write_text(json.dumps(index))
    assert pt._open_index(out, source, model=None, dataset=None) == index  # a resume
    with pytest.raises(TrainError, match="holds shards of other inputs"):
        pt._open_index(out, {**source, "num_items": 9}, model=None, dataset=None)


def test_pretokenize_shards_are_listed_in_order_then_finished(tmp_path, capsys):
    index = {"shards": [], "num_images": 0, "skipped": 0, "complete": False}
    ids = np.zeros((3, 10, 5), np.int16)  # [n, crops, Z+X]
    pt._add_shard(tmp_path, index, 1, ids, np.arange(3), skipped=1)
    pt._add_shard(tmp_path, index, 0, ids[:2], np.arange(2), skipped=0)
    on_disk = json.loads((tmp_path / pt.INDEX_FILE).read_text())
    assert [s["index"] for s in on_disk["shards"]] == [0, 1] and not on_disk["complete"]
    assert (on_disk["num_images"], on_disk["skipped"]) == (5, 1)
    assert np.load(tmp_path / "shard_00001_ids.npy").shape == (3, 10, 5)
    assert not list(tmp_path.glob("*.tmp"))
    assert pt._finish(tmp_path / pt.INDEX_FILE, index)["complete"]
    assert json.loads((tmp_path / pt.INDEX_FILE).read_text())["complete"]
    assert "skipped 1 unreadable images" in capsys.readouterr().err


class _FakeTokenizer(torch.nn.Module):
    """ids that name the image: prologue = the image's mean pixel x 100, visual = 1, 2, 3."""

    cfg = types.SimpleNamespace(image_size=32, channels=1)

    def encode(self, x):  # x [n, C, S, S] -> ([n, Z=1], [n, X=3])
        prologue = (x.mean(dim=(1, 2, 3)) * 100).round().long()[:, None]
        return prologue, torch.arange(1, 4).repeat(len(x), 1)


def test_pretokenize_encoder_counts_unreadable_items(tmp_path):
    from prologue_export.train.data import SyntheticDataset

    class HalfBroken(SyntheticDataset):
        def __getitem__(self, i):
            return (None, 0) if i % 2 else super().__getitem__(i)

    bar = types.SimpleNamespace(n=0)
    bar.update = lambda k: setattr(bar, "n", bar.n + k)
    encoder = pt._ShardEncoder(_FakeTokenizer(), HalfBroken(8, 32, 1, 10), "ten", 3, 0, torch.device("cpu"),
                               np.dtype(np.int16), (10, 4))
    ids, labels, skipped = encoder.encode(range(2, 8), bar)
    assert ids.shape == (3, 10, 4) and ids.dtype == np.int16 and skipped == 3 and bar.n == 6
    assert labels.tolist() == [2, 4, 6] and (ids[:, :, 1:] == [1, 2, 3]).all()
    empty, no_labels, skipped = encoder.encode([1, 3], bar)  # every item unreadable
    assert empty.shape == (0, 10, 4) and no_labels.dtype == np.int64 and skipped == 2
