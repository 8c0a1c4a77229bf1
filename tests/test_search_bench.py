"""benchmarks/search_bench.py: its metrics (fast), the shared space, and a tiny end-to-end run (e2e)."""

import json
import math

import pandas as pd
import pytest

from benchmarks import search_bench as bench

E2E_BUDGET_S = 25


def _events(t0, points, ends=()):
    return ([{"kind": "epoch", "t": t0 + t, "trial": "a", "epoch": 1, "value": v} for t, v in points]
            + [{"kind": "trial_end", "t": t0 + t, "trial": "a", "status": s} for t, s in ends])


def test_best_so_far_keeps_improvements_within_the_budget():
    events = _events(100.0, [(5, 0.6), (3, 0.5), (8, 0.55), (9, 0.7), (31, 0.9), (-1, 0.99)])
    assert bench.best_so_far(events, 100.0, 30) == [(3, 0.5), (5, 0.6), (9, 0.7)]
    assert bench.time_to_target([(3, 0.5), (5, 0.6), (9, 0.7)], 0.6) == 5
    assert bench.time_to_target([(3, 0.5)], 0.6) is None and bench.time_to_target([(3, 0.5)], None) is None


def test_summary_counts_only_what_happened_within_the_budget():
    spec = {"contender": "ours", "seed": 0, "t0": 0.0, "budget_s": 30.0, "process_s": 40.0, "exit_code": 0}
    events = _events(0.0, [(5, 0.6), (10, 0.7), (35, 0.9)], ends=[(11, "completed"), (20, "errored"), (36, "completed")])
    row = bench.summarise_run(spec, events)
    assert row["best_val_balanced_acc"] == 0.7 and row["epochs_completed"] == 2
    assert row["trials_completed"] == 1 and row["trials_errored"] == 1
    assert row["trials_per_hour"] == pytest.approx(120) and row["time_to_first_result_s"] == 5


def test_target_is_the_median_of_random_fifo_and_misses_count_as_slow():
    rows = []
    for contender, seed, steps in [("random_fifo", 0, [(10, 0.6)]), ("random_fifo", 1, [(20, 0.8)]),
                                   ("random_fifo", 2, [(5, 0.7)]), ("ours", 0, [(4, 0.75)])]:
        rows.append({"contender": contender, "seed": seed, "budget_s": 30, "best_val_balanced_acc": steps[-1][1],
                     "_steps": steps})
    rows.append({"contender": "cache_speedup", "seed": 0, "speedup": 3.0})
    frame, target = bench.build_table(rows)
    assert target == 0.7
    ttt = frame.set_index(["contender", "seed"])["time_to_target_s"]
    assert ttt[("ours", 0)] == 4 and ttt[("random_fifo", 1)] == 20 and pd.isna(ttt[("random_fifo", 0)])
    assert bench.median_time_to_target([10, None, 20]) == 20
    assert bench.median_time_to_target([10, None, None]) is None
    summary = {r["contender"]: r for r in bench.summary_rows(frame)}
    assert summary["random_fifo"]["ttt_ratio"] == pytest.approx(20 / 4)
    assert summary["random_fifo"]["best_diff"] == pytest.approx(0.7 - 0.75)


def test_slot_utilisation_and_head_only_trials_come_from_the_trial_events():
    def start(t, trial, **config):
        return {"kind": "trial_start", "t": t, "trial": trial, "config": config}

    def end(t, trial):
        return {"kind": "trial_end", "t": t, "trial": trial, "status": "completed"}

    def epochs(t, trial, n):
        return [{"kind": "epoch", "t": t, "trial": trial, "epoch": e, "value": 0.5} for e in range(1, n + 1)]

    events = [start(10, "a", unfreeze=0, augment="none"), *epochs(12, "a", 3), end(13, "a"),
              start(10, "b", unfreeze="all", augment="none"), end(40, "b"),
              start(13, "c", unfreeze=0, augment="light"), *epochs(15, "c", 3), end(16, "c"),
              start(20, "d", unfreeze=0, augment="none"), *epochs(22, "d", 2), end(22, "d"),  # stopped early
              start(30, "e", unfreeze=0), *epochs(33, "e", 3), end(34, "e"),
              start(45, "f", unfreeze=0, augment="none")]  # still running at the budget's end
    # busy: a 3 + b 30 + c 3 + d 2 + e 4 + f 5 = 47 slot-seconds of 2 x (50 - 10)
    assert bench.slot_utilisation(events, 0.0, 50.0, 2) == pytest.approx(47 / 80)
    assert bench.slot_utilisation([], 0.0, 50.0, 2) != bench.slot_utilisation([], 0.0, 50.0, 2)  # NaN: no trials
    assert sorted(bench.head_only_trials(events, 0.0, 50.0, 3)) == [3, 4]  # a and e: frozen, clean, all 3 epochs




