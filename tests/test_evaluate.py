import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pneumo_dist import evaluate, report, shift, storage
from pneumo_dist.predict import PneumoniaDetector

from .conftest import REPO, TF_STARTUP

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def export(trained) -> str:
    return str(Path(trained[2]) / "export")


@pytest.fixture(scope="module")
def local_report(export, learnable_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "eval-test"
    detector = PneumoniaDetector.load(export)
    summary = evaluate.run_evaluation(detector, learnable_shards, "test", str(out), resamples=200)
    return summary, out


def strict_json(text: str) -> dict:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_report_files_are_written_and_not_empty(local_report):
    _, out = local_report
    for name in evaluate.PLOTS:
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
        assert (out / name).stat().st_size > 5_000, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(evaluate.PLOTS)  # self-contained
    assert "youden" in page and "Probabilities calibrated on the validation split" in page
    assert "<tr><th>acquisition = IM</th>" in page and "<tr><th>subtype = virus</th>" in page
    assert "Evaluation on the test split" in page and "class=warn" not in page
    # For a clinician: the plain summary first, a glossary, a caption under every plot.
    assert re.search(r"of 100 images with pneumonia, the model finds <b>\d+</b>", page)
    assert "<h2>Glossary</h2>" in page and page.count("<figcaption>") == len(evaluate.PLOTS)
    assert all(html.escape(report.CAPTIONS[name]) in page for name in evaluate.PLOTS)
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "source,label,probability,predicted" and len(rows) == 1 + 40


def test_metrics_json_has_every_figure_with_its_interval(local_report, export):
    summary, out = local_report
    written = strict_json((out / "metrics.json").read_text())
    assert written["data"]["count"] == 40 and written["data"]["positives"] == 20
    assert written["model"]["threshold"] == json.loads(Path(export, "export.json").read_text())["threshold"]
    assert written["data"]["preprocessing_matches_training"] is True
    for name in ("at_0.5", "at_threshold"):
        for metric, figure in written[name]["metrics"].items():
            if figure["value"] is not None:
                low, high = figure["ci95"]
                assert low <= figure["value"] <= high, (name, metric)
        confusion = written[name]["confusion"]
        assert sum(confusion.values()) == 40
    assert written["at_0.5"]["metrics"]["auc"]["value"] > 0.8  # the trained model separates the classes
    assert 0 <= written["calibration"]["ece"] <= 1
    assert set(written["gradcam"]) == set(evaluate.CASES)
    # Each threshold policy's figures, at the threshold the export chose on validation.
    info = json.loads(Path(export, "export.json").read_text())
    assert written["model"]["calibration"] == info["calibration"] and info["calibration"]["slope"] > 0
    assert {name: p["threshold"] for name, p in written["policies"].items()} == info["operating_points"]
    assert written["policies"]["sensitivity"] == written["at_threshold"]
    # The demo's names: NORMAL "IM-*", PNEUMONIA "person*_bacteria|virus_*".
    assert set(written["subgroups"]["acquisition"]) == {"IM", "person"}
    assert set(written["subgroups"]["subtype"]) == {"bacteria", "virus"}
    assert written["subgroups"]["acquisition"]["IM"]["count"] == 20


def test_report_reads_and_writes_gcs(export, learnable_shards, bucket):
    storage.copy_tree(export, f"{bucket}/run/export")
    storage.copy_tree(learnable_shards, f"{bucket}/shards")
    detector = PneumoniaDetector.load(f"{bucket}/run/export")
    summary = evaluate.run_evaluation(
        detector, f"{bucket}/shards", "val", f"{bucket}/run/eval-val", resamples=100, gradcam_per_case=1
    )
    names = {storage.basename(f.uri) for f in storage.list_files(f"{bucket}/run/eval-val")}
    assert {"report.html", "metrics.json", "predictions.csv", *evaluate.PLOTS} <= names
    page = storage.read_bytes(f"{bucket}/run/eval-val/report.html").decode()
    assert "These are <b>val</b> figures" in page  # validation figures are labelled as such
    assert summary.data.split == "val"


def test_confident_cases_are_the_most_confident_of_each_kind():
    scores = evaluate.Scores(
        labels=np.array([1, 1, 1, 0, 0, 0, 1, 0]),
        probabilities=np.array([0.99, 0.7, 0.2, 0.9, 0.6, 0.01, 0.05, 0.3]),
        sources=[str(i) for i in range(8)],
    )
    cases = evaluate.confident_cases(scores, threshold=0.5, per_case=2)
    assert cases == {
        "true_positive": [0, 1],
        "false_positive": [3, 4],
        "false_negative": [6, 2],
        "true_negative": [5, 7],
    }


def test_subgroups_come_from_record_attributes_and_the_kaggle_file_name_families():
    scores = evaluate.Scores(
        labels=np.array([0, 0, 0, 0, 1, 1, 1, 1]),
        probabilities=np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.4, 0.8, 0.7]),
        sources=[
            "NORMAL/IM-0001-0001.jpeg",
            "NORMAL/IM-0002-0001.jpeg",
            "NORMAL/NORMAL2-IM-0003-0001.jpeg",
            "NORMAL/NORMAL2-IM-0004-0001.jpeg",
            "PNEUMONIA/person1_bacteria_1.jpeg",
            "PNEUMONIA/person2_bacteria_2.jpeg",
            "PNEUMONIA/person3_virus_3.jpeg",
            "PNEUMONIA/person4_virus_4.jpeg",
        ],
        attributes={
            "subtype": ["", "", "", "", "bacteria", "bacteria", "virus", "virus"],
            "sex": ["F", "M", "F", "M", "F", "M", "", ""],
            "age_band": ["60-69"] * 8,
        },
    )
    report = evaluate.subgroup_report(scores, threshold=0.5, resamples=200)
    assert set(report) == {"subtype", "acquisition", "sex"}  # one age band: no comparison
    assert (report["sex"]["M"].count, report["sex"]["M"].metrics["specificity"].value) == (3, 0.5)
    assert set(report["acquisition"]) == {"IM", "NORMAL2-IM", "person"}
    im, normal2, person = (report["acquisition"][g] for g in ("IM", "NORMAL2-IM", "person"))
    assert (im.count, im.negatives, im.metrics["specificity"].value) == (2, 2, 0.5)  # 0.6 is a false alarm
    assert normal2.metrics["specificity"].value == 1.0 and np.isnan(normal2.metrics["sensitivity"].value)
    assert person.metrics["sensitivity"].value == 0.75 and np.isnan(
        person.metrics["auc"].value
    )  # one class: no AUC
    assert report["subtype"]["bacteria"].metrics["sensitivity"].value == 0.5
    assert report["subtype"]["virus"].metrics["sensitivity"].value == 1.0
    # One value is no comparison: an attribute the split does not vary is left out.
    same = evaluate.Scores(
        scores.labels, scores.probabilities, [f"x{i}.png" for i in range(8)], {"subtype": ["virus"] * 8}
    )
    assert evaluate.subgroup_report(same, 0.5, resamples=100) == {}


