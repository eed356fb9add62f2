"""`unike bench` end to end on the tiny model (small n, reduced speed sizes), results.json schema,
determinism under --seed, --append merging, the MMEdit path, and the tables from a fixture."""
import json
from pathlib import Path

import pytest
import torch

import unike
from unike.bench import methods as registry
from unike.bench.report import markdown
from unike.bench.runs import Setup, check_settings, merge, settings
from unike.cli import main
from unike.metrics import METRICS

FIXTURE = Path(__file__).parent / "fixtures" / "bench_results.json"
SMALL = ["--triplets", "64", "--seed", "3", "--quiet"]
SPEED = ["--speed", "--speed-edits", "4", "--speed-steps", "5", "--speed-edits-at", "8", "--speed-fill-edits", "3",
         "--speed-memory", "200", "--speed-repeats", "2", "--speed-batch", "2", "--mid", "64x4"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    main(["bench", "--methods", "base,unike", "--task", "vqa", "--mode", "one-step,sequential", "--k", "1,2",
          "--n", "2", "--alpha-cases", "1", "--out", str(out), *SMALL, *SPEED])
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_results_schema_and_files(e2e):
    out, res = e2e
    keys = {"method", "task", "mode", "k", "n", "protocol", "score_after", "seed", "scores", "seconds_per_edit"}
    assert len(res["runs"]) == 2 * 3                      # 2 methods x (one-step, sequential K=1, K=2)
    for run in res["runs"]:
        assert keys <= set(run) and set(METRICS) - {"port"} <= set(run["scores"]) <= set(METRICS)
        assert all(0.0 <= v <= 100.0 for v in run["scores"].values())
        assert (run["task"], run["n"], run["seed"], run["protocol"]) == ("vqa", 2, 3, "token_acc")
        assert run["score_after"] == "all"
    base = next(r for r in res["runs"] if r["method"] == "base" and r["mode"] == "one-step")
    assert base["scores"]["rel"] < 50 and base["scores"]["t_loc"] == 100.0
    sp = res["speed"]
    for key in ("overhead_0_edits", "overhead_3_edits"):
        assert set(sp[key]) == {"tiny", "mid"} and all(v > 0 for v in sp[key].values())
    assert sp["overhead"]["mid"]["hidden"] == 64 and sp["overhead"]["mid"]["layers"] == 4
    for model in ("tiny", "mid"):       # real edits on a fitted memory, every setting timed
        assert sp["overhead"][model]["real_edits"] == 3 and sp["overhead"][model]["fit_triplets"] > 0
        assert len(sp["overhead"][model]["settings"]) == 4 and 0 <= sp["overhead"][model]["retrieving"] <= 1
    assert sp["latency_ratio_4_vs_1"] > 0 and len(sp["latency"]["seconds"]) == 4
    assert sp["latency"]["edit_steps"] == 5 and not sp["latency"]["early_stop"]
    paired = sp["latency"]["paired"]      # each case timed after the sequence and as edit #1 beside it
    assert len(paired["seconds"]) == len(paired["first_seconds"]) == 2 and sp["latency"]["sequence_ratio"] > 0
    assert sp["latency_ratio_8_vs_1_filled"] > 0 and len(sp["latency"]["filled"]["seconds"]) == 2
    cfg = unike.UniKEConfig()   # 4 layers x n_neurons x (K column + bias + V row) + one zeta row each, exactly
    assert sp["params_per_edit"] == 4 * (cfg.n_neurons * (2 * 128 + 1) + 128)
    assert sp["bytes_per_edit"] >= 4 * sp["params_per_edit"]
    assert set(sp["seconds_per_edit"]) == {"base", "unike"}
    assert {p["relevant"] for p in res["alpha"][0]["points"]} == {True, False}
    table = (out / "results.md").read_text()
    for title in ("Table 1 — one-step", "Table 2 — sequential", "α against relevance", "### Speed"):
        assert title in table
    for name in ("bar_rel.png", "bar_ri_loc.png", "sequential_vqa.png", "alpha_relevance.png", "latency.png"):
        assert (out / "plots" / name).stat().st_size > 1000


@pytest.mark.slow
def test_same_seed_same_scores_and_append_merges(e2e):
    out, first = e2e
    main(["bench", "--methods", "unike", "--task", "vqa", "--n", "2", "--alpha-cases", "0", "--no-plots",
          "--append", "--out", str(out), *SMALL])
    again = json.loads((out / "results.json").read_text())
    assert len(again["runs"]) == len(first["runs"]) and again["speed"] == first["speed"]
    key = lambda r: (r["method"], r["mode"], r["k"])  # noqa: E731
    assert {key(r): r["scores"] for r in again["runs"]} == {key(r): r["scores"] for r in first["runs"]}


@pytest.mark.slow
def test_protocol_and_score_after_through_the_cli(tmp_path):
    main(["bench", "--methods", "unike", "--task", "vqa", "--mode", "sequential", "--k", "2", "--n", "2",
          "--protocol", "easyedit", "--score-after", "all,each", "--alpha-cases", "0", "--no-plots", "--out",
          str(tmp_path), "--sequence-safe", *SMALL])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["protocol"], r["score_after"]) for r in runs) == [("easyedit", "all"), ("easyedit", "each")]
    assert all(r["sequence_safe"] for r in runs)
    table = (tmp_path / "results.md").read_text()
    assert "tiny · easyedit · scored after each edit · sequence-safe lists · n=2" in table
    assert "tiny · easyedit · sequence-safe lists · n=2" in table