def test_utilisation_over_time_is_the_busy_share_of_the_slots_per_minute(tmp_path):
    def start(t, trial):
        return {"kind": "trial_start", "t": t, "trial": trial, "config": {}}

    def end(t, trial):
        return {"kind": "trial_end", "t": t, "trial": trial, "status": "completed"}

    # Two slots, a 150 s budget: start-up until 30 s, then a runs 30-90 s and b 30-150 s (still running at the end).
    events = [start(30, "a"), start(30, "b"), end(90, "a")]
    series = bench.utilisation_over_time(events, 0.0, 150.0, 2)
    assert series == pytest.approx([60 / 120, 90 / 120, 30 / 60])  # the last bin is 30 s long

    # A saved run from before utilisation.parquet: its series comes from the events its work/ folder kept.
    folder = tmp_path / "work" / "ours_s3"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text('{"t0": 1000.0, "budget_s": 150.0}')
    (folder / "events.jsonl").write_text("\n".join(json.dumps({**e, "t": e["t"] + 1000.0}) for e in events))
    assert bench.saved_utilisation(tmp_path, None, {"contender": "ours", "seed": 3}) == pytest.approx(series)
    assert bench.saved_utilisation(tmp_path, None, {"contender": "ours", "seed": 4}) is None

    rows = [{"contender": "ours", "seed": 3, "budget_s": 150, "best_val_balanced_acc": 0.5, "_steps": [(40, 0.5)],
             "_utilisation": series},
            {"contender": "random_fifo", "seed": 3, "budget_s": 150, "best_val_balanced_acc": 0.5, "_steps": [(40, 0.5)]}]
    frame, target = bench.build_table(rows)
    text = bench.markdown(frame, target, bench.parse_args(["--setting", "realistic"]), {}, 61.0,
                          bench.utilisation_frame(rows))
    assert "| ours | 3 | 50% | 75% | 50% |" in text
    assert "| random_fifo | 3 | not kept" in text

def test_each_seed_gets_its_ratio_with_a_bound_where_one_side_never_reached_the_target():
    # Two seeds: the reference misses its own median target in one, so the median ratio is undefined.
    rows = []
    for contender, seed, steps in [("random_fifo", 0, [(500, 0.53)]), ("random_fifo", 1, [(480, 0.61)]),
                                   ("ours", 0, [(300, 0.58)]), ("ours", 1, [(400, 0.6)]),
                                   ("keras_tuner_hyperband", 0, [(50, 0.52)]),
                                   ("keras_tuner_hyperband", 1, [(90, 0.60)])]:
        rows.append({"contender": contender, "seed": seed, "budget_s": 600, "best_val_balanced_acc": steps[-1][1],
                     "_steps": steps})
    frame, target = bench.build_table(rows)
    assert target == pytest.approx(0.57)
    summary = {r["contender"]: r for r in bench.summary_rows(frame)}
    assert summary["random_fifo"]["ttt_ratio"] is None  # 1 of 2 seeds missed
    assert summary["random_fifo"]["seed_ratios"] == ">2.00, 1.20"  # 600/300; 480/400
    assert summary["keras_tuner_hyperband"]["seed_ratios"] == ">2.00, 0.23"  # 90/400: faster in seed 1
    ours_missed = frame.copy()
    ours_missed.loc[(ours_missed["contender"] == "ours") & (ours_missed["seed"] == 1), "time_to_target_s"] = float("nan")
    assert bench.seed_ratios(ours_missed[ours_missed["contender"] != "cache_speedup"], "random_fifo") == ">2.00, <0.80"
    text = bench.markdown(frame, target, bench.parse_args(["--setting", "realistic"]), {}, 61.0)
    assert "| random_fifo | 1 | 0.610 | 480 |" in text and ">2.00, 1.20" in text


