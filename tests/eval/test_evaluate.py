"""k-NN / linear evaluation end to end: sample-dataset JPEGs -> eval loader -> saved backbone -> CLI."""

import json

import pytest
import torch

from fastkd.cli import main
from fastkd.data import load_images, write_sample_dataset
from fastkd.eval import evaluate_knn, evaluate_linear, load_eval_model
from fastkd.models import build_backbone, save_backbone

LOADER = dict(image_size=16, batch_size=8, backend="torch", num_workers=0)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return write_sample_dataset(root / "train", images=24, seed=0), write_sample_dataset(root / "val", images=12, seed=1)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    return save_backbone(backbone, tmp_path_factory.mktemp("run") / "student.pt")


def test_knn_on_the_train_split_itself_is_perfect(splits, student):
    """With k=1 each train image is its own nearest neighbour (cosine 1): k-NN of the memory bank
    against itself gives 100% whatever the (distinct) features."""
    model = load_eval_model(student)
    result = evaluate_knn(model, splits[0], splits[0], k=1, **LOADER)
    assert result.top1 == 100.0


def test_cached_features_feed_knn_and_linear_probe(splits, student, tmp_path):
    model = load_eval_model(student)
    knn = evaluate_knn(model, *splits, cache_dir=tmp_path, cache_key="s", **LOADER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-train.pt", "s-val.pt"]
    assert 0.0 <= knn.top1 <= 100.0 and len(knn.predictions) == 12
    linear = evaluate_linear(model, *splits, epochs=2, cache_dir=tmp_path, cache_key="s", **LOADER)
    assert 0.0 <= linear.top1 <= linear.top5 <= 100.0
    with pytest.raises(ValueError, match="cache_key is required"):
        evaluate_knn(model, *splits, cache_dir=tmp_path, **LOADER)


def test_cli_eval_knn_writes_json(splits, student, tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["eval", "knn", str(student), "--train", str(splits[0]), "--val", str(splits[0]), "--image-size", "16",
                 "--batch-size", "8", "--backend", "torch", "--num-workers", "0", "--k", "1", "--output", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].startswith("student-student-") and cached[1].endswith("-val.pt")
    report = json.loads(out.read_text())
    assert report["protocol"] == "knn" and report["top1"] == 100.0 and report["k"] == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


def test_training_checkpoint_format_has_one_home():
    import fastkd.eval.models
    from fastkd.train import checkpoint, trainer

    assert checkpoint.CHECKPOINT_FORMAT and not hasattr(trainer, "CHECKPOINT_FORMAT")
    assert not hasattr(fastkd.eval.models, "CHECKPOINT_FORMAT")  # no re-export: read from train.checkpoint


def test_val_classes_are_matched_by_name(splits, student, tmp_path):
    """A val tree holding only some train classes (so its folder indices differ) scores as the
    same images under the full tree: labels are mapped by class name, not by folder index."""
    import shutil

    train, val = splits
    classes = sorted(p.name for p in val.iterdir())
    partial = tmp_path / "val_partial"
    for name in classes[3:]:
        shutil.copytree(val / name, partial / name)
    model = load_eval_model(student)
    full = evaluate_knn(model, train, val, k=1, **LOADER)
    part = evaluate_knn(model, train, partial, k=1, **LOADER)
    kept = [i for i, name in enumerate(sorted((p.parent.name, p.name) for p in val.rglob("*.jpg")))
            if name[0] in classes[3:]]
    assert torch.equal(part.predictions, full.predictions[kept])
    labels = torch.tensor(load_images(val).labels)[kept]  # the full tree has the train tree's classes
    assert part.top1 == pytest.approx(100.0 * (full.predictions[kept] == labels).float().mean().item())
    assert part.class_counts["val"] == {name: len(list((partial / name).iterdir())) for name in classes[3:]}
    assert sum(part.class_counts["train"].values()) == 24


def test_val_classes_missing_from_train_are_refused(splits, student, tmp_path):
    import shutil

    shutil.copytree(splits[1], tmp_path / "val")
    (tmp_path / "val" / sorted(p.name for p in splits[1].iterdir())[0]).rename(tmp_path / "val" / "zebra")
    with pytest.raises(ValueError, match="classes the train split .* lacks: 'zebra'"):
        evaluate_knn(load_eval_model(student), splits[0], tmp_path / "val", **LOADER)


def test_cli_eval_output_into_a_missing_folder_fails_before_evaluating(splits, student, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "knn", str(student), "--train", str(splits[0]), "--val", str(splits[1]),
              "--output", str(tmp_path / "missing" / "knn.json")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_dir_evaluates_its_student_file_and_its_own_image_size(splits, student, tmp_path, capsys):
    """A run folder with student.pt is evaluated from that file alone (no method, no teachers
    rebuilt: there are no checkpoints here at all), at the 16 px the model was built for."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.pt").write_bytes(student.read_bytes())
    code = main(["eval", "knn", str(run), "--train", str(splits[0]), "--val", str(splits[0]), "--batch-size", "8",
                 "--backend", "torch", "--num-workers", "0", "--k", "1"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == 100.0