@pytest.mark.slow
def test_mmedit_files_with_a_model_folder(tmp_path):
    world = unike.SynthWorld(seed=0)
    data = world.export_mmedit(tmp_path / "data", "vqa", n=20, seed=5)
    main(["bench", "--model", str(Path(unike.tiny.WEIGHTS)), "--data", str(data), "--methods", "unike",
          "--n", "2", "--triplets", "18", "--alpha-cases", "0", "--no-plots", "--quiet", "--out", str(tmp_path / "o")])
    run = json.loads((tmp_path / "o" / "results.json").read_text())["runs"][0]
    assert run["model"] == "weights" and run["triplets"] == 18 and run["scores"]["rel"] > 50


def test_table_from_fixture():
    res = json.loads(FIXTURE.read_text())
    text = markdown(res)
    run = next(r for r in res["runs"] if r["method"] == "unike" and r["task"] == "vqa" and r["mode"] == "one-step")
    ours = f"| **UniKE** | tiny · token_acc · n={run['n']} · seed {run['seed']} | {run['scores']['rel']:.1f} |"
    assert ours in text
    assert "| **UniKE** | paper, MiniGPT-4, E-VQA | 98.0 | 97.4 | 92.8 | 98.7 | 88.8 | 95.1 | – | – | – |" in text
    for title in ("Table 1 — one-step editing, E-VQA-style", "Table 4 — ablation (one-step)",
                  "Table 2 — sequential editing, E-VQA-style (task vqa), K = 10",
                  "Table 3 — cross-task editing, K = 10",
                  "Fig. 4c", "α against relevance", "### Speed"):
        assert title in text
    assert text.index("1 only Intrin") < text.index("4 Intrin + Latent-IKE")


def test_bad_settings_raise_before_anything_runs():
    with pytest.raises(ValueError, match="multiple of every K"):
        check_settings(settings(["vqa"], ["sequential"], [10], ["token_acc"]), n=15)
    with pytest.raises(ValueError, match="cross runs sequentially"):
        check_settings(settings(["cross"], ["one-step"], [1], ["token_acc"]), n=10)
    with pytest.raises(ValueError, match="unknown protocol"):
        check_settings(settings(["vqa"], ["one-step"], [1], ["bleu"]), n=10)
    with pytest.raises(ValueError, match="unknown --score-after 'last'"):
        check_settings(settings(["vqa"], ["sequential"], [2], ["token_acc"], ["last"]), n=10)
    # one-step runs are scored after their one edit: score_after "each" adds no one-step run
    both = settings(["vqa"], ["one-step", "sequential"], [2], ["easyedit"], ["all", "each"])
    assert [(s["mode"], s["score_after"]) for s in both] == [("one-step", "all"), ("sequential", "all"),
                                                             ("sequential", "each")]
    with pytest.raises(ValueError, match="--sequence-safe draws the tiny model's world lists"):
        main(["bench", "--model", "some/vlm", "--data", "x.json", "--sequence-safe"])
    with pytest.raises(ValueError, match="unknown method 'rome'"):
        registry.expand("unike,rome")
    with pytest.raises(ValueError, match="unknown method 'alpha-1.5'"):
        registry.expand("alpha-1.5")
    assert registry.expand("unike,zeta,alpha-0.3") == ["unike", *registry.ZETAS, "alpha-0.3"]
    assert registry.config_of("alpha-0.3", 7).fixed_alpha == 0.3
    assert registry.config_of("latent-only", 0).intrinsic is False


def test_cross_cases_mix_tasks_in_every_sequence():
    setup = Setup(model=torch.nn.Module(), processor=None, label="tiny", world=unike.SynthWorld(seed=0))
    cases = setup.cases("cross", n=8, seed=0, k=4)
    assert [c.task for c in cases] == ["vqa", "vqa", "caption", "caption"] * 2


def test_merge_replaces_same_key_and_keeps_others():
    run = lambda m, s: {"model": "tiny", "method": m, "task": "vqa", "mode": "one-step", "k": 1, "n": 2,  # noqa: E731
                        "protocol": "token_acc", "score_after": "all", "seed": 0, "scores": {"rel": s}}
    old = {"runs": [run("unike", 1.0), run("tpatcher", 2.0)], "speed": {"a": 1}, "alpha": []}
    new = {"runs": [run("unike", 3.0)], "speed": {"b": 2}, "alpha": []}
    out = merge(old, new)
    assert [(r["method"], r["scores"]["rel"]) for r in out["runs"]] == [("tpatcher", 2.0), ("unike", 3.0)]
    assert out["speed"] == {"a": 1, "b": 2}
