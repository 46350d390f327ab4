import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastkd.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [[], ["pretrain"], ["distill"], ["eval"], ["eval", "knn"], ["eval", "linear"],
                                  ["bench"], ["data"], ["data", "sample"], ["data", "scan"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fastkd")
    if argv[:1] in (["pretrain"], ["distill"]):
        assert "--resume" in text and "key=value" in text
    if argv[-1:] == ["knn"]:
        assert "--train" in text and "--temperature" in text


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: mae}\ndata: {source: /x}\ntrian: {epochs: 1}\n")
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'trian'; did you mean 'train'?" in err and str(config) in err
    with pytest.raises(SystemExit):
        main(["pretrain", str(config).replace("c.yaml", "none.yaml")])
    assert "does not exist" in capsys.readouterr().err


def test_method_run_with_the_wrong_command(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: moma}\ndata: {source: /x}\n")
    with pytest.raises(SystemExit):
        main(["pretrain", str(config)])
    assert "method 'moma' is run with `fastkd distill`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", str(config), "oops"])
    assert "override must look like key=value" in capsys.readouterr().err


def test_bench_lists_and_rejects_unknown(capsys):
    assert main(["bench", "list"]) == 0
    listed = capsys.readouterr().out
    # every benchmarks/bench_*.py is listed (the table in cli.benchmarks() is written out, statically)
    shipped = sorted(path.stem[len("bench_"):] for path in (ROOT / "benchmarks").glob("bench_*.py"))
    assert listed.strip() == "benchmarks: " + ", ".join(shipped)
    with pytest.raises(SystemExit):
        main(["bench", "no_such_bench"])
    assert "unknown benchmark 'no_such_bench'" in capsys.readouterr().err


def test_parser_wires_data_commands():
    args = build_parser().parse_args(["data", "sample", "/tmp/x", "--images", "24"])
    assert args.images == 24 and callable(args.func)


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fastkd.cli", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("fastkd ")


