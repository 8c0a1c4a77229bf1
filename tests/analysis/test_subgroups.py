"""analysis.subgroups: the final model's metrics per subgroup of the images' metadata, flagged and rendered."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis import subgroups as S
from analysis.document import render_markdown
from analysis.files import SPLITS, predictions_file

CLASSES = ["benign", "malignant"]
AGES = (20.0, 40.0, 50.0, 70.0, 80.0)  # one in each band of S.AGE_EDGES


def _block(sex: str, sensitivity_hits: int, n_pos: int = 150, n_neg: int = 150, spec_hits: int = 135) -> list[dict]:
    """One sex's images: the misses spread evenly over the age bands, so no band differs from another."""
    rows = []
    for label, n, hits in (("malignant", n_pos, sensitivity_hits), ("benign", n_neg, spec_hits)):
        for j in range(n):
            band = j % len(AGES)
            right = j // len(AGES) < hits // len(AGES)  # the same share right in every band
            called = label if right else ("benign" if label == "malignant" else "malignant")
            rows.append({"label": label, "predicted": called, "sex": sex, "age": AGES[band],
                         "localization": "trunk", "patient": f"{sex}-{label}-{j}"})
    return rows


def _rows() -> pd.DataFrame:
    """Men: sensitivity 0.9; women: 0.6 (the weak subgroup); both specificity 0.9. Eight acral images."""
    rows = _block("male", 135) + _block("female", 90)
    for i in (0, 1, 2, 3, 150, 151, 152, 153):  # 4 positives, 4 negatives: too few to judge
        rows[i]["localization"] = "acral"
    table = pd.DataFrame(rows)
    table["label_index"] = table["label"].map({c: i for i, c in enumerate(CLASSES)})
    table["prob_malignant"] = np.where(table["predicted"] == "malignant", 0.8, 0.2)
    table["prob_benign"] = 1 - table["prob_malignant"]
    table["path"] = [f"img/{i:04d}.jpg" for i in range(len(table))]
    return table


def _rows_of(result: S.Subgroups, attribute: str, subgroup: str) -> pd.DataFrame:
    t = result.table
    return t[(t["attribute"] == attribute) & (t["subgroup"] == subgroup)].set_index("metric")


@pytest.fixture(scope="module")
def result() -> S.Subgroups:
    return S.subgroup_results(_rows(), CLASSES, "malignant", attributes=["sex", "age", "localization", "patient"],
                              n_boot=200)


def test_the_weak_subgroup_is_flagged_and_no_other(result):
    overall = _rows_of(result, S.OVERALL, "")
    assert overall.loc["sensitivity", "value"] == pytest.approx(0.75)
    assert overall.loc["specificity", "value"] == pytest.approx(0.9)
    flagged = {(r.attribute, r.subgroup, r.metric) for r in result.flagged().itertuples()}
    assert flagged == {("sex", "female", "sensitivity"), ("sex", "female", "balanced_accuracy")}
    female = _rows_of(result, "sex", "female")
    assert female.loc["sensitivity", "value"] == pytest.approx(0.6) and female.loc["sensitivity", "n"] == 300
    assert female.loc["sensitivity", "high"] < 0.75 and female.loc["sensitivity", "behind"] == 150
    male = _rows_of(result, "sex", "male")
    assert male.loc["sensitivity", "value"] == pytest.approx(0.9) and male.loc["sensitivity", "verdict"] == ""


def test_age_is_cut_into_bands_in_order(result):
    bands = result.table.loc[result.table["attribute"] == "age", "subgroup"].drop_duplicates().tolist()
    assert bands == ["<30", "30–44", "45–59", "60–74", "≥75"]
    sixties = _rows_of(result, "age", "60–74")
    assert sixties.loc["sensitivity", "n"] == 120 and sixties.loc["sensitivity", "value"] == pytest.approx(0.75)