def test_head_only_time_weights_each_seed_by_its_trials():
    assert bench.weighted_median([4.0, 50.0], [5, 1]) == 4.0
    assert bench.weighted_median([4.0, 50.0, float("nan")], [1, 2, 0]) == 50.0
    assert bench.weighted_median([float("nan")], [0]) != bench.weighted_median([float("nan")], [0])  # NaN


def test_report_only_rebuilds_the_report_from_the_saved_tables(tmp_path):
    rows = [{"contender": c, "seed": 0, "budget_s": 600, "best_val_balanced_acc": v, "_steps": [(100, v)]}
            for c, v in (("random_fifo", 0.5), ("ours", 0.6))]
    frame, _ = bench.build_table(rows)
    frame.to_parquet(tmp_path / "bench.parquet", index=False)
    bench.steps_frame(rows).to_parquet(tmp_path / "best_so_far.parquet", index=False)
    args = ["--setting", "realistic", "--out", str(tmp_path), "--report-only"]
    with pytest.raises(SystemExit, match="no run.json and no bench.md"):
        bench.main(args)
    (tmp_path / "bench.md").write_text("- benchmark wall time 62.0 min\n")  # a run from before run.json
    assert bench.main(args) == 0
    text = (tmp_path / "bench.md").read_text()
    assert "benchmark wall time 62.0 min" in text and "| ours | 0 | 0.600 | 100 |" in text
    assert (tmp_path / "best_so_far.png").is_file()
    (tmp_path / "run.json").write_text('{"wall_time_s": 1800}')
    assert bench.main(args) == 0 and "benchmark wall time 30.0 min" in (tmp_path / "bench.md").read_text()



def test_a_merged_seed_joins_the_saved_runs_and_moves_the_target(tmp_path):
    rows = [{"contender": c, "seed": seed, "budget_s": 600, "best_val_balanced_acc": v, "_steps": [(t, v)],
             "trials_completed": 3} for c, seed, t, v in (("random_fifo", 0, 500, 0.53), ("random_fifo", 1, 480, 0.61),
                                                          ("ours", 0, 300, 0.58), ("ours", 1, 400, 0.60))]
    frame, target = bench.build_table(rows)
    frame.to_parquet(tmp_path / "bench.parquet", index=False)
    bench.steps_frame(rows).to_parquet(tmp_path / "best_so_far.parquet", index=False)
    (tmp_path / "run.json").write_text('{"wall_time_s": 3720, "setting": "realistic"}')
    realistic = bench.parse_args(["--setting", "realistic"])
    saved, wall_s = bench.saved_run(tmp_path, realistic, "--merge")
    again, same = bench.build_table(saved)
    assert same == target and again.equals(frame) and wall_s == 3720  # a saved run reads back as it was built
    # Merging into (or reporting on) another setting's run would mix, or mislabel, data, space and budget.
    with pytest.raises(SystemExit, match="holds a run of --setting realistic, not small; pass --setting realistic"):
        bench.saved_run(tmp_path, bench.parse_args([]), "--merge")
    with pytest.raises(SystemExit, match="holds runs with --budget-s 600, not 300; pass --budget-s 600"):
        bench.saved_run(tmp_path, bench.parse_args(["--setting", "realistic", "--budget-s", "300"]), "--report-only")
    new = [{"contender": "random_fifo", "seed": 2, "budget_s": 600, "best_val_balanced_acc": 0.58,
            "_steps": [(100, 0.5), (200, 0.58)]},
           {"contender": "ours", "seed": 1, "budget_s": 600, "best_val_balanced_acc": 0.50, "_steps": [(90, 0.5)]}]
    merged, target = bench.build_table(bench.merge_rows(saved, new))
    assert target == pytest.approx(0.58)  # median of 0.53, 0.61, 0.58 (random_fifo's three seeds)
    ttt = merged.set_index(["contender", "seed"])["time_to_target_s"]
    assert ttt[("random_fifo", 2)] == 200 and ttt[("random_fifo", 1)] == 480 and ttt[("ours", 0)] == 300
    assert pd.isna(ttt[("ours", 1)]) and len(merged) == 5  # seed 1 of ours: the new run replaced the saved one