def test_evaluate_job_prints_the_figures_and_writes_the_report(export, learnable_shards, tmp_path):
    out = tmp_path / "report"
    # A scored batch (predict.py's CSV) of nearly certain PNEUMONIA: far from the test split's spread.
    scores = tmp_path / "predictions.csv"
    rows = [f"x{i}.jpeg,PNEUMONIA,{0.99 + i / 10_000:.6f},0.5,v," for i in range(50)] + [
        "bad.png,,,0.5,v,unreadable"
    ]
    scores.write_text("path,label,probability,threshold,model_version,error\n" + "\n".join(rows) + "\n")
    command = [sys.executable, str(REPO / "jobs" / "evaluate.py"), export, "--data", learnable_shards]
    run = subprocess.run(
        [
            *command,
            "--out",
            str(out),
            "--bootstrap",
            "100",
            "--tta",
            "2",
            "--gradcam",
            "1",
            "--prevalence",
            "0.3",
            "--drift",
            str(scores),
            "--shift",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test split, 40 images (20 PNEUMONIA)" in run.stdout and "auc" in run.stdout
    assert not TF_STARTUP.search(run.stdout + run.stderr), run.stderr[-2000:]
    assert "evaluate: loading the model" in run.stdout and "next: python jobs/predict.py" in run.stdout
    assert "  prevalence policy, threshold " in run.stdout  # the threshold for the given prevalence
    assert "  acquisition=IM: 20 images  specificity " in run.stdout
    assert re.search(
        r"drift: 50 scored images against the test split's 40: PSI \d+\.\d+, significant shift", run.stdout
    )
    figures = strict_json((out / "metrics.json").read_text())
    assert figures["tta_views"] == 2 and figures["drift"]["psi"] > 0.25
    # The shift benchmark, as robustness: every shift, with the seed given.
    assert re.search(r"robustness: mean auc under shift \d\.\d{3} .*lowest specificity", run.stdout)
    robustness = figures["robustness"]
    assert robustness["seed"] == 5 and robustness["count"] == 40
    assert list(robustness["shifts"]) == list(shift.SHIFTS)
    assert "<h2>Robustness</h2>" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--split", "holdout"], "has no 'holdout' split"),
        (["--data", "/nonexistent/shards"], "no manifest at /nonexistent/shards/manifest.json"),
    ],
    ids=["missing-split", "missing-data"],
)
def test_evaluate_job_bad_arguments_exit_2_with_one_line(export, learnable_shards, arguments, message):
    command = [sys.executable, str(REPO / "jobs" / "evaluate.py"), export, "--data", learnable_shards]
    run = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert message in run.stderr.strip().splitlines()[-1]