def test_a_small_subgroup_is_too_small_to_judge(result):
    acral = _rows_of(result, "localization", "acral")
    assert (acral["n"] == 8).all() and acral.loc["sensitivity", "behind"] == 4
    assert set(acral["verdict"]) == {S.TOO_SMALL}
    table = S.subgroup_table(result)
    cell = table.loc[table["subgroup"] == "acral", "sensitivity"].item()
    assert S.TOO_SMALL in cell and "4 positive" in cell


def test_an_identifier_column_is_left_out_and_said_so(result):
    assert "patient" not in result.attributes and "identifier" in result.left_out["patient"]


def test_wilson_interval_matches_the_textbook_value():
    low, high = S.wilson_interval(8, 10, 0.95)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert S.wilson_interval(0, 5)[0] == 0.0 and S.wilson_interval(5, 5)[1] == 1.0


def test_multi_class_scores_balanced_accuracy_and_the_positive_recall():
    rng = np.random.default_rng(0)
    classes = ["bcc", "mel", "nv"]
    y = rng.integers(0, 3, 300)
    predicted = np.where(rng.random(300) < 0.8, y, (y + 1) % 3)
    rows = pd.DataFrame({"label_index": y, "predicted": [classes[i] for i in predicted],
                         "sex": np.where(np.arange(300) % 2, "male", "female"),
                         **{f"prob_{c}": (predicted == i).astype(float) for i, c in enumerate(classes)}})
    result = S.subgroup_results(rows, classes, "mel", attributes=["sex"], n_boot=50)
    assert result.metrics == ["accuracy", "balanced_accuracy", "recall_mel"]
    female = _rows_of(result, "sex", "female")
    mine = (np.arange(300) % 2 == 0) & (y == 1)
    assert female.loc["recall_mel", "value"] == pytest.approx(np.mean(predicted[mine] == 1))
    women = np.arange(300) % 2 == 0
    assert female.loc["accuracy", "value"] == pytest.approx(np.mean(predicted[women] == y[women]))


def test_a_multi_class_subgroup_missing_a_class_still_gets_its_accuracy_with_a_wilson_interval():
    classes = ["bcc", "mel", "nv"]
    y = np.array([0, 1, 2] * 20 + [2] * 40)  # the last 40 images: nv only (a site where no bcc or mel was seen)
    predicted = np.where(np.arange(100) % 5 == 0, (y + 1) % 3, y)  # every 5th image wrong
    site = np.where(np.arange(100) < 60, "back", "face")
    rows = pd.DataFrame({"label_index": y, "predicted": [classes[i] for i in predicted], "site": site,
                         **{f"prob_{c}": (predicted == i).astype(float) for i, c in enumerate(classes)}})
    result = S.subgroup_results(rows, classes, None, attributes=["site"], n_boot=50)
    assert result.metrics == ["accuracy", "balanced_accuracy"]
    face = _rows_of(result, "site", "face")
    assert np.isnan(face.loc["balanced_accuracy", "value"])  # undefined over one class
    assert face.loc["accuracy", "value"] == pytest.approx(32 / 40)
    assert (face.loc["accuracy", "low"], face.loc["accuracy", "high"]) == pytest.approx(S.wilson_interval(32, 40))


# --------------------------------------------------------------------------
# from a results folder, and rendered
# --------------------------------------------------------------------------


def _folder(tmp_path, *, metadata: bool = True):
    rows = _rows()
    splits = pd.DataFrame({"path": rows["path"], "label": rows["label"], "label_index": rows["label_index"],
                           "group": None, "origin": "", "split": "test"})
    if metadata:
        splits = splits.assign(sex=rows["sex"].astype("string"), age=rows["age"])
    train = splits.iloc[:2].assign(path=["train/a.jpg", "train/b.jpg"], split="train")
    pd.concat([splits, train], ignore_index=True).to_parquet(tmp_path / SPLITS)
    final = rows.assign(trial="ens", final=True, positive_class="malignant")
    # another model's rows, right everywhere: the subgroups must be the final model's, not these
    other = rows.assign(trial="trial_000", final=False, positive_class="malignant", predicted=rows["label"])
    columns = ["trial", "final", "positive_class", "path", "label", "label_index", "predicted", "prob_benign",
               "prob_malignant"]
    pd.concat([other, final], ignore_index=True)[columns].to_parquet(tmp_path / predictions_file("test"))
    return {"split": "test", "n": len(rows), "n_boot": 200, "seed": 0, "level": 0.95, "positive_class": "malignant",
            "final": {"model": "ens", "models": [{"label": "ens"}]}}