def test_the_readme_search_table_is_the_saved_realistic_run():
    frame = pd.read_parquet(bench.ROOT / "benchmarks/results/search_bench_ham/bench.parquet")
    table = bench.readme_table(frame)
    assert "| ours | **0.599** | 3/3 | 149 s / 323 s / 318 s |" in table  # the numbers the README's prose quotes
    assert table in (bench.ROOT / "README.md").read_text()

@pytest.mark.e2e
def test_keras_tuner_space_is_the_optuna_space():
    """Same names, ranges, choices and condition in both spellings of the space."""
    kt = pytest.importorskip("keras_tuner")
    optuna = pytest.importorskip("optuna")
    from benchmarks._contenders import kt_space, space

    hp = kt.HyperParameters()
    kt_space(hp)
    by_name = {p.name: p for p in hp.space}
    assert by_name["backbone"].values == ["efficientnet_lite0", "cnn_s3"]
    assert (by_name["learning_rate"].min_value, by_name["learning_rate"].max_value,
            by_name["learning_rate"].sampling) == (3e-4, 1e-2, "log")
    assert (by_name["dropout"].min_value, by_name["dropout"].max_value) == (0.0, 0.5)
    assert by_name["unfreeze"].values == ["0", "20"] and by_name["head_units"].values == [0, 128]
    assert by_name["unfreeze"].conditions and by_name["head_units"].conditions
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(40):
        trial = study.ask()
        out = space(trial)
        seen.setdefault(out["backbone"], set()).update(trial.params)
        study.tell(trial, 0.0)
    assert seen["efficientnet_lite0"] == {"backbone", "learning_rate", "dropout", "unfreeze", "head_units"}
    assert seen["cnn_s3"] == {"backbone", "learning_rate", "dropout"}
    dists = study.trials[0].distributions
    assert dists["learning_rate"].log and (dists["learning_rate"].low, dists["learning_rate"].high) == (3e-4, 1e-2)


@pytest.mark.e2e
def test_tiny_benchmark_end_to_end(tmp_path):
    """ours (real search.run on Ray) and optuna_hyperband on a tiny embedded set, plus the cache timing."""
    pytest.importorskip("optuna_integration")
    out = tmp_path / "bench"
    # --quick (the CI-sized setting), shrunk further to fit the test tier.
    code = bench.main(["--quick", "--out", str(out), "--data", "embedded", "--train-per-class", "24", "--val-per-class", "8",
                       "--budget-s", str(E2E_BUDGET_S), "--seeds", "0", "--contenders", "ours", "optuna_hyperband",
                       "--speedup-configs", "1", "--speedup-epochs", "1", "--grace-s", "90"])
    assert code == 0
    for name in ("bench.parquet", "bench.md", "best_so_far.png", "best_so_far.parquet", "utilisation.parquet",
                 "run.json"):
        assert (out / name).is_file(), name
    frame = pd.read_parquet(out / "bench.parquet")
    assert set(bench.COLUMNS) <= set(frame.columns)
    assert sorted(frame["contender"]) == ["cache_speedup", "optuna_hyperband", "ours"]
    runs = frame[frame["contender"] != "cache_speedup"].set_index("contender")
    assert (runs["budget_s"] == E2E_BUDGET_S).all() and (runs["seed"] == 0).all()
    assert (runs["exit_code"] == 0).all(), runs["exit_code"]
    # Without random_fifo there is no target, so no time to it.
    assert runs["target"].isna().all() and runs["time_to_target_s"].isna().all()
    # The in-process contender gets going within the budget; Ray's start-up may eat a tiny budget, so ours may not.
    assert runs.loc["optuna_hyperband", "trials_completed"] >= 1
    for contender, row in runs.iterrows():
        best = row["best_val_balanced_acc"]
        assert math.isnan(best) or 0.0 <= best <= 1.0, (contender, best)
        assert row["trials_per_hour"] == pytest.approx(row["trials_completed"] / E2E_BUDGET_S * 3600)
        assert row["process_s"] >= E2E_BUDGET_S * 0.5
    speed = frame[frame["contender"] == "cache_speedup"].iloc[0]
    assert speed["speedup"] > 0 and speed["trial_s_cached"] > 0 and speed["trial_s_uncached"] > 0
    steps = pd.read_parquet(out / "best_so_far.parquet")
    assert (steps["elapsed_s"] <= E2E_BUDGET_S).all() and steps["best_val_balanced_acc"].between(0, 1).all()
    assert "| optuna_hyperband |" in (out / "bench.md").read_text()
    util = pd.read_parquet(out / "utilisation.parquet")  # one minute-bin of the 25 s budget per run
    assert sorted(util["contender"]) == ["optuna_hyperband", "ours"] and (util["minute"] == 1).all()
    assert util["busy_share"].between(0, 1).all()


