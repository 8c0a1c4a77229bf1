"""The Python API: run a Study built in code, read its results, resume it in the same process."""

import numpy as np
import pandas as pd
import pytest
from ray import tune

from search import Dataset, Study, StudyError, StudyFailed, load_results, run_study

pytestmark = pytest.mark.e2e


def space(trial):
    return {"backbone": "cnn_s3", "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}


def tiny(name: str) -> Study:
    return Study(name=name, dataset=Dataset(image_size=32, positive_class="malignant",
                                            options={"n_per_class": 30, "image_size": 48}),
                 space=space, fixed={"batch_size": 16, "pooling": "flatten"}, num_samples=3, max_epochs=2,
                 max_concurrent=2)


class StopAfterFirstTrial(tune.Callback):
    """Fails the run once a trial has ended, as a crash would: the API raises, and the folder resumes."""

    def on_step_end(self, iteration, trials, **info):  # Ray does not catch errors raised here
        if any(t.status == "TERMINATED" for t in trials):
            raise RuntimeError("driver crashed")


def test_a_study_built_in_code_runs_and_its_results_load(tmp_path):
    results = run_study(tiny("api"), storage=tmp_path, seed=1)
    board = results.leaderboard
    assert isinstance(board, pd.DataFrame) and len(board) == 3
    assert results.outcome == "completed" and results.path == tmp_path / "api"
    best = results.best_trial
    assert best.name == board["trial_name"].iloc[0] and best.config["backbone"] == "cnn_s3"
    assert best.metrics["best_val_balanced_accuracy"] == board["best_val_balanced_accuracy"].max()
    model = results.load_model()
    assert model.predict(np.zeros((2, 32, 32, 3)), verbose=0).shape == (2, 2)
    # The README's final model, from Python: evaluate, then predict with what was chosen on validation.
    from analysis.evaluate import evaluate_top_k
    from analysis.splits import read_split

    assert "no final_model.json" in results.final_model.provenance()
    evaluate_top_k(results.path, ensemble="auto", tta="auto", n_boot=50, log=lambda _: None)
    assert results.final_model.fitted and "final_model.json" in results.final_model.provenance()
    shipped = pd.read_parquet(results.path / "test_predictions.parquet").query("final")
    prediction = results.predict(read_split(results.path, "test")["path"].tolist())
    np.testing.assert_allclose(prediction.probabilities, shipped.filter(like="prob_").to_numpy(), atol=1e-5)
    assert prediction.labels == shipped["predicted"].tolist()
    assert results.load_model().predict(np.zeros((2, 32, 32, 3)), verbose=0).shape == (2, 2)
    again = load_results(tmp_path / "api")
    assert again.best_trial == best and again.leaderboard.equals(board)
    # Run again: a completed study's folder is kept, and the new run gets the next numbered one.
    second = run_study(tiny("api"), storage=tmp_path, num_samples=1, max_epochs=1)
    assert second.path == tmp_path / "api-2" and second.study["name"] == "api-2" and len(second.leaderboard) == 1
    assert load_results(tmp_path / "api").leaderboard.equals(board)
    # The API raises what the command line prints and exits with.
    with pytest.raises(StudyError, match="already holds this study"):
        run_study(tiny("api"), storage=tmp_path, name="api")
    with pytest.raises(StudyError, match="--num-samples"):
        run_study(tiny("api"), storage=tmp_path, resume=True, num_samples=5)


def test_a_study_built_in_code_resumes_in_the_same_process(tmp_path):
    study = tiny("crashy")
    with pytest.raises(StudyFailed, match=r"run_study\(<the same Study>, storage=.*resume=True"):
        run_study(study, storage=tmp_path, seed=2, callbacks=[StopAfterFirstTrial()])
    partial = load_results(tmp_path / "crashy")
    assert partial.outcome == "failed" and len(partial.leaderboard) >= 1
    results = run_study(study, storage=tmp_path, resume=True)
    assert results.outcome == "completed"
    assert len(results.leaderboard) == 3 and results.leaderboard["trial_number"].is_unique
    assert set(results.leaderboard["status"]) <= {"finished", "stopped"}