def test_the_folder_is_read_at_the_final_models_decisions(tmp_path):
    evaluation = _folder(tmp_path)
    result = S.final_model_subgroups(tmp_path, evaluation)
    assert result.attributes == ["sex", "age"] and result.model == "ens"
    assert {(r.subgroup, r.metric) for r in result.flagged().itertuples()} == {("female", "sensitivity"),
                                                                                ("female", "balanced_accuracy")}


def test_the_card_and_the_report_say_what_the_numbers_are_at(tmp_path):
    evaluation = _folder(tmp_path)
    card = S.subgroup_card(tmp_path, evaluation)
    assert card.startswith("## Subgroups") and "shipped decision" in card and "test split" in card
    assert "Below overall: sex = female: sensitivity 0.600" in card
    assert "| sex | female | 300 | 150 / 150 |" in card
    section = S.subgroup_section(SimpleNamespace(path=tmp_path), evaluation)
    assert section.title == S.SECTION_TITLE
    text = render_markdown({"title": "t", "state_text": "", "generated": ""}, [section], tmp_path)
    assert "### By sex" in text and "### By age" in text
    female = next(line for line in text.splitlines() if line.startswith("| female |"))
    assert "0.600 [" in female and "below overall" in female


def test_without_metadata_one_sentence_says_how_to_add_it(tmp_path):
    evaluation = _folder(tmp_path, metadata=False)
    assert S.final_model_subgroups(tmp_path, evaluation) is None
    card = S.subgroup_card(tmp_path, evaluation)
    assert S.NO_METADATA in card and 'options={"metadata": "meta.csv"}' in card
    section = S.subgroup_section(SimpleNamespace(path=tmp_path), evaluation)
    assert section.blocks == [("text", S.NO_METADATA)]


def test_before_any_evaluation_the_section_says_how_to_get_one(tmp_path):
    section = S.subgroup_section(SimpleNamespace(path=tmp_path), None)
    assert "analysis.evaluate" in section.blocks[0][1]
    assert "analysis.evaluate" in S.subgroup_card(tmp_path, {"split": "test"})


def test_the_report_lists_the_section_after_the_curves():
    from analysis.report import SECTIONS

    assert SECTIONS.index(S.SECTION_TITLE) == SECTIONS.index("ROC and precision-recall curves") + 1


def test_search_writes_the_loaders_metadata_into_splits_parquet(tmp_path):
    from fixtures.datasets import make_folder
    from search.prepare import prepare_data, write_splits
    from search.storage import StudyFolder
    from search.study import Dataset, Study

    root = make_folder(tmp_path / "data", n=8)
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.png"))
    pd.DataFrame({"file": files, "age": [20 + 5 * i for i in range(len(files))],
                  "sex": ["female", "male"] * (len(files) // 2)}).iloc[::-1].to_csv(root / "meta.csv", index=False)
    study = Study(name="s", space=lambda trial: {"backbone": "cnn_s3"},
                  dataset=Dataset(loader="folder", path=str(root), image_size=16, split="stratified",
                                  split_options={"val": 0.25, "test": 0.25}, options={"metadata": "meta.csv"}))
    write_splits(prepare_data(study), StudyFolder(tmp_path, "run"))
    splits = pd.read_parquet(tmp_path / "run" / SPLITS)
    assert list(splits.columns[-2:]) == ["age", "sex"]
    assert splits["age"].dtype.kind in "if" and isinstance(splits["sex"].dtype, pd.StringDtype)
    by_file = dict(zip(splits["path"], splits["sex"]))
    assert by_file[files[0]] == "female" and by_file[files[1]] == "male"  # joined by the image, not by row order