def test_the_run_comparison_resamples_patients_and_reports_the_paired_difference(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"PNEUMONIA/person{p}_bacteria_{i}.jpeg" for p in range(40) for i in range(2)]
    names += [f"NORMAL/IM-{p:04d}-0001.jpeg" for p in range(30)]
    labels = np.array([1] * 80 + [0] * 30)
    noisy = labels + rng.normal(0, 0.6, len(labels))  # a model that ranks imperfectly
    better = labels + rng.normal(0, 0.3, len(labels))
    for name, scores in (("base", noisy), ("same", noisy), ("better", better)):
        rows = [
            f"{n},{'PNEUMONIA' if y else 'NORMAL'},{1 / (1 + np.exp(-s)):.6f},x"
            for n, y, s in zip(names, labels, scores, strict=True)
        ]
        (tmp_path / f"{name}.csv").write_text("source,label,probability,predicted\n" + "\n".join(rows))

    def compare(other: str) -> str:
        command = [sys.executable, str(REPO / "bench" / "compare_runs.py"), str(tmp_path / "base.csv")]
        result = subprocess.run([*command, str(tmp_path / other), "--resamples", "300"], capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        return result.stdout.decode()

    assert "110 images, 70 patients" in compare("same.csv")  # two images per pneumonia patient
    assert "difference +0.0000 [+0.0000, +0.0000]" in compare("same.csv")
    low = float(re.search(r"difference \+\d\.\d+ \[([-+]\d\.\d+),", compare("better.csv")).group(1))
    assert low > 0  # the better model's gain is outside the paired interval's noise


def test_drift_scores_must_be_probabilities_of_a_predictions_file(tmp_path):
    from pneumo_dist import evaluate

    (tmp_path / "none.csv").write_text("path,label\na.png,NORMAL\n")
    with pytest.raises(evaluate.EvaluationError, match="none.csv: not a predictions file with a probability"):
        evaluate.read_scores(str(tmp_path / "none.csv"))
    (tmp_path / "odd.csv").write_text("path,probability\na.png,0.2\nb.png,\nc.png,1.7\n")
    with pytest.raises(evaluate.EvaluationError, match=r"1 probabilities outside \[0, 1\] \(e.g. 1.7\)"):
        evaluate.read_scores(str(tmp_path / "odd.csv"))
    (tmp_path / "fine.csv").write_text("path,probability\na.png,0.2\nb.png,\n")
    assert evaluate.read_scores(str(tmp_path / "fine.csv")).tolist() == [0.2]


CHROMIUM = "/usr/bin/chromium"  # Debian's chromium package


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no headless Chromium (apt-get install chromium)")
def test_the_report_renders_in_a_browser(local_report, tmp_path):
    from PIL import Image

    _, out = local_report
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    result = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,3000"]
        + [f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # Drawn, not a blank page: text and plots cover a good part of it, and the summary's blue box and
    # the plots' colours are there.
    assert (pixels.sum(axis=2) < 600).mean() > 0.05
    colour = np.abs(pixels[..., 2] - pixels[..., 0]) > 40
    assert colour.mean() > 0.01
    # The full width is used: something is drawn in the right third of the page.
    assert (pixels[:, 950:].sum(axis=2) < 600).mean() > 0.01