def test_pretrain_then_eval_from_the_run_directory(tmp_path, capsys):
    """The runner end to end: the demo MAE recipe for 2 steps on sample JPEGs, then k-NN of the
    run directory (the method is rebuilt from the config stored in the checkpoint)."""
    from fastkd.data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "train", images=24)
    out = tmp_path / "run"
    code = main(["pretrain", str(ROOT / "configs/demo/mae.yaml"), f"data.source={data}", "data.batch_size=12",
                 "data.backend=torch", "data.num_workers=0", "train.max_steps=2", "train.progress=false", "train.tensorboard=false",
                 f"train.output_dir={out}"])
    assert code == 0
    assert "finished at step 2/2" in capsys.readouterr().out
    assert (out / "student.pt").is_file() and (out / "checkpoints" / "checkpoint_000000002.pt").is_file()
    assert main(["eval", "knn", str(out), "--train", str(data), "--val", str(data), "--image-size", "32",
                 "--backend", "torch", "--num-workers", "0", "--k", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["top1"] == 100.0
    # the JSON says what was evaluated and how: protocol, file and key read, crop
    assert report["protocol"] == "knn" and report["checkpoint"] == str(out / "student.pt")
    arch = yaml.safe_load((ROOT / "configs/demo/mae.yaml").read_text())["method"]["backbone"]["arch"]
    assert report["checkpoint_key"] == f"fastkd:{arch}"
    assert report["image_size"] == 32 and report["resize"] == 37
    # DINO's linear protocol: augmented crops, an lr sweep, its features named in the JSON
    assert main(["eval", "linear", str(out), "--protocol", "dino", "--train", str(data), "--val", str(data),
                 "--backend", "torch", "--num-workers", "0", "--epochs", "1", "--probe-batch-size", "8",
                 "--lrs", "0.01", "0.1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["protocol"] == "linear" and report["linear_protocol"] == "dino"
    assert [entry["lr"] for entry in report["sweep"]] == [0.01, 0.1] and report["image_size"] == 32
    assert report["checkpoint_key"] == f"fastkd:{arch}" and report["epochs"] == 1
    # fine-tuning, the papers' headline protocol, at CPU size: a fine-tuned model file and its report
    assert main(["eval", "finetune", str(out), "--train", str(data), "--val", str(data), "--epochs", "1",
                 "--batch-size", "8", "--num-workers", "0", "--output-dir", str(tmp_path / "ft"),
                 "--output", str(tmp_path / "ft.json")]) == 0
    report = json.loads((tmp_path / "ft.json").read_text())
    assert report["protocol"] == "finetune" and report["recipe"] == "mae" and report["image_size"] == 32
    assert report["checkpoint_key"] == f"fastkd:{arch}" and len(report["history"]) == 1
    assert (tmp_path / "ft" / "finetuned.pt").is_file()
    with pytest.raises(SystemExit) as stop:  # options checked before the model is read
        main(["eval", "finetune", str(tmp_path / "missing"), "--train", str(data), "--val", str(data),
              "--layer-decay", "1.5"])
    assert stop.value.code == 2 and "layer_decay" in capsys.readouterr().err
    for bad, message in ((["--protocol", "dino", "--weight-decay", "0.1"], "--weight-decay applies"),
                         (["--n-last-blocks", "2"], "--n-last-blocks applies"),
                         (["--protocol", "mocov3", "--lr", "0.1", "--lrs", "0.2"], "not both")):
        with pytest.raises(SystemExit) as stop:  # refused before the model (here a missing path) is read
            main(["eval", "linear", str(tmp_path / "missing"), "--train", str(data), "--val", str(data), *bad])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_train_commands_list_the_methods_of_their_role(capsys):
    from fastkd.methods import method_names

    for command in ("pretrain", "distill"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"({', '.join(method_names(command))})" in text


def test_eval_choices_come_from_the_loader_and_weights_modules(capsys):
    from fastkd.data.loader import BACKENDS
    from fastkd.models.weights import FORMATS

    def parse(*options):
        return build_parser().parse_args(["eval", "knn", "m.pt", "--train", "t", "--val", "v", *options])

    assert [parse("--backend", backend).backend for backend in BACKENDS] == list(BACKENDS)
    assert [parse("--format", name).format for name in FORMATS] == list(FORMATS)
    for option in ("--backend", "--format"):
        with pytest.raises(SystemExit):
            parse(option, "no_such_choice")
        assert "invalid choice: 'no_such_choice'" in capsys.readouterr().err

def _cli_error(capsys, argv) -> str:
    from fastkd.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err, err
    return err


DEMO_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "demo"


def test_user_errors_are_one_message_and_exit_2(tmp_path, capsys):
    from fastkd.data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "data", images=12)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    err = _cli_error(capsys, ["distill", str(DEMO_CONFIGS / "moma.yaml"), f"data.source={data}",
                              f"method.teachers.mocov3.path={tmp_path / 'missing.pt'}"])
    assert "missing.pt" in err and "does not exist" in err
    err = _cli_error(capsys, ["pretrain", str(DEMO_CONFIGS / "mae.yaml"), f"data.source={data}",
                              "method.backbone.kwargs={embed_dim: 10, num_heads: 3}"])
    assert "timm rejected the arguments" in err and "divisible" in err
    err = _cli_error(capsys, ["eval", "knn", str(garbage), "--train", str(data), "--val", str(data)])
    assert "garbage.pt" in err and "not a readable PyTorch checkpoint" in err
    err = _cli_error(capsys, ["pretrain", str(DEMO_CONFIGS / "mae.yaml"), f"data.source={data}",
                              f"data.exclude={tmp_path / 'no_such_list.txt'}"])
    assert "no_such_list.txt" in err


def test_resume_with_only_corrupt_checkpoints_is_one_message(tmp_path, capsys):
    from fastkd.data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "data", images=12)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint_000000005.pt").write_bytes(b"truncated")
    err = _cli_error(capsys, ["pretrain", str(DEMO_CONFIGS / "mae.yaml"), f"data.source={data}",
                              f"train.output_dir={tmp_path / 'run'}", "data.num_workers=0", "data.batch_size=4",
                              "--resume"])
    assert "no checkpoint in" in err and "checkpoint_000000005.pt" in err


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_during_training_names_the_file_and_exits_2(tmp_path, capsys, workers):
    from fastkd.data import write_sample_dataset

    data = write_sample_dataset(tmp_path / "data", images=12)
    bad = sorted(data.rglob("*.jpg"))[3]
    bad.write_bytes(b"this is not a jpeg")
    err = _cli_error(capsys, ["pretrain", str(DEMO_CONFIGS / "mae.yaml"), f"data.source={data}",
                              "data.backend=torch", f"data.num_workers={workers}", "data.batch_size=12",
                              f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"])
    assert str(bad) in err and "fastkd data scan" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the message and the FASTKD_TRACEBACK hint


def test_launch_takes_torchruns_command_line(capsys):
    """`fastkd launch` hands its arguments to torchrun's parser (fastkd.launch): its help is torchrun's."""
    try:
        code = main(["launch", "--help"])
    except SystemExit as stop:  # torch versions differ in how their parser ends after --help
        code = stop.code or 0
    assert code == 0 and "--nproc-per-node" in capsys.readouterr().out.replace("_", "-")