@pytest.mark.e2e
def test_the_realistic_space_is_the_same_in_keras_tuner_and_optuna():
    kt = pytest.importorskip("keras_tuner")
    optuna = pytest.importorskip("optuna")
    from benchmarks._contenders import SPACES, kt_space, realistic_space

    hp = kt.HyperParameters()
    kt_space(hp, "realistic")
    by_name = {p.name: p for p in hp.space}
    realistic = SPACES["realistic"]
    assert by_name["backbone"].values == list(realistic.backbones)
    assert by_name["unfreeze"].values == ["0", "21", "41", "all"] and by_name["unfreeze"].conditions
    assert by_name["augment"].values == ["none", "light"] and by_name["class_weight"].values == [False, True]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen, unfreeze = {}, set()
    for _ in range(60):
        trial = study.ask()
        out = realistic_space(trial)
        seen.setdefault(out["backbone"], set()).update(trial.params)
        unfreeze.add(out.get("unfreeze"))
        study.tell(trial, 0.0)
    common = {"backbone", "learning_rate", "dropout", "augment", "class_weight"}
    fine_tuned = {"unfreeze", "head_units", "warmup_epochs", "fine_tune_lr"}  # a warm-up only when something unfreezes
    assert seen["efficientnet_lite1"] == common | fine_tuned and seen["cnn_s3"] == common
    assert by_name["warmup_epochs"].values == [1, 2] and by_name["fine_tune_lr"].conditions
    assert unfreeze == {0, 21, 41, "all"}


def test_the_readme_results_table_is_the_one_generated_from_paper_tables_json():
    """The README's reference-study table is written by benchmarks/paper_tables.py from its JSON, never by hand."""
    from benchmarks import paper_tables

    readme = paper_tables.README.read_text()
    start = readme.index(paper_tables.README_START) + len(paper_tables.README_START) + 1
    block = readme[start:readme.index(paper_tables.README_END)].rstrip("\n")
    assert block == paper_tables.readme_table(paper_tables.load_json())
    s2 = next(line for line in block.splitlines() if line.startswith("| S2 |"))
    measured = paper_tables.load_json()["rows"]["S2"]["metrics"]["accuracy"]["value"]
    assert f"{measured:.4f}" in s2 and "missed by" in s2


@pytest.mark.e2e
def test_in_process_contenders_fine_tune_in_phases_as_train_trial_does():
    """keras-tuner's and Optuna's fits warm the head up, then unfreeze at fine_tune_lr (train_trial's phases)."""
    import numpy as np

    from benchmarks._contenders import _build_compiled, fit_in_phases

    hp = {"backbone": "efficientnet_lite0", "weights": "imagenet", "unfreeze": 21, "head_units": 0,
          "learning_rate": 1e-3, "dropout": 0.0, "warmup_epochs": 1, "fine_tune_lr": 1e-4}
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (16, 32, 32, 3)).astype("uint8"), np.repeat([0, 1], 8)
    model = _build_compiled(hp, (32, 32, 3), 2, seed=0)
    frozen_at_first = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    history = fit_in_phases(model, x, y, epochs=3, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 3  # the warm-up epoch and the two fine-tuning epochs
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) > frozen_at_first  # layers joined
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4)
